"""Linear probe: L2-regularised multinomial logistic regression on frozen features.

As in the CLIP paper (appendix A.3): a logistic regression fitted with L-BFGS
on frozen image features, with the L2 strength chosen on a validation split by
a sweep over a logarithmic grid. Differences from the paper: the paper uses
scikit-learn with 96 grid points from 1e-6 to 1e6 refined by a parametric
binary search; here the default grid is 13 points (one per decade) over the same
range, without refinement. The objective is
`mean cross-entropy + (l2 / 2) * ||W||^2` (the bias is not penalised; for
scikit-learn's `C`, `l2 = 1 / (C * N)`). After the sweep the classifier is
refitted on train + validation with the chosen strength (Kornblith et al., 2019,
whose protocol the paper follows); pass `refit_on_train_and_val=False` to keep
the train-only fit.
"""
import numpy as np
from absl import logging

from keras_clip.optional import import_optional

DEFAULT_L2_GRID = tuple(10.0 ** np.arange(-6, 7))


def _loss_and_grad(params, x, y_onehot, l2):
    num_features, num_classes = x.shape[1], y_onehot.shape[1]
    w = params[: num_features * num_classes].reshape(num_features, num_classes)
    b = params[num_features * num_classes:]
    logits = x @ w + b  # (N, C)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))  # (N, C)
    n = len(x)
    loss = -np.sum(y_onehot * log_probs) / n + 0.5 * l2 * np.sum(w * w)
    delta = (np.exp(log_probs) - y_onehot) / n  # (N, C)
    grad_w = x.T @ delta + l2 * w  # (D, C)
    grad_b = delta.sum(axis=0)  # (C,)
    return loss, np.concatenate([grad_w.ravel(), grad_b])


class LogisticRegression:
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS.

    Args:
        l2: float >= 0, the penalty `l2 / 2 * ||W||^2` added to the mean
            cross-entropy.
        max_iter: int, L-BFGS iterations.
        tolerance: float, L-BFGS gradient tolerance.

    Example:

    >>> clf = LogisticRegression(l2=1e-3).fit(features, labels, num_classes=10)
    >>> clf.predict(features).shape
    (N,)
    """

    def __init__(self, l2=0.0, max_iter=1000, tolerance=1e-6):
        if l2 < 0:
            raise ValueError(f"`l2` must be non-negative. Received: l2={l2}")
        self.l2 = l2
        self.max_iter = max_iter
        self.tolerance = tolerance
        self.weights = None  # (D, C)
        self.bias = None  # (C,)

    def fit(self, features, labels, num_classes=None, initial=None):
        """Fits on float `(N, D)` features and int `(N,)` labels; returns self.

        `initial` is an optional fitted `LogisticRegression` to warm-start from.
        """
        x = np.asarray(features, np.float64)
        labels = np.asarray(labels, np.int64)
        num_classes = num_classes or int(labels.max()) + 1
        y_onehot = np.eye(num_classes)[labels]  # (N, C)
        if initial is not None and initial.weights is not None:
            start = np.concatenate([initial.weights.ravel(), initial.bias])
        else:
            start = np.zeros(x.shape[1] * num_classes + num_classes)
        optimize = import_optional("scipy.optimize", "The linear probe (L-BFGS fit)")
        result = optimize.minimize(
            _loss_and_grad, start, args=(x, y_onehot, self.l2), jac=True, method="L-BFGS-B",
            options={"maxiter": self.max_iter, "gtol": self.tolerance},
        )
        split = x.shape[1] * num_classes
        self.weights = result.x[:split].reshape(x.shape[1], num_classes)
        self.bias = result.x[split:]
        return self

    def decision_function(self, features):
        """Class logits `(N, C)`."""
        return np.asarray(features, np.float64) @ self.weights + self.bias

    def predict(self, features):
        """Predicted labels, int64 `(N,)`."""
        return np.argmax(self.decision_function(features), axis=1)

    def accuracy(self, features, labels):
        """Top-1 accuracy in percent."""
        return 100.0 * float(np.mean(self.predict(features) == np.asarray(labels)))


def linear_probe(train, val, test, num_classes=None, l2_grid=DEFAULT_L2_GRID,
                 refit_on_train_and_val=True, max_iter=1000):
    """Chooses the L2 strength on `val`, reports top-1 on `test`.

    Args:
        train, val, test: `(features (N, D), labels (N,))` pairs. `test` is used
            only after the strength has been chosen.
        num_classes: int (defaults to 1 + the largest label seen).
        l2_grid: strengths to sweep; fitted from the largest to the smallest,
            each warm-started from the previous solution. Ties go to the larger
            (simpler) strength.
        refit_on_train_and_val: refit on train + val with the chosen strength.
        max_iter: L-BFGS iterations per fit.

    Returns:
        dict: `best_l2`, `val_accuracy` (dict strength -> percent), `train_accuracy`,
        `test_accuracy` (percents), `num_train`, `num_val`, `num_test`.
    """
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train, val, test
    num_classes = num_classes or int(max(np.max(y_train), np.max(y_val), np.max(y_test))) + 1
    grid = sorted((float(v) for v in l2_grid), reverse=True)
    val_accuracy, best_l2, best_accuracy, previous = {}, None, -1.0, None
    for l2 in grid:
        previous = LogisticRegression(l2, max_iter).fit(x_train, y_train, num_classes, previous)
        accuracy = previous.accuracy(x_val, y_val)
        val_accuracy[l2] = accuracy
        if accuracy > best_accuracy:
            best_l2, best_accuracy = l2, accuracy
        logging.info("Linear probe l2=%.0e: validation top-1 %.2f", l2, accuracy)
    if refit_on_train_and_val:
        x_fit = np.concatenate([x_train, x_val])
        y_fit = np.concatenate([y_train, y_val])
    else:
        x_fit, y_fit = x_train, y_train
    classifier = LogisticRegression(best_l2, max_iter).fit(x_fit, y_fit, num_classes)
    result = {
        "best_l2": best_l2,
        "val_accuracy": val_accuracy,
        "train_accuracy": classifier.accuracy(x_fit, y_fit),
        "test_accuracy": classifier.accuracy(x_test, y_test),
        "refit_on_train_and_val": refit_on_train_and_val,
        "num_train": int(len(y_train)), "num_val": int(len(y_val)), "num_test": int(len(y_test)),
    }
    logging.info("Linear probe: l2=%.0e, test top-1 %.2f", best_l2, result["test_accuracy"])
    return result
