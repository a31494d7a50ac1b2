"""Prompt engineering and ensembling (the CLIP paper's section 3.1.4, Figure 4).

For one model and one labelled dataset, zero-shot top-1 with five prompt variants,
all measured on the same evaluation split:

- `class_name`: the class name alone (`"{}"`), the paper's baseline;
- `a_photo_of`: `"A photo of a {}."` (the CLIP tokenizer lower-cases, so this is
  the same prompt as `"a photo of a {}."`);
- `dataset_templates`: the templates shipped for the dataset (CIFAR-10's 18, the
  demo's 3, ...), ensembled;
- `imagenet_80`: OpenAI's 80 ImageNet templates, ensembled;
- `selected`: greedy forward selection (`template_selection.select_templates`)
  over the union of all the templates above, chosen on a separate stratified
  selection split (`selection_fraction` of the data) and measured on the
  evaluation split.

Ensembling is in embedding space (normalised mean of unit prompt embeddings),
as in `keras_clip.zero_shot.build_class_embeddings`. Deviation from the paper:
its Figure 4 averages 36 datasets and compares against the name-only baseline
over model sizes; here one model and one dataset at a time.
"""
import numpy as np
from absl import logging

from keras_clip.evaluation import template_selection
from keras_clip.evaluation.datasets import split_indices
from keras_clip.evaluation.zero_shot_eval import classification_metrics
from keras_clip.experiments import common

CLASS_NAME_TEMPLATE = "{}"
PHOTO_TEMPLATE = "A photo of a {}."
VARIANTS = ("class_name", "a_photo_of", "dataset_templates", "imagenet_80", "selected")


def prompt_variants(dataset_templates):
    """The fixed variants: dict name -> list of templates (all but `selected`)."""
    from keras_clip.zero_shot_data import load_dataset_prompts

    dataset_templates = list(dataset_templates)
    if not dataset_templates:
        raise ValueError("`dataset_templates` must be a non-empty sequence of templates. "
                         f"Received: dataset_templates={dataset_templates!r}")
    return {
        "class_name": [CLASS_NAME_TEMPLATE],
        "a_photo_of": [PHOTO_TEMPLATE],
        "dataset_templates": dataset_templates,
        "imagenet_80": load_dataset_prompts("imagenet")[1],
    }


def candidate_templates(variants):
    """The union of the variants' templates, first occurrence order, no duplicates."""
    return list(dict.fromkeys(t for templates in variants.values() for t in templates))


def variant_accuracies(prompt_embeddings, candidates, variants, image_embeddings, labels,
                       selection_fraction=0.2, seed=0):
    """Top-1 of every variant on the evaluation split, from embeddings only.

    Args:
        prompt_embeddings: float `(T, C, E)`, unit-norm embedding of template `t`
            filled with class `c` (`template_selection.template_prompt_embeddings`).
        candidates: the T templates, in the order of `prompt_embeddings`.
        variants: dict name -> templates (each among `candidates`).
        image_embeddings: float `(N, E)`, unit norm.
        labels: int `(N,)`.
        selection_fraction: float in (0, 1): the stratified part of the data used
            only to select templates; every variant is measured on the rest.
        seed: split seed.

    Returns:
        dict: `variants` (name -> `{"templates", "num_templates", "top1",
        "mean_per_class_accuracy"}`, the fixed variants then `selected`),
        `selection_history`, `num_selection`, `num_evaluation`.
    """
    if not 0.0 < selection_fraction < 1.0:
        raise ValueError("`selection_fraction` must be in (0, 1). "
                         f"Received: selection_fraction={selection_fraction}")
    image_embeddings = np.asarray(image_embeddings, np.float32)
    labels = np.asarray(labels, np.int64)
    num_classes = np.asarray(prompt_embeddings).shape[1]
    selection_idx, evaluation_idx = split_indices(
        labels, [selection_fraction, 1.0 - selection_fraction], seed=seed)
    evaluation_images, evaluation_labels = image_embeddings[evaluation_idx], labels[evaluation_idx]

    def measure(indices):
        class_embeddings = template_selection.ensemble_class_embeddings(prompt_embeddings, indices)
        metrics = classification_metrics(evaluation_images @ class_embeddings.T,
                                         evaluation_labels, num_classes, ks=(1,))
        return metrics["top1"], metrics["mean_per_class_accuracy"]

    results = {}
    for name, templates in variants.items():
        top1, per_class = measure([candidates.index(t) for t in templates])
        results[name] = {"templates": list(templates), "num_templates": len(templates),
                         "top1": top1, "mean_per_class_accuracy": per_class}
    selection = template_selection.select_templates(
        template_selection.EmbeddedSplit(image_embeddings[selection_idx], labels[selection_idx]),
        prompt_embeddings, candidates)
    top1, per_class = measure(selection.indices)
    results["selected"] = {"templates": selection.templates,
                           "num_templates": len(selection.templates),
                           "top1": top1, "mean_per_class_accuracy": per_class,
                           "selection_accuracy": selection.selection_accuracy}
    for name, entry in results.items():
        logging.info("Prompt variant %-18s (%3d templates): top-1 %.2f", name,
                     entry["num_templates"], entry["top1"])
    return {"variants": results, "selection_history": selection.history,
            "num_selection": int(len(selection_idx)), "num_evaluation": int(len(evaluation_idx))}


