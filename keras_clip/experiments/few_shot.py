"""Zero-shot versus few-shot linear probes on the same features (the paper's Figures 6-7).

The dataset is split (stratified) into a labelled pool, a validation part and a
test part. For every k in `ks` and every seed, `sample_k_shot` draws exactly k
pool examples per class; a linear probe (`keras_clip.evaluation.linear_probe`:
L2 logistic regression with L-BFGS on the frozen, unit-norm image embeddings) is
fitted on them, its L2 strength chosen on the validation part, and it is scored
on the test part. Zero-shot uses the same image embeddings and the same test
part. `zero_shot_worth` reads off the number of labelled examples per class at
which the mean probe curve reaches zero-shot accuracy (the paper's Figure 7).

Deviations from the paper: the probe's L2 strength is chosen on a labelled
validation part that is not counted in k (the paper's few-shot probes were also
tuned on validation data, which flatters small k); the crossing is interpolated
linearly in log2(k) between the two k that bracket zero-shot accuracy (the
paper does not give its interpolation); one dataset at a time.
"""
import math

import numpy as np
from absl import logging

from keras_clip.evaluation import linear_probe as linear_probe_lib
from keras_clip.evaluation.datasets import split_indices
from keras_clip.evaluation.zero_shot_eval import classification_metrics
from keras_clip.experiments import common

DEFAULT_KS = (1, 2, 4, 8, 16)
DEFAULT_FRACTIONS = (0.5, 0.1, 0.4)


