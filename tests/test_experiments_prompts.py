"""Prompt-variant experiment: every accuracy equals a numpy recomputation from embeddings."""
import json

import numpy as np
import pytest

from keras_clip.evaluation.datasets import load_classification_dataset, split_indices
from keras_clip.evaluation.zero_shot_eval import encode_dataset
from keras_clip.experiments import prompts
from keras_clip.preprocessing.tokenizer import tokenize
from keras_clip.zero_shot_data import load_dataset_prompts
from tests import harness


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = harness.perturb_weights(harness.tiny_clip(), seed=1)
    root = harness.write_cifar10(tmp_path_factory.mktemp("cifar"), per_class=5)
    dataset = load_classification_dataset(str(root))
    return model, dataset, encode_dataset(model, dataset, verbose=0)


def _reference_prompt_embeddings(model, class_names, templates):
    """All prompts in one `encode_text` call, normalised in numpy: `(T, C, E)`."""
    texts = [t.format(c) for t in templates for c in class_names]
    features = np.asarray(model.encode_text(tokenize(texts, context_length=16),
                                            normalize=False), np.float64)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features.reshape(len(templates), len(class_names), -1)


def _reference_top1(prompt_embeddings, indices, images, labels):
    mean = prompt_embeddings[indices].mean(axis=0)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    predictions = np.array([np.argmax([image @ w for w in mean]) for image in images])
    return 100.0 * np.mean(predictions == labels)


def test_variant_accuracies_match_numpy_recomputation(setup, tmp_path):
    model, dataset, images = setup
    _, cifar_templates = load_dataset_prompts("cifar10")
    results = prompts.run(model, dataset, cifar_templates, str(tmp_path), tag="cifar",
                          selection_fraction=0.4, seed=3)
    candidates = list(dict.fromkeys(["{}", "A photo of a {}."] + cifar_templates
                                    + load_dataset_prompts("imagenet")[1]))
    assert results["num_candidates"] == len(candidates)
    reference = _reference_prompt_embeddings(model, dataset.class_names, candidates)
    selection_idx, evaluation_idx = split_indices(dataset.labels, [0.4, 0.6], seed=3)
    assert results["num_evaluation"] == len(evaluation_idx) == 30
    expected_templates = {"class_name": ["{}"], "a_photo_of": ["A photo of a {}."],
                          "dataset_templates": cifar_templates,
                          "imagenet_80": load_dataset_prompts("imagenet")[1]}
    variants = results["variants"]
    assert list(variants) == list(prompts.VARIANTS)
    for name, templates in dict(expected_templates,
                                selected=variants["selected"]["templates"]).items():
        assert variants[name]["templates"] == templates
        indices = [candidates.index(t) for t in templates]
        expected = _reference_top1(reference, indices, images[evaluation_idx],
                                   dataset.labels[evaluation_idx])
        assert variants[name]["top1"] == pytest.approx(expected, abs=1e-9), name
    assert variants["imagenet_80"]["num_templates"] == 80
    # Selection happened on the selection split: its first template is the best single one
    # there, and its recorded selection accuracy is the ensemble's on that split.
    singles = [_reference_top1(reference, [t], images[selection_idx], dataset.labels[selection_idx])
               for t in range(len(candidates))]
    assert results["selection_history"][0]["selection_accuracy"] == pytest.approx(max(singles))
    chosen = [candidates.index(t) for t in variants["selected"]["templates"]]
    assert variants["selected"]["selection_accuracy"] == pytest.approx(_reference_top1(
        reference, chosen, images[selection_idx], dataset.labels[selection_idx]))
    # The files hold the same numbers.
    written = json.loads((tmp_path / "prompts_cifar.json").read_text())
    assert written["variants"]["imagenet_80"]["top1"] == variants["imagenet_80"]["top1"]
    table = (tmp_path / "prompts_cifar.md").read_text()
    assert f"| imagenet_80 | 80 | {variants['imagenet_80']['top1']:.2f} |" in table
    assert (tmp_path / "prompts_cifar.png").read_bytes().startswith(b"\x89PNG")


def test_variant_accuracies_on_planted_embeddings():
    """Hand-made case: only the planted template's prompts sit on the class centres."""
    rng = np.random.default_rng(0)
    centres = harness.unit_rows(rng, 4, 8)
    variants = {"class_name": ["{}"], "a_photo_of": ["A photo of a {}."],
                "dataset_templates": ["good {}"], "imagenet_80": ["bad {}"]}
    candidates = prompts.candidate_templates(variants)
    # Prompts of the non-planted templates point at the next class: 0% accuracy.
    shifted = np.roll(centres, 1, axis=0)
    embeddings = np.stack([shifted, shifted, centres, shifted])
    labels = np.repeat(np.arange(4), 5)
    results = prompts.variant_accuracies(embeddings, candidates, variants, centres[labels],
                                         labels, selection_fraction=0.4)
    accuracies = {k: v["top1"] for k, v in results["variants"].items()}
    assert accuracies == {"class_name": 0.0, "a_photo_of": 0.0, "dataset_templates": 100.0,
                          "imagenet_80": 0.0, "selected": 100.0}
    assert results["variants"]["selected"]["templates"] == ["good {}"]
    with pytest.raises(ValueError, match="`selection_fraction` must be in"):
        prompts.variant_accuracies(embeddings, candidates, variants, centres[labels], labels,
                                   selection_fraction=1.0)
