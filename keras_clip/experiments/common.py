"""Datasets, models and report files shared by the experiments."""
import json
import os

import numpy as np
from absl import logging

from keras_clip.evaluation.datasets import LabelledImages, load_classification_dataset

DEMO = "demo"


def demo_dataset(num_examples=600, image_size=64, seed=0):
    """The demo data's held-out colour-shape classes as a `LabelledImages`.

    Returns:
        `(dataset, templates)`: the dataset (JPEG bytes, labels `i % 12`) and
        `keras_clip.demo_data.DEMO_TEMPLATES` (its per-dataset templates).
    """
    from keras_clip import demo_data

    examples = demo_data.demo_zero_shot_split(num_examples, image_size=image_size, seed=seed)
    images = [image for image, _ in examples]
    labels = np.array([label for _, label in examples], np.int64)

    def read(indices):
        return [images[i] for i in indices]

    dataset = LabelledImages("demo_zero_shot", demo_data.DEMO_CLASSES, labels, read,
                             f"demo:{num_examples}:{image_size}:{seed}")
    return dataset, list(demo_data.DEMO_TEMPLATES)


def load_dataset(spec, templates=None, max_examples=None, seed=0):
    """A dataset and its per-dataset templates.

    Args:
        spec: `"demo"` (the held-out demo classes; `max_examples` images, 600 by
            default) or anything `load_classification_dataset` accepts.
        templates: the dataset's own templates: a shipped dataset name
            (`"cifar10"`), a file, or a list; `None` for the demo's templates (demo)
            or the default single template.
        max_examples: optional subset size.
        seed: subset seed.

    Returns:
        `(LabelledImages, list of templates)`.
    """
    from keras_clip.zero_shot import resolve_templates

    if spec == DEMO:
        dataset, demo_templates = demo_dataset(max_examples or 600, seed=seed)
        return dataset, (resolve_templates(templates) if templates else demo_templates)
    return (load_classification_dataset(spec, max_examples=max_examples, seed=seed),
            resolve_templates(templates))


def write_json(results, path):
    """Writes `results` as indented JSON (NaN-free floats), creating folders."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=lambda o: o.tolist()
                  if isinstance(o, np.ndarray) else float(o))
    logging.info("Wrote %s", path)
    return path


def write_text(text, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    logging.info("Wrote %s", path)
    return path


def write_outputs(results, output_dir, stem, markdown, plot=None):
    """Writes `<output_dir>/<stem>.md` (`markdown(results)`), `.png` (`plot(results,
    path)`, when given) and `.json` (`results`, with `results["files"]` naming all
    three); returns `results`."""
    path = os.path.join(output_dir, stem)
    results["files"] = {"json": path + ".json", "markdown": path + ".md"}
    write_text(markdown(results), path + ".md")
    if plot is not None:
        results["files"]["png"] = plot(results, path + ".png")
    write_json(results, path + ".json")
    return results


def pyplot():
    """matplotlib.pyplot on the Agg backend (the `eval` extra)."""
    from keras_clip.optional import import_optional

    matplotlib = import_optional("matplotlib", "Experiment plots")
    matplotlib.use("Agg")
    return import_optional("matplotlib.pyplot", "Experiment plots")
