"""Zero-shot evaluation: metrics vs numpy on real data, embedding cache, datasets, CLI."""
import csv
import json

import numpy as np
import pytest
import tensorflow as tf

from keras_clip.evaluation import zero_shot_eval
from keras_clip.evaluation.datasets import load_classification_dataset, read_idx, split_indices
from keras_clip.zero_shot import build_class_embeddings
from tests import harness

TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]


@pytest.fixture(scope="module")
def model():
    return harness.tiny_clip()


@pytest.fixture(scope="module")
def preprocessor(model):
    """The model's shared image preprocessor (used for the numpy reference)."""
    return model.image_preprocessor()


def _numpy_metrics(scores, labels, num_classes):
    """Reference: per-example loops and argsort, no shared code with the library."""
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = 100.0 * np.mean([order[i, 0] == y for i, y in enumerate(labels)])
    top5 = 100.0 * np.mean([y in order[i, :5] for i, y in enumerate(labels)])
    confusion = np.zeros((num_classes, num_classes), int)
    for i, y in enumerate(labels):
        confusion[y, order[i, 0]] += 1
    per_class = [100.0 * confusion[c, c] / confusion[c].sum()
                 for c in range(num_classes) if confusion[c].sum()]
    return top1, top5, float(np.mean(per_class)), confusion


@pytest.mark.parametrize("source", ["cifar10", "mnist"])
def test_zero_shot_metrics_match_numpy_on_real_subsets(model, preprocessor, source, cifar10_dir, mnist_dir):
    CIFAR10, MNIST = cifar10_dir, mnist_dir
    data = load_classification_dataset(CIFAR10 if source == "cifar10" else MNIST,
                                       max_examples=100, seed=1)
    assert len(data) == 100 and data.num_classes == 10
    # The loader's labels agree with the raw files.
    if source == "cifar10":
        with open(CIFAR10 / "labels.csv", newline="") as f:
            all_labels = np.array([int(r["label"]) for r in csv.DictReader(f)])
    else:
        all_labels = read_idx(str(MNIST / "t10k-labels-idx1-ubyte.gz"))
    keep = np.sort(np.random.default_rng(1).choice(len(all_labels), 100, replace=False))
    np.testing.assert_array_equal(data.labels, all_labels[keep])
    assert len(np.unique(data.labels)) >= 8  # a random subset, not one class

    metrics = zero_shot_eval.evaluate_zero_shot(model, data, TEMPLATES, batch_size=32, verbose=0)

    # Reference: every image preprocessed and encoded in one call, scores in numpy.
    images = [img for batch, _ in data.batches(100) for img in batch]
    if source == "mnist":
        images = np.stack(images)
        assert images.shape == (100, 28, 28, 3)
    pixels = preprocessor(tf.constant(images))
    image_embeddings = np.asarray(model.encode_image(pixels))
    class_embeddings = build_class_embeddings(model, data.class_names, TEMPLATES)
    top1, top5, mean_per_class, confusion = _numpy_metrics(
        image_embeddings @ class_embeddings.T, data.labels, 10)
    assert metrics["top1"] == pytest.approx(top1)
    assert metrics["top5"] == pytest.approx(top5)
    assert metrics["mean_per_class_accuracy"] == pytest.approx(mean_per_class)
    np.testing.assert_array_equal(metrics["confusion_matrix"], confusion)
    assert metrics["top1"] < metrics["top5"] < 100.0  # random weights: hits and misses both


def test_top5_and_mean_per_class_accuracy_match_numpy_on_imbalanced_classes():
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.zeros(50, int), np.ones(5, int), rng.integers(2, 12, 45)])
    scores = rng.normal(size=(100, 12))
    scores[np.arange(100), labels] += 1.0
    metrics = zero_shot_eval.classification_metrics(scores, labels, 12, ks=(1, 5))
    top1, top5, mean_per_class, confusion = _numpy_metrics(scores, labels, 12)
    assert metrics["top1"] == pytest.approx(top1)
    assert metrics["top5"] == pytest.approx(top5)
    assert metrics["mean_per_class_accuracy"] == pytest.approx(mean_per_class)
    assert metrics["mean_per_class_accuracy"] != pytest.approx(metrics["top1"])
    np.testing.assert_array_equal(metrics["confusion_matrix"], confusion)
    # Hand-made case: 3 examples, 3 classes.
    hand = zero_shot_eval.classification_metrics(
        [[3, 2, 1], [3, 2, 1], [1, 2, 3]], [0, 2, 2], ks=(1, 2))
    assert hand["top1"] == pytest.approx(200 / 3) and hand["top2"] == pytest.approx(200 / 3)
    assert hand["mean_per_class_accuracy"] == pytest.approx(75.0)  # (100 + 50) / 2 classes
    assert np.isnan(hand["per_class_accuracy"][1])


