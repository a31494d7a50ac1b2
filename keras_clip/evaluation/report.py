"""Evaluation runs and their reports: JSON, a Markdown table and PNG plots.

`run_evaluation` is the library function behind `python -m keras_clip.evaluate`:
it loads a model and data, runs one task (`zero_shot`, `retrieval` or
`linear_probe`) and writes into `output_dir`:

- `<task>.json`: every number computed;
- `<task>.md`: the headline numbers as a Markdown table;
- PNGs: per-class accuracy bars and the confusion matrix (zero-shot), recall@K
  curves (retrieval), validation accuracy over the L2 grid (linear probe).
"""
import json
import os

import numpy as np
from absl import logging

from keras_clip.evaluation import datasets as datasets_lib
from keras_clip.evaluation import linear_probe as linear_probe_lib
from keras_clip.evaluation import template_selection
from keras_clip.evaluation import zero_shot_eval
from keras_clip.optional import import_optional
from keras_clip.zero_shot import build_class_embeddings, resolve_templates

TASKS = ("zero_shot", "retrieval", "linear_probe")


# ----------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend)
# ----------------------------------------------------------------------------------

def _pyplot():
    matplotlib = import_optional("matplotlib", "Evaluation plots")
    matplotlib.use("Agg")
    return import_optional("matplotlib.pyplot", "Evaluation plots")