def compare_prompt_variants(model, dataset, dataset_templates, selection_fraction=0.2, seed=0,
                            batch_size=64, cache_dir=None, image_embeddings=None, verbose=0):
    """Encodes the dataset and every candidate prompt once, then `variant_accuracies`.

    Args:
        model: a `keras_clip.CLIP`.
        dataset: a `LabelledImages`.
        dataset_templates: the dataset's own templates (the `dataset_templates` variant).
        selection_fraction, seed: as in `variant_accuracies`.
        batch_size: images per forward pass.
        cache_dir: optional image-embedding cache (`encode_dataset`).
        image_embeddings: optional precomputed `(N, E)`.
        verbose: progress bar on (1) or off (0).

    Returns:
        The `variant_accuracies` dict plus `dataset`, `num_classes`, `num_candidates`.
    """
    from keras_clip.evaluation.zero_shot_eval import encode_dataset

    variants = prompt_variants(dataset_templates)
    candidates = candidate_templates(variants)
    if image_embeddings is None:
        image_embeddings = encode_dataset(model, dataset, batch_size, cache_dir, verbose)
    prompt_embeddings = template_selection.template_prompt_embeddings(
        model, dataset.class_names, candidates)  # (T, C, E)
    results = variant_accuracies(prompt_embeddings, candidates, variants, image_embeddings,
                                 dataset.labels, selection_fraction, seed)
    results.update({"dataset": dataset.name, "num_classes": dataset.num_classes,
                    "num_candidates": len(candidates)})
    return results


def markdown(results):
    """The variants as a Markdown table."""
    lines = [f"Zero-shot top-1 on {results.get('dataset', '?')} "
             f"({results['num_evaluation']} evaluation images; templates selected on "
             f"{results['num_selection']} others).", "",
             "| prompts | templates | top-1 (%) | mean per class (%) |",
             "|---|---:|---:|---:|"]
    for name, entry in results["variants"].items():
        lines.append(f"| {name} | {entry['num_templates']} | {entry['top1']:.2f} | "
                     f"{entry['mean_per_class_accuracy']:.2f} |")
    chosen = results["variants"]["selected"]["templates"]
    lines += ["", "Selected templates: " + ", ".join(f"`{t}`" for t in chosen)]
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Bar chart of top-1 per variant, written to `path`."""
    plt = common.pyplot()
    names = list(results["variants"])
    values = [results["variants"][n]["top1"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(np.arange(len(names)), values)
    ax.set_yticks(np.arange(len(names)), labels=names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("zero-shot top-1 (%)")
    ax.set_title(f"Prompt engineering and ensembling: {results.get('dataset', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(model, dataset, dataset_templates, output_dir, tag=None, selection_fraction=0.2,
        seed=0, batch_size=64, cache_dir=None, make_plot=True):
    """`compare_prompt_variants`, then `prompts_<tag>.json`, `.md` and `.png` in `output_dir`."""
    results = compare_prompt_variants(model, dataset, dataset_templates, selection_fraction,
                                      seed, batch_size, cache_dir)
    return common.write_outputs(results, output_dir, f"prompts_{tag or dataset.name}", markdown,
                                plot if make_plot else None)