def test_second_run_reads_cached_embeddings_without_encoding(model, preprocessor, tmp_path, cifar10_dir,
                                                             monkeypatch):
    data = load_classification_dataset(cifar10_dir, max_examples=20)
    calls = []
    original = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = zero_shot_eval.evaluate_zero_shot(model, data, TEMPLATES, batch_size=8,
                                              cache_dir=tmp_path, verbose=0)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.npz"))) == 1
    second = zero_shot_eval.evaluate_zero_shot(model, data, ["a {}."], batch_size=8,
                                               cache_dir=tmp_path, verbose=0)
    assert len(calls) == 3  # the cache hit encoded no image
    third = zero_shot_eval.evaluate_zero_shot(model, data, TEMPLATES, batch_size=8,
                                              cache_dir=tmp_path, verbose=0)
    assert third["top1"] == first["top1"] and third["confusion_matrix"] == first["confusion_matrix"]
    assert second["templates"] == ["a {}."]
    # Other weights, or another subset, miss the cache.
    other = harness.tiny_clip(seed=1)
    assert (zero_shot_eval.embedding_cache_key(other, data)
            != zero_shot_eval.embedding_cache_key(model, data))
    assert (zero_shot_eval.embedding_cache_key(model, data.subset(np.arange(10)))
            != zero_shot_eval.embedding_cache_key(model, data))


def test_effective_robustness_subtracts_logit_linear_baseline():
    # Baseline models lying exactly on logit(shift) = 0.8 * logit(in) - 0.5.
    logit = lambda p: np.log(p / (1 - p))
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    in_acc = np.array([0.5, 0.6, 0.7, 0.8])
    shift_acc = sigmoid(0.8 * logit(in_acc) - 0.5)
    fit = zero_shot_eval.fit_logit_baseline(100 * in_acc, 100 * shift_acc)
    assert fit["slope"] == pytest.approx(0.8) and fit["intercept"] == pytest.approx(-0.5)
    result = zero_shot_eval.effective_robustness(75.0, 60.0, fit)
    expected = 100 * sigmoid(0.8 * logit(0.75) - 0.5)
    assert result["predicted_shifted_accuracy"] == pytest.approx(expected)
    assert result["effective_robustness"] == pytest.approx(60.0 - expected)
    plain = zero_shot_eval.effective_robustness(75.0, 60.0)
    assert plain["effective_robustness"] == pytest.approx(-15.0)
    assert "plain gap" in plain["definition"]


def test_distribution_shift_reports_each_set_against_in_distribution(model, preprocessor, cifar10_dir):
    cifar = load_classification_dataset(cifar10_dir, max_examples=30)
    shifted = cifar.subset(np.arange(15), name="first_half")
    result = zero_shot_eval.evaluate_distribution_shift(model, cifar, {"first_half": shifted},
                                                        TEMPLATES, verbose=0)
    scores = zero_shot_eval.encode_dataset(model, shifted, verbose=0) @ \
        build_class_embeddings(model, cifar.class_names, TEMPLATES).T
    expected = 100 * np.mean(np.argmax(scores, 1) == shifted.labels)
    entry = result["shifted"]["first_half"]
    assert entry["top1"] == pytest.approx(expected)
    assert entry["effective_robustness"] == pytest.approx(
        expected - result["in_distribution"]["top1"])


