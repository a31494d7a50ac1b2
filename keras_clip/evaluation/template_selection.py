"""Automatic prompt-template selection by greedy forward selection.

The CLIP paper (section 3.1.4) ensembles hand-picked templates; OpenAI's notebook
chose ImageNet's 7-template subset by a sequential forward selection on held-out
data. This module does the same on embeddings:

1. `template_prompt_embeddings` encodes every (template, class) prompt once:
   `(T, C, E)`, each prompt embedding unit norm.
2. `select_templates` starts from the empty set and repeatedly adds the template
   whose addition gives the best *selection-split* accuracy of the ensemble
   (`normalize(mean of the chosen templates' prompt embeddings)` per class, as
   `build_class_embeddings` does), and stops as soon as no candidate improves it.
   Ties go to the lower template index. It only ever receives the selection split.
3. `compare_templates` measures the chosen subset, the default single template
   and the full ensemble on a separate evaluation split.

`select_and_evaluate` runs 2 then 3 and reads the evaluation split only after the
selection has returned.
"""
import dataclasses

import numpy as np
from absl import logging

from keras_clip.zero_shot import build_class_embeddings

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclasses.dataclass(frozen=True)
class EmbeddedSplit:
    """Image embeddings `(N, E)` with their int labels `(N,)`."""

    embeddings: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass
class TemplateSelection:
    """Result of `select_templates`.

    Attributes:
        templates: the chosen templates, in the order they were added.
        indices: their indices in the candidate list.
        selection_accuracy: top-1 (percent) of the chosen ensemble on the selection split.
        history: per step, `{"added": template, "selection_accuracy": percent}`.
    """

    templates: list
    indices: list
    selection_accuracy: float
    history: list


def template_prompt_embeddings(model, class_names, templates, batch_size=256):
    """Unit-norm prompt embeddings `(T, C, E)`: template `t` filled with class `c`."""
    return np.stack([
        build_class_embeddings(model, class_names, [template], batch_size=batch_size)
        for template in templates
    ])


def ensemble_class_embeddings(prompt_embeddings, indices):
    """`normalize(mean_t prompt_embeddings[t])` over templates `indices`: `(C, E)`."""
    mean = np.asarray(prompt_embeddings, np.float32)[list(indices)].mean(axis=0)  # (C, E)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def _accuracy(embeddings, labels, class_embeddings):
    predictions = np.argmax(embeddings @ class_embeddings.T, axis=1)  # (N,)
    return 100.0 * float(np.mean(predictions == labels))


def select_templates(selection_split, prompt_embeddings, templates, max_templates=None):
    """Greedy forward selection of templates on the selection split only.

    Args:
        selection_split: an `EmbeddedSplit` (anything with `embeddings` `(N, E)`
            and `labels` `(N,)`) of the selection data.
        prompt_embeddings: float `(T, C, E)`, unit-norm prompt embeddings of
            every candidate template (`template_prompt_embeddings`).
        templates: the T candidate templates.
        max_templates: optional cap on the subset size.

    Returns:
        A `TemplateSelection`.
    """
    prompt_embeddings = np.asarray(prompt_embeddings, np.float32)
    if prompt_embeddings.ndim != 3 or prompt_embeddings.shape[0] != len(templates):
        raise ValueError(
            f"`prompt_embeddings` must have shape (T, C, E) with T={len(templates)}. "
            f"Received: shape={prompt_embeddings.shape}"
        )
    embeddings = np.asarray(selection_split.embeddings, np.float32)  # (N, E)
    labels = np.asarray(selection_split.labels)
    chosen, history, best = [], [], -1.0
    max_templates = max_templates or len(templates)
    while len(chosen) < max_templates:
        candidates = [t for t in range(len(templates)) if t not in chosen]
        accuracies = [
            _accuracy(embeddings, labels,
                      ensemble_class_embeddings(prompt_embeddings, chosen + [t]))
            for t in candidates
        ]
        step_best = int(np.argmax(accuracies))  # first maximum: lowest index wins ties
        if accuracies[step_best] <= best:
            break
        best = accuracies[step_best]
        chosen.append(candidates[step_best])
        history.append({"added": templates[chosen[-1]], "selection_accuracy": best})
        logging.info("Template selection step %d: added %r, selection top-1 %.2f",
                     len(chosen), templates[chosen[-1]], best)
    return TemplateSelection([templates[t] for t in chosen], chosen, best, history)


def compare_templates(evaluation_split, prompt_embeddings, templates, selection,
                      default_template=DEFAULT_TEMPLATE, default_prompt_embeddings=None):
    """Top-1 on the evaluation split: chosen subset vs default template vs all templates.

    Args:
        evaluation_split: an `EmbeddedSplit` never used for selection.
        prompt_embeddings: `(T, C, E)` of the candidate templates.
        templates: the T candidates.
        selection: a `TemplateSelection`.
        default_template: the single-template baseline.
        default_prompt_embeddings: `(C, E)` of the default template; required if it
            is not among `templates`.

    Returns:
        dict of percents: `selected`, `default_template`, `full_ensemble`,
        `gain_over_default`, `gain_over_full_ensemble`, plus `num_selected` and
        `num_candidates`.
    """
    embeddings = np.asarray(evaluation_split.embeddings, np.float32)
    labels = np.asarray(evaluation_split.labels)
    if default_prompt_embeddings is None:
        if default_template not in templates:
            raise ValueError(f"Pass `default_prompt_embeddings`: {default_template!r} is not "
                             "among the candidate templates.")
        default_prompt_embeddings = prompt_embeddings[templates.index(default_template)]
    selected = _accuracy(embeddings, labels,
                         ensemble_class_embeddings(prompt_embeddings, selection.indices))
    default = _accuracy(embeddings, labels, np.asarray(default_prompt_embeddings, np.float32))
    full = _accuracy(embeddings, labels,
                     ensemble_class_embeddings(prompt_embeddings, range(len(templates))))
    return {
        "selected": selected, "default_template": default, "full_ensemble": full,
        "gain_over_default": selected - default, "gain_over_full_ensemble": selected - full,
        "num_selected": len(selection.indices), "num_candidates": len(templates),
    }


def select_and_evaluate(selection_split, evaluation_split, prompt_embeddings, templates,
                        default_template=DEFAULT_TEMPLATE, default_prompt_embeddings=None,
                        max_templates=None):
    """`select_templates` on the selection split, then `compare_templates` on the other.

    The evaluation split is first touched after the selection has returned.

    Returns:
        dict: `selected_templates`, `selection_history`, `selection_accuracy`, and
        the `compare_templates` entries under `evaluation`.
    """
    selection = select_templates(selection_split, prompt_embeddings, templates, max_templates)
    comparison = compare_templates(evaluation_split, prompt_embeddings, templates, selection,
                                   default_template, default_prompt_embeddings)
    return {
        "selected_templates": selection.templates,
        "selection_history": selection.history,
        "selection_accuracy": selection.selection_accuracy,
        "evaluation": comparison,
    }
