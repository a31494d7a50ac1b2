"""Linear probe: exact gradients, separable data, L2 chosen on validation, CIFAR-10 features."""
import numpy as np
import pytest

from keras_clip.evaluation.datasets import load_classification_dataset, split_indices
from keras_clip.evaluation.linear_probe import LogisticRegression, _loss_and_grad, linear_probe
from keras_clip.evaluation.zero_shot_eval import encode_dataset
from tests import harness


def _blobs(n_per_class, num_classes, dim, spread, seed):
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), n_per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 4)), rng.integers(0, 3, 7)
    params = rng.normal(size=4 * 3 + 3)
    loss, grad = _loss_and_grad(params, x, np.eye(3)[y], 0.3)
    # Reference loss written directly from the definition.
    w, b = params[:12].reshape(4, 3), params[12:]
    logits = x @ w + b
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert loss == pytest.approx(-log_probs[np.arange(7), y].mean() + 0.15 * np.sum(w * w))
    eps = 1e-6
    numeric = [(_loss_and_grad(params + eps * e, x, np.eye(3)[y], 0.3)[0]
                - _loss_and_grad(params - eps * e, x, np.eye(3)[y], 0.3)[0]) / (2 * eps)
               for e in np.eye(len(params))]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_fit_reaches_the_regularised_optimum():
    x, y = _blobs(30, 3, 5, spread=2.0, seed=1)
    model = LogisticRegression(l2=0.1).fit(x, y)
    params = np.concatenate([model.weights.ravel(), model.bias])
    _, grad = _loss_and_grad(params, x, np.eye(3)[y], 0.1)
    assert np.max(np.abs(grad)) < 1e-5  # stationary point of a strictly convex objective


def test_near_perfect_on_separable_toy_problem():
    x, y = _blobs(40, 4, 8, spread=0.3, seed=0)
    train, val, test = split_indices(y, [0.5, 0.25, 0.25], seed=0)
    result = linear_probe((x[train], y[train]), (x[val], y[val]), (x[test], y[test]))
    assert result["test_accuracy"] == 100.0
    assert result["train_accuracy"] == 100.0


def test_regularisation_strength_is_chosen_on_validation():
    """Overlapping, imbalanced classes: a huge penalty predicts the majority class."""
    rng = np.random.default_rng(2)
    centres = 3.0 * rng.normal(size=(4, 6))
    y = np.repeat(np.arange(4), [60, 20, 20, 20])
    x = centres[y] + 2.0 * rng.normal(size=(len(y), 6))
    train, val, test = [(x[i], y[i]) for i in split_indices(y, [0.4, 0.3, 0.3], seed=0)]
    grid = 10.0 ** np.arange(-3, 4)
    result = linear_probe(train, val, test, l2_grid=grid, refit_on_train_and_val=False)
    # Reference: independent cold-started fits, validation accuracy, arg-max with
    # ties to the stronger penalty.
    reference = {l2: LogisticRegression(l2).fit(*train, num_classes=4).accuracy(*val)
                 for l2 in grid}
    assert result["val_accuracy"] == pytest.approx(reference)
    best = max(reference.values())
    assert result["best_l2"] == max(l2 for l2, a in reference.items() if a == best)
    # A huge penalty leaves only the (unpenalised) bias: validation rejects it.
    assert reference[1000.0] == pytest.approx(50.0)  # the majority class's share
    assert result["best_l2"] == 1.0 and best > reference[1000.0] + 30
    # The test split plays no part in the choice.
    shuffled = (test[0], np.random.default_rng(0).permutation(test[1]))
    again = linear_probe(train, val, shuffled, l2_grid=grid, refit_on_train_and_val=False)
    assert again["best_l2"] == result["best_l2"]
    assert again["val_accuracy"] == result["val_accuracy"]


def test_probe_on_cifar10_features_beats_chance(cifar10_dir):
    model = harness.tiny_clip(seed=0)  # a random-weight CLIP: features still carry colour
    data = load_classification_dataset(cifar10_dir, max_examples=400, seed=0)
    features = encode_dataset(model, data, batch_size=100, verbose=0)
    parts = split_indices(data.labels, [0.5, 0.25, 0.25], seed=0)
    train, val, test = [(features[i], data.labels[i]) for i in parts]
    result = linear_probe(train, val, test, num_classes=10, l2_grid=10.0 ** np.arange(-5, 2))
    # 99 test images, chance 10%: P(>= 20 right | chance) < 0.2%. (31.3% measured.)
    assert result["test_accuracy"] >= 20.0, result
