"""Zero-shot vs few-shot: k-shot sampling, the crossing interpolation, probes recomputed."""
import json

import numpy as np
import pytest

from keras_clip.evaluation.datasets import LabelledImages, split_indices
from keras_clip.evaluation.linear_probe import linear_probe
from keras_clip.experiments import few_shot
from keras_clip.zero_shot import build_class_embeddings
from tests import harness


def test_sample_k_shot_takes_exactly_k_per_class_reproducibly():
    labels = np.repeat(np.arange(5), [7, 9, 16, 20, 3])[np.random.default_rng(0).permutation(55)]
    for k in (1, 2, 3):
        chosen = few_shot.sample_k_shot(labels, k, seed=4)
        assert np.bincount(labels[chosen], minlength=5).tolist() == [k] * 5
        assert len(np.unique(chosen)) == 5 * k  # without replacement
        np.testing.assert_array_equal(chosen, few_shot.sample_k_shot(labels, k, seed=4))
    draws = {tuple(few_shot.sample_k_shot(labels, 2, seed=s)) for s in range(5)}
    assert len(draws) > 1  # other seeds, other draws
    with pytest.raises(ValueError, match="Class 4 has 3 examples, fewer than k=4"):
        few_shot.sample_k_shot(labels, 4)
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        few_shot.sample_k_shot(labels, 0)


def test_zero_shot_worth_interpolates_in_log2_k():
    ks = [1, 2, 4, 8, 16]
    probe = [20.0, 30.0, 50.0, 70.0, 80.0]
    # 40 lies halfway between 30 (k=2) and 50 (k=4): log2 k = 1.5, k = 2 ** 1.5.
    worth = few_shot.zero_shot_worth(ks, probe, 40.0)
    assert worth == {"examples_per_class": pytest.approx(2.8284271247), "bound": "interpolated"}
    # A quarter of the way from 50 (k=4) to 70 (k=8): 2 ** 2.25.
    assert few_shot.zero_shot_worth(ks, probe, 55.0)["examples_per_class"] == \
        pytest.approx(4.7568284600)
    assert few_shot.zero_shot_worth(ks, probe, 70.0)["examples_per_class"] == pytest.approx(8.0)
    assert few_shot.zero_shot_worth(ks, probe, 20.0)["examples_per_class"] == 1.0
    assert few_shot.zero_shot_worth(ks, probe, 10.0) == {"examples_per_class": None,
                                                         "bound": "below_smallest_k"}
    assert few_shot.zero_shot_worth(ks, probe, 85.0) == {"examples_per_class": None,
                                                         "bound": "above_largest_k"}
    # A dip after the first crossing does not move it.
    assert few_shot.zero_shot_worth(ks, [20, 30, 50, 45, 80], 40.0)["examples_per_class"] == \
        pytest.approx(2 ** 1.5)
    with pytest.raises(ValueError, match="`ks` must be increasing"):
        few_shot.zero_shot_worth([2, 1], [1, 2], 1.5)


def test_curve_and_zero_shot_match_direct_recomputation(tmp_path):
    model = harness.perturb_weights(harness.tiny_clip(), seed=2)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    classes = build_class_embeddings(model, harness.CIFAR10_CLASSES, templates)
    # Image embeddings near their class's text embedding (no image encoding: fast).
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 6)
    noisy = classes[labels] + 0.3 * rng.normal(size=(60, classes.shape[1]))
    images = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    dataset = LabelledImages("synthetic", harness.CIFAR10_CLASSES, labels,
                             lambda indices: None, "synthetic")
    grid = (1e-2, 1.0)
    results = few_shot.run(model, dataset, templates, str(tmp_path / "out"), tag="t",
                           ks=(1, 2), seeds=(0, 1), fractions=(0.5, 1 / 6, 1 / 3),
                           split_seed=1, l2_grid=grid, image_embeddings=images)
    pool, val, test = split_indices(dataset.labels, (0.5, 1 / 6, 1 / 3), seed=1)
    assert (results["num_pool"], results["num_val"], results["num_test"]) == (30, 10, 20)
    # Zero-shot: numpy arg-max over the ensembled class embeddings on the test part.
    expected = 100.0 * np.mean(np.argmax(images[test] @ classes.T, 1) == dataset.labels[test])
    assert results["zero_shot_top1"] == pytest.approx(expected)
    # Each k-shot entry: the probe fitted directly on that draw's pool examples.
    for k in (1, 2):
        direct = []
        for seed in (0, 1):
            chosen = pool[few_shot.sample_k_shot(dataset.labels[pool], k, seed, 10)]
            direct.append(linear_probe(
                (images[chosen], dataset.labels[chosen]), (images[val], dataset.labels[val]),
                (images[test], dataset.labels[test]), num_classes=10, l2_grid=grid,
                refit_on_train_and_val=False)["test_accuracy"])
        assert results["few_shot"][k]["test_accuracy"] == pytest.approx(direct)
        assert results["few_shot"][k]["mean"] == pytest.approx(np.mean(direct))
    means = [results["few_shot"][k]["mean"] for k in (1, 2)]
    assert results["zero_shot_worth"] == few_shot.zero_shot_worth([1, 2], means, expected)
    written = json.loads((tmp_path / "out" / "few_shot_t.json").read_text())
    assert written["few_shot"]["2"]["mean"] == pytest.approx(means[1])
    table = (tmp_path / "out" / "few_shot_t.md").read_text()
    assert f"| 2-shot linear probe | {means[1]:.2f} |" in table
    assert (tmp_path / "out" / "few_shot_t.png").read_bytes().startswith(b"\x89PNG")
