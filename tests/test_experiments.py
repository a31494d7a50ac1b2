"""`python -m keras_clip.experiments`: prompt variants and few-shot on a tiny model.

One CLI run of each experiment on a synthetic MNIST folder (uint8 images: no JPEG
decoder to trace) (the image embeddings
are encoded once and cached); every accuracy is then recomputed in numpy from the
embeddings.
"""
import glob
import json

import numpy as np
import pytest
from absl import app

from keras_clip import demo_data
from keras_clip.evaluation.datasets import load_classification_dataset, split_indices
from keras_clip.experiments import common, prompts, runner
from keras_clip.preprocessing.tokenizer import tokenize
from keras_clip.zero_shot import build_class_embeddings
from keras_clip.zero_shot_data import load_dataset_prompts
from tests import harness

MNIST_TEMPLATES = load_dataset_prompts("mnist")[1]
IMAGENET_TEMPLATES = load_dataset_prompts("imagenet")[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Runs both experiments through the CLI; returns model, dataset, embeddings, output."""
    from keras_clip.experiments import __main__ as cli

    tmp = tmp_path_factory.mktemp("experiments")
    model = harness.perturb_weights(harness.tiny_clip(), seed=1)
    model.save_to_preset(str(tmp / "preset"))
    root = harness.write_mnist(tmp / "mnist", count=80)
    output = tmp / "out"
    flags = [f"--preset={tmp / 'preset'}", f"--dataset={root}", "--templates=mnist",
             f"--output_dir={output}", "--tag=mnist", "--selection_fraction=0.4", "--seed=3",
             "--ks=1,2", "--num_seeds=2", "--l2_grid=0.01,1"]
    for name in ("prompts", "few_shot"):
        cli.FLAGS(["experiments", *flags])
        try:
            cli.main(["experiments", name])
        finally:
            cli.FLAGS.unparse_flags()
    caches = glob.glob(str(output / "embedding_cache" / "*.npz"))
    assert len(caches) == 1  # the second experiment read the first one's image embeddings
    with np.load(caches[0]) as cached:
        images = cached["embeddings"]
    return model, load_classification_dataset(str(root)), images, output


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


def test_prompt_variant_accuracies_match_numpy_recomputation(run):
    model, dataset, images, output = run
    results = json.loads((output / "prompts_mnist.json").read_text())
    candidates = list(dict.fromkeys(["{}", "A photo of a {}."] + MNIST_TEMPLATES
                                    + IMAGENET_TEMPLATES))
    assert results["num_candidates"] == len(candidates)
    reference = _reference_prompt_embeddings(model, dataset.class_names, candidates)
    selection_idx, evaluation_idx = split_indices(dataset.labels, [0.4, 0.6], seed=3)
    assert results["num_evaluation"] == len(evaluation_idx) == 48
    variants = results["variants"]
    assert list(variants) == list(prompts.VARIANTS)
    expected_templates = {"class_name": ["{}"], "a_photo_of": ["A photo of a {}."],
                          "dataset_templates": MNIST_TEMPLATES,
                          "imagenet_80": IMAGENET_TEMPLATES,
                          "selected": variants["selected"]["templates"]}
    for name, templates in expected_templates.items():
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
    table = (output / "prompts_mnist.md").read_text()
    assert f"| imagenet_80 | 80 | {variants['imagenet_80']['top1']:.2f} |" in table
    assert (output / "prompts_mnist.png").read_bytes().startswith(b"\x89PNG")


def test_few_shot_cli_zero_shot_matches_numpy(run):
    model, dataset, images, output = run
    results = json.loads((output / "few_shot_mnist.json").read_text())
    classes = build_class_embeddings(model, dataset.class_names, MNIST_TEMPLATES)
    pool, val, test = split_indices(dataset.labels, (0.5, 0.1, 0.4), seed=3)
    assert (results["num_pool"], results["num_val"], results["num_test"]) == tuple(
        len(part) for part in (pool, val, test))
    expected = 100.0 * np.mean(np.argmax(images[test] @ classes.T, 1) == dataset.labels[test])
    assert results["zero_shot_top1"] == pytest.approx(expected)
    assert sorted(results["few_shot"]) == ["1", "2"] and results["l2_grid"] == [0.01, 1.0]
    assert results["seeds"] == [0, 1] and results["experiment"] == "few_shot"
    assert (output / "few_shot_mnist.md").read_text().startswith("Test top-1 on mnist")
    assert (output / "few_shot_mnist.png").read_bytes().startswith(b"\x89PNG")


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


def test_demo_dataset_holds_the_held_out_classes_in_order():
    dataset, templates = common.load_dataset("demo", max_examples=24)
    assert dataset.class_names == list(demo_data.DEMO_CLASSES)
    assert templates == list(demo_data.DEMO_TEMPLATES)
    np.testing.assert_array_equal(dataset.labels, np.arange(24) % 12)
    images = dataset._read_images(np.array([0, 13]))
    expected = demo_data.demo_zero_shot_split(14)
    assert images == [expected[0][0], expected[13][0]]  # the same JPEG bytes
    assert common.load_dataset("demo", templates=["a {}."], max_examples=12)[1] == ["a {}."]


def test_unknown_experiment_is_rejected():
    from keras_clip.experiments import __main__ as cli

    with pytest.raises(app.UsageError, match=r"one of \('prompts', 'few_shot', 'objectives'\)"):
        cli.main(["experiments", "captions"])
    with pytest.raises(ValueError, match="`name` must be one of"):
        runner.run_experiment("captions", model=object())