def plot_per_class_accuracy(per_class_accuracy, class_names, path, title="Per-class accuracy"):
    """Horizontal bar chart of per-class accuracy (percent) written to `path`."""
    plt = _pyplot()
    height = max(3.0, 0.25 * len(class_names) + 1)
    fig, ax = plt.subplots(figsize=(6, height))
    ax.barh(np.arange(len(class_names)), np.nan_to_num(per_class_accuracy))
    ax.set_yticks(np.arange(len(class_names)), labels=class_names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(confusion, class_names, path, title="Confusion matrix"):
    """Row-normalised confusion matrix (true class x predicted class) written to `path`."""
    plt = _pyplot()
    confusion = np.asarray(confusion, np.float64)
    rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = min(12.0, max(4.0, 0.35 * len(class_names) + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if len(class_names) <= 40:
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, labels=class_names, rotation=90, fontsize=7)
        ax.set_yticks(ticks, labels=class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_recall_curve(recall_at_k, path, title="Recall@K"):
    """Recall@K curves; `recall_at_k` maps a direction name to `{k: percent}`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for direction, points in recall_at_k.items():
        ks = sorted(int(k) for k in points)
        ax.plot(ks, [points[k] for k in ks], marker="o", label=direction)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_l2_sweep(val_accuracy, best_l2, path):
    """Validation accuracy over the L2 grid of a linear probe."""
    plt = _pyplot()
    strengths = sorted(val_accuracy)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(strengths, [val_accuracy[s] for s in strengths], marker="o")
    ax.axvline(best_l2, color="grey", linestyle="--", label=f"chosen {best_l2:.0e}")
    ax.set_xscale("log")
    ax.set_xlabel("L2 strength")
    ax.set_ylabel("validation top-1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------

def markdown_table(rows, header=("metric", "value")):
    """A Markdown table from `(name, value)` pairs; floats get two decimals."""
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _headline_rows(task, results):
    if task == "zero_shot":
        metrics = results["metrics"]
        rows = [("top-1 (%)", metrics["top1"]), ("top-5 (%)", metrics.get("top5", "")),
                ("mean per-class accuracy (%)", metrics["mean_per_class_accuracy"]),
                ("images", metrics["num_examples"]), ("templates", len(metrics["templates"]))]
        if "template_selection" in results:
            comparison = results["template_selection"]["evaluation"]
            rows += [("selected templates", comparison["num_selected"]),
                     ("top-1 selected (%)", comparison["selected"]),
                     ("top-1 default template (%)", comparison["default_template"]),
                     ("top-1 full ensemble (%)", comparison["full_ensemble"]),
                     ("gain over default (pp)", comparison["gain_over_default"]),
                     ("gain over full ensemble (pp)", comparison["gain_over_full_ensemble"])]
        for name, entry in results.get("distribution_shift", {}).get("shifted", {}).items():
            kind = "effective robustness" if entry["predicted_shifted_accuracy"] is not None \
                else "gap to in-distribution, no baseline fit"
            rows += [(f"{name}: top-1 (%)", entry["top1"]),
                     (f"{name}: {kind} (pp)", entry["effective_robustness"])]
        return rows
    if task == "retrieval":
        return [(k, v) for k, v in results["metrics"].items()]
    return [("test top-1 (%)", results["test_accuracy"]),
            ("chosen L2", f"{results['best_l2']:.0e}"),
            ("train / val / test", f"{results['num_train']} / {results['num_val']} / "
                                   f"{results['num_test']}")]


def write_report(task, results, output_dir):
    """Writes `<task>.json`, `<task>.md` and the task's PNGs; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, f"{task}.json"),
             "markdown": os.path.join(output_dir, f"{task}.md")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2, default=float)
    title = f"{task} on {results.get('dataset', '')}".strip()
    with open(paths["markdown"], "w") as f:
        f.write(f"# {title}\n\nModel: `{results.get('preset', '')}`\n\n")
        f.write(markdown_table(_headline_rows(task, results)))
    if task == "zero_shot":
        metrics = results["metrics"]
        paths["per_class_png"] = os.path.join(output_dir, "per_class_accuracy.png")
        plot_per_class_accuracy(metrics["per_class_accuracy"], metrics["class_names"],
                                paths["per_class_png"])
        paths["confusion_png"] = os.path.join(output_dir, "confusion_matrix.png")
        plot_confusion_matrix(metrics["confusion_matrix"], metrics["class_names"],
                              paths["confusion_png"])
    elif task == "retrieval":
        paths["recall_png"] = os.path.join(output_dir, "recall_at_k.png")
        plot_recall_curve(results["recall_curve"], paths["recall_png"])
    else:
        paths["l2_png"] = os.path.join(output_dir, "l2_sweep.png")
        plot_l2_sweep(results["val_accuracy"], results["best_l2"], paths["l2_png"])
    logging.info("Wrote %s", ", ".join(paths.values()))
    return paths


# ----------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------

def run_zero_shot(model, dataset, templates, select=False, selection_fraction=0.2,
                  batch_size=64, cache_dir=None, seed=0, verbose=1):
    """Zero-shot metrics; with `select`, templates chosen on a held-out selection split.

    With `select`, a stratified `selection_fraction` of the dataset is the selection
    split and all metrics are computed on the rest (the evaluation split).
    """
    embeddings = zero_shot_eval.encode_dataset(model, dataset, batch_size, cache_dir, verbose)
    results = {}
    if select:
        selection_idx, evaluation_idx = datasets_lib.split_indices(
            dataset.labels, [selection_fraction, 1 - selection_fraction], seed=seed)
        prompts = template_selection.template_prompt_embeddings(
            model, dataset.class_names, templates)  # (T, C, E)
        default = template_selection.DEFAULT_TEMPLATE
        default_embeddings = (None if default in templates else
                              build_class_embeddings(model, dataset.class_names, [default]))
        split = lambda idx: template_selection.EmbeddedSplit(embeddings[idx], dataset.labels[idx])
        selection = template_selection.select_and_evaluate(
            split(selection_idx), split(evaluation_idx), prompts, templates,
            default_prompt_embeddings=default_embeddings)
        results["template_selection"] = selection
        evaluation = dataset.subset(evaluation_idx, name=f"{dataset.name} (evaluation split)")
        class_embeddings = template_selection.ensemble_class_embeddings(
            prompts, [templates.index(t) for t in selection["selected_templates"]])
        metrics = zero_shot_eval.evaluate_zero_shot(
            model, evaluation, selection["selected_templates"],
            image_embeddings=embeddings[evaluation_idx], class_embeddings=class_embeddings)
    else:
        metrics = zero_shot_eval.evaluate_zero_shot(model, dataset, templates,
                                                    image_embeddings=embeddings)
    results["metrics"] = metrics
    return results


def run_linear_probe(model, dataset, fractions=(0.6, 0.2, 0.2), batch_size=64, cache_dir=None,
                     seed=0, verbose=1, l2_grid=linear_probe_lib.DEFAULT_L2_GRID):
    """Linear probe on one dataset split (stratified) into train / val / test."""
    embeddings = zero_shot_eval.encode_dataset(model, dataset, batch_size, cache_dir, verbose)
    parts = datasets_lib.split_indices(dataset.labels, fractions, seed=seed)
    train, val, test = [(embeddings[i], dataset.labels[i]) for i in parts]
    return linear_probe_lib.linear_probe(train, val, test, num_classes=dataset.num_classes,
                                         l2_grid=l2_grid)


def run_retrieval(model, captions_file, image_root, max_images=None, batch_size=64,
                  ks=(1, 5, 10)):
    """Retrieval recall@K on a captions CSV/TSV, plus recall curves for plotting."""
    from keras_clip.data.pipeline import load_image_caption_pairs
    from keras_clip.evaluation.retrieval import encode_images, encode_texts, retrieval_recall

    images, captions = load_image_caption_pairs(captions_file, image_root, max_images)
    texts = [c for per_image in captions for c in per_image]
    text_to_image = np.repeat(np.arange(len(images)), [len(c) for c in captions])
    image_embeddings = encode_images(model, images, batch_size=batch_size)
    text_embeddings = encode_texts(model, texts)
    metrics = retrieval_recall(image_embeddings, text_embeddings, text_to_image, ks=ks)
    curve_ks = sorted({k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
                       if k < len(images)} | {len(images)})
    curve = retrieval_recall(image_embeddings, text_embeddings, text_to_image, ks=curve_ks)
    recall_curve = {
        direction: {k: curve[f"{direction}_R@{k}"] for k in curve_ks}
        for direction in ("image_to_text", "text_to_image")
    }
    return {"metrics": metrics, "recall_curve": recall_curve, "num_images": len(images),
            "num_captions": len(texts)}


def run_evaluation(task, preset, dataset, data_dir=None, templates=None,
                   select_templates=False, output_dir=None, max_examples=None, batch_size=64,
                   cache_dir=None, seed=0, verbose=1, model=None, shifted_datasets=(),
                   baseline_fit=None):
    """Runs one evaluation task and writes its report.

    Args:
        task: one of `TASKS`.
        preset: anything `CLIP.from_preset` accepts (ignored if `model` is given).
        dataset: for `zero_shot` / `linear_probe`, a `load_classification_dataset`
            spec; for `retrieval`, a captions CSV/TSV with images under `data_dir`.
        data_dir: TFDS data folder, or the image folder for retrieval.
        templates: None, a template file or a shipped dataset name.
        select_templates: greedy template selection (zero-shot only).
        output_dir: where reports go (None: nothing is written).
        max_examples: optional subset size.
        batch_size: images per forward pass.
        cache_dir: image-embedding cache (defaults to `<output_dir>/embedding_cache`).
        seed: subset and split seed.
        verbose: progress bars on (1) or off (0).
        model: optional already-built `CLIP`.
        shifted_datasets: zero-shot only; specs of datasets with the same classes.
            Their top-1 and effective robustness (see
            `zero_shot_eval.evaluate_distribution_shift`) go under
            `distribution_shift`; the in-distribution set is the whole `dataset`.
        baseline_fit: optional `{"slope", "intercept"}` logit-space baseline.

    Returns:
        The results dict (also written as JSON).
    """
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}. Received: task={task!r}")
    if model is None:
        from keras_clip import CLIP

        model = CLIP.from_preset(preset)
    if cache_dir is None and output_dir:
        cache_dir = os.path.join(output_dir, "embedding_cache")
    if task == "retrieval":
        results = run_retrieval(model, dataset, data_dir or "", max_examples, batch_size)
    else:
        data = datasets_lib.load_classification_dataset(dataset, data_dir, max_examples, seed)
        if task == "zero_shot":
            template_list = resolve_templates(templates)
            shifted = {spec: datasets_lib.load_classification_dataset(
                spec, data_dir, max_examples, seed) for spec in shifted_datasets or ()}
            for spec, shifted_data in shifted.items():  # fail before any encoding
                if shifted_data.class_names != data.class_names:
                    raise ValueError(
                        f"Shifted dataset {spec!r} must have the classes of {dataset!r}. "
                        f"Received: {shifted_data.class_names[:5]}... vs "
                        f"{data.class_names[:5]}...")
            results = run_zero_shot(model, data, template_list, select_templates,
                                    batch_size=batch_size, cache_dir=cache_dir, seed=seed,
                                    verbose=verbose)
            if shifted:
                results["distribution_shift"] = zero_shot_eval.evaluate_distribution_shift(
                    model, data, shifted, template_list, baseline_fit, batch_size, cache_dir,
                    verbose)
        else:
            results = run_linear_probe(model, data, batch_size=batch_size, cache_dir=cache_dir,
                                       seed=seed, verbose=verbose)
    results.update({"task": task, "preset": str(preset), "dataset": str(dataset)})
    if output_dir:
        results["files"] = write_report(task, results, output_dir)
    return results
