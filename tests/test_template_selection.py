"""Greedy template selection: finds a planted template, never reads the evaluation split."""
import itertools

import numpy as np
import pytest

from keras_clip.evaluation import template_selection
from keras_clip.evaluation.template_selection import (
    EmbeddedSplit, compare_templates, ensemble_class_embeddings, select_and_evaluate,
    select_templates,
)

NUM_CLASSES, DIM = 6, 24
TEMPLATES = ["a photo of a {}.", "itap of a {}.", "PLANTED {}", "a sketch of a {}.",
             "a {} in a video game."]
PLANTED = 2


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _synthetic(seed=0, num_selection=120, num_evaluation=300):
    """Images near class centres; the planted template's prompts are the centres,
    the other templates' prompts are the centres pushed far off in random directions."""
    rng = np.random.default_rng(seed)
    centres = _normalize(rng.normal(size=(NUM_CLASSES, DIM)))
    prompts = np.stack([
        centres if t == PLANTED else _normalize(centres + 1.2 * rng.normal(size=centres.shape))
        for t in range(len(TEMPLATES))
    ]).astype(np.float32)  # (T, C, E)

    def split(n):
        labels = rng.integers(0, NUM_CLASSES, n)
        images = _normalize(centres[labels] + 0.35 * rng.normal(size=(n, DIM)))
        return EmbeddedSplit(images.astype(np.float32), labels)

    return prompts, split(num_selection), split(num_evaluation)


def _accuracy(split, class_embeddings):
    return 100.0 * np.mean(np.argmax(split.embeddings @ class_embeddings.T, 1) == split.labels)


class Tripwire:
    """A split that raises on any attribute access while `armed`, and counts reads."""

    def __init__(self, split):
        object.__setattr__(self, "_split", split)
        object.__setattr__(self, "armed", True)
        object.__setattr__(self, "reads", 0)

    def __getattr__(self, name):
        if object.__getattribute__(self, "armed"):
            raise AssertionError(f"evaluation split read during selection ({name!r})")
        object.__setattr__(self, "reads", self.reads + 1)
        return getattr(object.__getattribute__(self, "_split"), name)


def test_planted_best_template_is_chosen_and_selection_stops_without_gain():
    prompts, selection, _ = _synthetic()
    result = select_templates(selection, prompts, TEMPLATES)
    assert result.templates[0] == TEMPLATES[PLANTED] and result.indices[0] == PLANTED
    # Reference: the first step is the best single template by selection accuracy.
    singles = [_accuracy(selection, prompts[t]) for t in range(len(TEMPLATES))]
    assert result.history[0]["selection_accuracy"] == pytest.approx(max(singles))
    # Each step improved, and no remaining template improves the final ensemble.
    steps = [h["selection_accuracy"] for h in result.history]
    assert all(b > a for a, b in zip(steps, steps[1:]))
    for t in set(range(len(TEMPLATES))) - set(result.indices):
        assert _accuracy(selection, ensemble_class_embeddings(prompts, result.indices + [t])) \
            <= result.selection_accuracy
    assert result.selection_accuracy == pytest.approx(
        _accuracy(selection, ensemble_class_embeddings(prompts, result.indices)))


def test_greedy_adds_complementary_templates():
    """Two templates that each know half the classes: the ensemble of both wins."""
    rng = np.random.default_rng(3)
    centres = _normalize(rng.normal(size=(NUM_CLASSES, DIM)))
    wrong = _normalize(rng.normal(size=(NUM_CLASSES, DIM)))
    half = np.arange(NUM_CLASSES) < NUM_CLASSES // 2
    first = np.where(half[:, None], centres, wrong)
    second = np.where(half[:, None], _normalize(rng.normal(size=centres.shape)), centres)
    prompts = np.stack([first, second, _normalize(rng.normal(size=centres.shape))])
    labels = np.repeat(np.arange(NUM_CLASSES), 20)
    split = EmbeddedSplit(_normalize(centres[labels] + 0.2 * rng.normal(size=(len(labels), DIM))),
                          labels)
    result = select_templates(split, prompts, ["a {}.", "b {}.", "c {}."])
    assert sorted(result.indices) == [0, 1]
    # Brute force over all subsets: greedy reached the best one here.
    best = max(_accuracy(split, ensemble_class_embeddings(prompts, s))
               for r in (1, 2, 3) for s in itertools.combinations(range(3), r))
    assert result.selection_accuracy == pytest.approx(best)


def test_evaluation_split_is_never_read_during_selection(monkeypatch):
    prompts, selection, evaluation = _synthetic()
    guarded = Tripwire(evaluation)
    original = template_selection.select_templates

    def select_then_disarm(*args, **kwargs):
        result = original(*args, **kwargs)  # raises if it touched the evaluation split
        object.__setattr__(guarded, "armed", False)
        return result

    monkeypatch.setattr(template_selection, "select_templates", select_then_disarm)
    result = select_and_evaluate(selection, guarded, prompts, TEMPLATES)
    assert guarded.reads > 0  # read, but only after selection finished
    assert result["selected_templates"][0] == TEMPLATES[PLANTED]
    # And selection alone with an armed tripwire as the *selection* split fails loudly,
    # so the tripwire does detect reads.
    with pytest.raises(AssertionError, match="read during selection"):
        select_templates(Tripwire(evaluation), prompts, TEMPLATES)


def test_gains_are_measured_on_the_evaluation_split():
    prompts, selection, evaluation = _synthetic(seed=1)
    chosen = select_templates(selection, prompts, TEMPLATES)
    comparison = compare_templates(evaluation, prompts, TEMPLATES, chosen)
    selected = _accuracy(evaluation, ensemble_class_embeddings(prompts, chosen.indices))
    default = _accuracy(evaluation, prompts[0])
    full = _accuracy(evaluation, ensemble_class_embeddings(prompts, range(len(TEMPLATES))))
    assert comparison["selected"] == pytest.approx(selected)
    assert comparison["default_template"] == pytest.approx(default)
    assert comparison["full_ensemble"] == pytest.approx(full)
    assert comparison["gain_over_default"] == pytest.approx(selected - default)
    assert comparison["gain_over_full_ensemble"] == pytest.approx(selected - full)
    assert comparison["gain_over_default"] > 10  # the planted template really is better