def sample_k_shot(labels, k, seed=0, num_classes=None):
    """Indices of exactly `k` examples of every class, drawn without replacement.

    Args:
        labels: int `(N,)`.
        k: int >= 1, examples per class.
        seed: int; the same seed and labels give the same indices.
        num_classes: int (defaults to 1 + the largest label); every class in
            `range(num_classes)` must have at least `k` examples.

    Returns:
        sorted int64 `(num_classes * k,)` indices into `labels`.

    Raises:
        ValueError: for `k < 1` or a class with fewer than `k` examples.
    """
    labels = np.asarray(labels, np.int64)
    if int(k) != k or k < 1:
        raise ValueError(f"`k` must be a positive integer. Received: k={k!r}")
    num_classes = num_classes or int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) < k:
            raise ValueError(f"Class {label} has {len(members)} examples, fewer than k={k}.")
        chosen.append(rng.choice(members, size=int(k), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def zero_shot_worth(ks, probe_accuracies, zero_shot_accuracy):
    """Labelled examples per class at which the probe curve reaches zero-shot accuracy.

    The first k whose probe accuracy is >= zero-shot is found; between it and the
    previous k the curve is linear in log2(k), so
    `k* = 2 ** (log2 k0 + (zs - a0) / (a1 - a0) * (log2 k1 - log2 k0))`.

    Args:
        ks: increasing positive ints.
        probe_accuracies: the probe's accuracy at each k (percent).
        zero_shot_accuracy: float, percent.

    Returns:
        dict: `examples_per_class` (float, or None outside the measured range) and
        `bound`: `"interpolated"`, `"below_smallest_k"` (the probe already beats
        zero-shot at the smallest k: zero-shot is worth fewer than `ks[0]`
        examples) or `"above_largest_k"` (zero-shot is worth more than `ks[-1]`).
    """
    ks = [float(k) for k in ks]
    accuracies = [float(a) for a in probe_accuracies]
    if len(ks) != len(accuracies) or not ks or any(b <= a for a, b in zip(ks, ks[1:])) \
            or ks[0] <= 0:
        raise ValueError("`ks` must be increasing positive numbers, one per accuracy. "
                         f"Received: ks={ks}, probe_accuracies={accuracies}")
    zs = float(zero_shot_accuracy)
    if accuracies[0] >= zs:
        bound = "interpolated" if accuracies[0] == zs else "below_smallest_k"
        return {"examples_per_class": ks[0] if bound == "interpolated" else None, "bound": bound}
    for i in range(1, len(ks)):
        if accuracies[i] >= zs:
            fraction = (zs - accuracies[i - 1]) / (accuracies[i] - accuracies[i - 1])
            log_k = math.log2(ks[i - 1]) + fraction * (math.log2(ks[i]) - math.log2(ks[i - 1]))
            return {"examples_per_class": 2.0 ** log_k, "bound": "interpolated"}
    return {"examples_per_class": None, "bound": "above_largest_k"}


def few_shot_curve(pool, val, test, ks=DEFAULT_KS, seeds=(0, 1, 2), num_classes=None,
                   l2_grid=linear_probe_lib.DEFAULT_L2_GRID, max_iter=1000):
    """k-shot linear-probe test accuracy for every k, over several k-shot draws.

    Args:
        pool, val, test: `(embeddings (N, E), labels (N,))`. k-shot examples come
            from `pool`; `val` chooses the L2 strength; `test` scores.
        ks: examples per class.
        seeds: one k-shot draw (`sample_k_shot(..., seed)`) per seed.
        num_classes: int (defaults to 1 + the largest label).
        l2_grid, max_iter: passed to `linear_probe`.

    Returns:
        dict k -> `{"test_accuracy": [per seed], "mean", "std", "best_l2": [per seed]}`.
    """
    (x_pool, y_pool), (x_val, y_val), (x_test, y_test) = pool, val, test
    num_classes = num_classes or int(max(np.max(y_pool), np.max(y_val), np.max(y_test))) + 1
    curve = {}
    for k in ks:
        accuracies, strengths = [], []
        for seed in seeds:
            chosen = sample_k_shot(y_pool, k, seed, num_classes)
            result = linear_probe_lib.linear_probe(
                (x_pool[chosen], y_pool[chosen]), (x_val, y_val), (x_test, y_test),
                num_classes=num_classes, l2_grid=l2_grid, refit_on_train_and_val=False,
                max_iter=max_iter)
            accuracies.append(result["test_accuracy"])
            strengths.append(result["best_l2"])
        curve[int(k)] = {"test_accuracy": accuracies, "mean": float(np.mean(accuracies)),
                         "std": float(np.std(accuracies)), "best_l2": strengths}
        logging.info("%d-shot probe: test top-1 %.2f +- %.2f over %d draws", k,
                     curve[int(k)]["mean"], curve[int(k)]["std"], len(seeds))
    return curve


def compare_zero_shot_and_few_shot(model, dataset, templates, ks=DEFAULT_KS, seeds=(0, 1, 2),
                                   fractions=DEFAULT_FRACTIONS, split_seed=0,
                                   l2_grid=linear_probe_lib.DEFAULT_L2_GRID, batch_size=64,
                                   cache_dir=None, image_embeddings=None, verbose=0):
    """Zero-shot and k-shot probes of `model` on one dataset, on the same test part.

    Args:
        model: a `keras_clip.CLIP`.
        dataset: a `LabelledImages`.
        templates: zero-shot prompt templates (ensembled).
        ks, seeds, l2_grid: as in `few_shot_curve`.
        fractions: stratified (pool, validation, test) fractions.
        split_seed: seed of that split.
        batch_size, cache_dir, verbose: as in `encode_dataset`.
        image_embeddings: optional precomputed `(N, E)`.

    Returns:
        dict: `zero_shot_top1`, `few_shot` (the `few_shot_curve`), `zero_shot_worth`
        (`zero_shot_worth` of the mean curve), sizes and settings.
    """
    from keras_clip.evaluation.zero_shot_eval import encode_dataset
    from keras_clip.zero_shot import build_class_embeddings

    if image_embeddings is None:
        image_embeddings = encode_dataset(model, dataset, batch_size, cache_dir, verbose)
    image_embeddings = np.asarray(image_embeddings, np.float32)
    labels = dataset.labels
    pool_idx, val_idx, test_idx = split_indices(labels, fractions, seed=split_seed)
    class_embeddings = build_class_embeddings(model, dataset.class_names, templates)
    zero_shot_top1 = classification_metrics(
        image_embeddings[test_idx] @ class_embeddings.T, labels[test_idx],
        dataset.num_classes, ks=(1,))["top1"]
    logging.info("Zero-shot test top-1 %.2f (%d templates)", zero_shot_top1, len(templates))
    part = lambda idx: (image_embeddings[idx], labels[idx])
    curve = few_shot_curve(part(pool_idx), part(val_idx), part(test_idx), ks, seeds,
                           dataset.num_classes, l2_grid)
    worth = zero_shot_worth(list(curve), [curve[k]["mean"] for k in curve], zero_shot_top1)
    return {"dataset": dataset.name, "num_classes": dataset.num_classes,
            "zero_shot_top1": zero_shot_top1, "templates": [t for t in templates
                                                            if isinstance(t, str)],
            "few_shot": curve, "zero_shot_worth": worth, "ks": [int(k) for k in ks],
            "seeds": list(seeds), "l2_grid": [float(v) for v in l2_grid],
            "num_pool": int(len(pool_idx)), "num_val": int(len(val_idx)),
            "num_test": int(len(test_idx))}


def _worth_text(worth, ks):
    if worth["bound"] == "below_smallest_k":
        return f"fewer than {ks[0]} labelled example{'' if ks[0] == 1 else 's'} per class"
    if worth["bound"] == "above_largest_k":
        return f"more than {ks[-1]} labelled examples per class"
    return f"{worth['examples_per_class']:.2f} labelled examples per class"


def markdown(results):
    """Zero-shot and the k-shot curve as a Markdown table."""
    lines = [f"Test top-1 on {results['dataset']} ({results['num_test']} test images, "
             f"{len(results['seeds'])} k-shot draws per k; L2 chosen on {results['num_val']} "
             "validation images).", "",
             "| classifier | top-1 (%) | std over draws |", "|---|---:|---:|",
             f"| zero-shot ({len(results['templates'])} templates) | "
             f"{results['zero_shot_top1']:.2f} | |"]
    for k, entry in results["few_shot"].items():
        lines.append(f"| {k}-shot linear probe | {entry['mean']:.2f} | {entry['std']:.2f} |")
    lines += ["", "Zero-shot is worth " + _worth_text(results["zero_shot_worth"], results["ks"])
              + " (log2-linear interpolation of the mean probe curve)."]
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Probe accuracy against k (log2 axis) with the zero-shot level, written to `path`."""
    plt = common.pyplot()
    ks = [int(k) for k in results["few_shot"]]
    means = np.array([results["few_shot"][k]["mean"] for k in ks])
    stds = np.array([results["few_shot"][k]["std"] for k in ks])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, means, "o-", label="k-shot linear probe")
    ax.fill_between(ks, means - stds, means + stds, alpha=0.2)
    ax.axhline(results["zero_shot_top1"], color="C3", linestyle="--", label="zero-shot")
    worth = results["zero_shot_worth"]
    if worth["examples_per_class"] is not None:
        ax.axvline(worth["examples_per_class"], color="gray", linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, labels=[str(k) for k in ks])
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Zero-shot vs few-shot: {results['dataset']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(model, dataset, templates, output_dir, tag=None, make_plot=True, **kwargs):
    """`compare_zero_shot_and_few_shot`, then `few_shot_<tag>.json`, `.md`, `.png`."""
    results = compare_zero_shot_and_few_shot(model, dataset, templates, **kwargs)
    return common.write_outputs(results, output_dir, f"few_shot_{tag or dataset.name}", markdown,
                                plot if make_plot else None)