def test_class_folder_and_csv_loaders_agree(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            (tmp_path / name / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
            rows.append(f"{name}/{i}.png,{label}")
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    from_csv = load_classification_dataset(tmp_path / "labels.csv")
    (tmp_path / "labels.csv").unlink()
    from_folder = load_classification_dataset(tmp_path)
    assert from_folder.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(from_folder.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(from_csv.labels, from_folder.labels)
    batches = list(from_folder.batches(4))
    assert [len(b[0]) for b in batches] == [4, 2]
    assert batches[0][0] == list(from_csv.batches(4))[0][0]  # same bytes


def test_stratified_split_is_disjoint_and_keeps_class_mix():
    labels = np.repeat(np.arange(4), 25)
    parts = split_indices(labels, [0.6, 0.2, 0.2], seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert [np.bincount(labels[p]).tolist() for p in parts] == [[15] * 4, [5] * 4, [5] * 4]


def test_cli_writes_json_markdown_and_png_on_cifar_subset(model, tmp_path, cifar10_dir):
    CIFAR10 = cifar10_dir
    from keras_clip import evaluate

    preset = tmp_path / "preset"
    model.save_to_preset(str(preset))
    output = tmp_path / "out"
    evaluate.FLAGS([
        "evaluate", f"--preset={preset}", "--task=zero_shot", f"--dataset={CIFAR10}",
        "--templates=cifar10", "--select_templates", "--max_examples=60",
        f"--output_dir={output}",
        # The same images read as a class-folder tree: a "shift" of exactly zero.
        f"--shifted_datasets={CIFAR10 / 'images'}",
    ])
    try:
        evaluate.main([])
    finally:
        evaluate.FLAGS.unparse_flags()
    results = json.loads((output / "zero_shot.json").read_text())
    metrics = results["metrics"]
    confusion = np.array(metrics["confusion_matrix"])
    # The evaluation part of a stratified 20/80 split of the 60 examples (48 on CIFAR-10).
    subset = load_classification_dataset(CIFAR10, max_examples=60)
    evaluation_part = split_indices(subset.labels, [0.2, 0.8], seed=0)[1]
    assert metrics["num_examples"] == confusion.sum() == len(evaluation_part)
    assert metrics["top1"] == pytest.approx(100 * np.trace(confusion) / confusion.sum())
    selection = results["template_selection"]
    assert selection["evaluation"]["selected"] == pytest.approx(metrics["top1"])
    assert selection["evaluation"]["num_candidates"] == 18
    shift = results["distribution_shift"]
    entry = shift["shifted"][str(CIFAR10 / "images")]
    assert entry["top1"] == shift["in_distribution"]["top1"]
    assert entry["effective_robustness"] == 0.0 and "plain gap" in entry["definition"]
    markdown = (output / "zero_shot.md").read_text()
    assert "| top-1 (%) |" in markdown and "no baseline fit" in markdown
    for png in ("per_class_accuracy.png", "confusion_matrix.png"):
        data = (output / png).read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG")


@pytest.mark.parametrize("task", ["linear_probe", "retrieval"])
def test_other_tasks_write_reports(model, task, tmp_path, flickr8k_dir, mnist_dir):
    from keras_clip.evaluation.report import run_evaluation

    if task == "retrieval":
        flickr = flickr8k_dir
        dataset, data_dir, png = flickr / "captions.tsv", flickr / "images", "recall_at_k.png"
    else:
        dataset, data_dir, png = mnist_dir, None, "l2_sweep.png"
    results = run_evaluation(task, "tiny", str(dataset), data_dir=data_dir and str(data_dir),
                             output_dir=str(tmp_path), max_examples=40, batch_size=40,
                             verbose=0, model=model)
    written = json.loads((tmp_path / f"{task}.json").read_text())
    if task == "retrieval":
        assert written["num_images"] == 40 and written["num_captions"] == 200
        # Every caption's image is among all 40 images: R@40 is 100% by definition.
        assert written["recall_curve"]["text_to_image"]["40"] == 100.0
        assert results["recall_curve"]["text_to_image"][1] == pytest.approx(
            written["metrics"]["text_to_image_R@1"])
    else:
        assert written["num_train"] + written["num_val"] + written["num_test"] == 40
        assert written["test_accuracy"] == results["test_accuracy"]
    data = (tmp_path / png).read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG")
    assert (tmp_path / f"{task}.md").read_text().startswith(f"# {task} on ")


def test_tfds_source_streams_batches_and_never_downloads(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        load_classification_dataset("tfds:cifar10/test", data_dir=str(tmp_path))
    assert not any(tmp_path.rglob("*.tfrecord*"))  # nothing was fetched
    with tfds.testing.mock_data(num_examples=10):  # fake records, no files
        data = load_classification_dataset("tfds:cifar10/test", data_dir=str(tmp_path))
        batches = list(data.batches(4))
    assert len(data) == 10 and data.num_classes == 10
    assert [b[0].shape for b in batches] == [(4, 32, 32, 3)] * 2 + [(2, 32, 32, 3)]
    assert all(b[0].dtype == np.uint8 for b in batches)
