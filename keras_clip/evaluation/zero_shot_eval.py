"""Zero-shot classification metrics, cached image embeddings and distribution shift.

- `classification_metrics`: top-1 / top-k accuracy, mean per-class accuracy (the
  metric the CLIP paper reports for e.g. Pets, Caltech-101, Flowers), per-class
  accuracy and the confusion matrix, from class scores.
- `encode_dataset`: image embeddings of a `LabelledImages`, cached on disk in an
  `.npz` keyed by a hash of the image tower's weights, the dataset's fingerprint
  and the preprocessing config, so re-running with other templates only encodes
  text.
- `evaluate_zero_shot`: the two above plus `build_class_embeddings`.
- `effective_robustness` / `fit_logit_baseline` / `evaluate_distribution_shift`:
  Taori et al. (2020) effective robustness, as used in the CLIP paper (section
  3.3): shifted accuracy minus the shifted accuracy a baseline linear fit in
  logit space predicts from the in-distribution accuracy.
"""
import hashlib
import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_clip.evaluation.retrieval import encode_images
from keras_clip.zero_shot import DEFAULT_TEMPLATES, build_class_embeddings


def classification_metrics(scores, labels, num_classes=None, ks=(1, 5)):
    """Accuracy metrics from class scores, in percent.

    Args:
        scores: float `(N, C)`; higher is more likely.
        labels: int `(N,)` in `[0, C)`.
        num_classes: int C (defaults to `scores.shape[1]`).
        ks: top-k values; k larger than C counts every example as a hit.

    Returns:
        dict: `top{k}` (percent) for every k, `mean_per_class_accuracy` (percent,
        mean over classes present in `labels`), `per_class_accuracy` (list of C
        percents, NaN for absent classes), `confusion_matrix` (C x C list of ints,
        row = true class, column = predicted class), `num_examples`.

    Ties in top-k: a class counts as within the top k if fewer than k classes score
    strictly higher than it.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, np.int64)
    num_classes = num_classes or scores.shape[1]
    if scores.ndim != 2 or scores.shape != (len(labels), num_classes):
        raise ValueError(
            f"`scores` must have shape (N, C) = ({len(labels)}, {num_classes}). "
            f"Received: shape={scores.shape}"
        )
    true_scores = scores[np.arange(len(labels)), labels]  # (N,)
    rank = np.sum(scores > true_scores[:, None], axis=1)  # (N,) 0 = top
    metrics = {f"top{k}": 100.0 * float(np.mean(rank < k)) for k in ks}
    predictions = np.argmax(scores, axis=1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = 100.0 * np.diag(confusion) / support
    metrics["mean_per_class_accuracy"] = float(np.nanmean(per_class))
    metrics["per_class_accuracy"] = [float(x) for x in per_class]
    metrics["confusion_matrix"] = confusion.tolist()
    metrics["num_examples"] = int(len(labels))
    return metrics


def _weights_digest(layer):
    digest = hashlib.sha256()
    for weight in layer.weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def embedding_cache_key(model, dataset):
    """Hex key for the image embeddings of `dataset` under `model`.

    It hashes the image tower's weights (`model.visual`; the text tower does not
    change image embeddings), the dataset fingerprint and the preprocessing
    config (image size and the preprocessor layer's config).
    """
    preprocessing = model.image_preprocessor().get_config()
    preprocessing.pop("name", None)
    parts = {
        "weights": _weights_digest(getattr(model, "visual", model)),
        "dataset": dataset.fingerprint,
        "preprocessing": json.dumps(preprocessing, sort_keys=True, default=str),
        "image_size": int(model.image_size),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def encode_dataset(model, dataset, batch_size=64, cache_dir=None, verbose=1):
    """Unit-norm image embeddings of every example of `dataset`, optionally cached.

    Args:
        model: a `keras_clip.CLIP`.
        dataset: a `keras_clip.evaluation.datasets.LabelledImages`.
        batch_size: int, images per forward pass.
        cache_dir: optional folder; embeddings are read from / written to
            `<cache_dir>/<embedding_cache_key>.npz`.
        verbose: 1 shows a `keras.utils.Progbar`, 0 is silent.

    Returns:
        float32 numpy `(N, E)`.
    """
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"{embedding_cache_key(model, dataset)}.npz")
        if os.path.isfile(path):
            with np.load(path) as cached:
                if np.array_equal(cached["labels"], dataset.labels):
                    logging.info("Image embeddings of %s read from cache %s", dataset.name, path)
                    return cached["embeddings"]
    preprocessor = model.image_preprocessor()  # one per model: traced graphs are reused
    progress = keras.utils.Progbar(len(dataset), verbose=verbose, unit_name="image")
    chunks = []
    for images, _ in dataset.batches(batch_size):
        if isinstance(images, (list, tuple)):
            images = tf.constant(list(images), dtype=tf.string)  # encoded bytes
        pixels = preprocessor(tf.convert_to_tensor(images))  # (n, S, S, 3)
        # Float pixels pass through `encode_images` without a second preprocessor.
        chunks.append(encode_images(model, pixels, batch_size=batch_size))  # (n, E)
        progress.add(len(chunks[-1]))
    embeddings = (np.concatenate(chunks) if chunks
                  else np.zeros((0, model.embed_dim), np.float32))
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        temporary = path[: -len(".npz")] + ".tmp.npz"
        np.savez(temporary, embeddings=embeddings, labels=dataset.labels)
        os.replace(temporary, path)  # readers never see a half-written file
        logging.info("Cached image embeddings of %s at %s", dataset.name, path)
    return embeddings


def zero_shot_scores(image_embeddings, class_embeddings):
    """Cosine similarities `(N, C)` of unit-norm image and class embeddings."""
    return np.asarray(image_embeddings, np.float32) @ np.asarray(class_embeddings, np.float32).T


def evaluate_zero_shot(model, dataset, templates=DEFAULT_TEMPLATES, class_names=None,
                       batch_size=64, cache_dir=None, image_embeddings=None,
                       class_embeddings=None, ks=(1, 5), verbose=1):
    """Zero-shot accuracy of `model` on a labelled dataset.

    Args:
        model: a `keras_clip.CLIP`.
        dataset: a `LabelledImages`.
        templates: prompt templates, ensembled as in `build_class_embeddings`.
        class_names: names used in prompts (defaults to `dataset.class_names`).
        batch_size: int, images per forward pass.
        cache_dir: optional image-embedding cache folder (see `encode_dataset`).
        image_embeddings: optional precomputed `(N, E)`; skips image encoding.
        class_embeddings: optional precomputed `(C, E)`; skips text encoding.
        ks: top-k values.
        verbose: progress bar on (1) or off (0).

    Returns:
        The dict of `classification_metrics`, plus `templates` and `class_names`.
    """
    class_names = list(class_names or dataset.class_names)
    if image_embeddings is None:
        image_embeddings = encode_dataset(model, dataset, batch_size, cache_dir, verbose)
    if class_embeddings is None:
        class_embeddings = build_class_embeddings(model, class_names, templates)
    metrics = classification_metrics(
        zero_shot_scores(image_embeddings, class_embeddings), dataset.labels,
        len(class_names), ks=ks,
    )
    metrics["class_names"] = class_names
    metrics["templates"] = [t for t in templates if isinstance(t, str)]
    logging.info("Zero-shot on %s (%d images): top1 %.2f, mean per class %.2f", dataset.name,
                 len(dataset), metrics["top1"], metrics["mean_per_class_accuracy"])
    return metrics


# ----------------------------------------------------------------------------------
# Distribution shift / effective robustness
# ----------------------------------------------------------------------------------

def _logit(p):
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def fit_logit_baseline(in_distribution_accuracies, shifted_accuracies):
    """Least-squares line `logit(shifted) = slope * logit(in_dist) + intercept`.

    Fit it on baseline models (in Taori et al. / the CLIP paper: ImageNet models
    trained on ImageNet) evaluated on both sets.

    Args:
        in_distribution_accuracies, shifted_accuracies: sequences of accuracies in
            percent, one pair per baseline model (at least two models).

    Returns:
        dict with `slope` and `intercept` (in logit space).
    """
    x = _logit(np.asarray(in_distribution_accuracies, np.float64) / 100.0)
    y = _logit(np.asarray(shifted_accuracies, np.float64) / 100.0)
    if x.shape != y.shape or x.size < 2:
        raise ValueError("Need at least two baseline models with both accuracies. "
                         f"Received: {x.size} and {y.size} accuracies")
    slope, intercept = np.polyfit(x, y, 1)
    return {"slope": float(slope), "intercept": float(intercept)}


def effective_robustness(in_distribution_accuracy, shifted_accuracy, baseline_fit=None):
    """Effective robustness (Taori et al., 2020) of one model on one shifted set.

    `ER = acc_shift - sigmoid(slope * logit(acc_in) + intercept)`: how far above the
    baseline models' trend line the model lies. Without `baseline_fit` this
    returns the plain gap `acc_shift - acc_in` and says so in `definition`.

    Args:
        in_distribution_accuracy, shifted_accuracy: floats, percent.
        baseline_fit: optional dict `{"slope", "intercept"}` (`fit_logit_baseline`).

    Returns:
        dict: `effective_robustness` (percentage points; the plain gap when no
        fit is given), `predicted_shifted_accuracy` (percent or None) and
        `definition` (str).
    """
    if baseline_fit is None:
        return {
            "effective_robustness": float(shifted_accuracy - in_distribution_accuracy),
            "predicted_shifted_accuracy": None,
            "definition": "no baseline fit given: plain gap, shifted minus in-distribution "
                          "accuracy (NOT effective robustness)",
        }
    slope, intercept = baseline_fit["slope"], baseline_fit["intercept"]
    z = slope * _logit(in_distribution_accuracy / 100.0) + intercept
    predicted = 100.0 / (1.0 + np.exp(-z))
    return {
        "effective_robustness": float(shifted_accuracy - predicted),
        "predicted_shifted_accuracy": float(predicted),
        "definition": "shifted accuracy minus the baseline logit-linear fit's prediction "
                      f"(slope={slope:.4g}, intercept={intercept:.4g})",
    }


def evaluate_distribution_shift(model, in_distribution, shifted, templates=DEFAULT_TEMPLATES,
                                baseline_fit=None, batch_size=64, cache_dir=None, verbose=1):
    """Zero-shot top-1 on an in-distribution set and shifted sets with the same classes.

    Args:
        model: a `keras_clip.CLIP`.
        in_distribution: a `LabelledImages`.
        shifted: dict name -> `LabelledImages` whose `class_names` equal
            `in_distribution.class_names`.
        templates: prompt templates (one class embedding matrix serves all sets).
        baseline_fit: optional `{"slope", "intercept"}` (see `effective_robustness`).
        batch_size, cache_dir, verbose: as for `encode_dataset`.

    Returns:
        dict: `in_distribution` (`{"name", "top1"}`) and `shifted`, a dict name ->
        `{"top1", "effective_robustness", "predicted_shifted_accuracy", "definition"}`.
    """
    class_names = in_distribution.class_names
    for name, data in shifted.items():
        if data.class_names != class_names:
            raise ValueError(f"Shifted set {name!r} must have the in-distribution classes.")
    class_embeddings = build_class_embeddings(model, class_names, templates)

    def top1(data):
        return evaluate_zero_shot(model, data, templates, batch_size=batch_size,
                                  cache_dir=cache_dir, class_embeddings=class_embeddings,
                                  verbose=verbose)["top1"]

    in_accuracy = top1(in_distribution)
    result = {"in_distribution": {"name": in_distribution.name, "top1": in_accuracy},
              "shifted": {}}
    for name, data in shifted.items():
        accuracy = top1(data)
        result["shifted"][name] = {"top1": accuracy,
                                   **effective_robustness(in_accuracy, accuracy, baseline_fit)}
    return result
