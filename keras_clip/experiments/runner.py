"""`run_experiment`: the library function behind `python -m keras_clip.experiments`."""
import os

from absl import logging

from keras_clip.experiments import common

EXPERIMENTS = ("prompts", "few_shot", "objectives")


def run_experiment(name, preset=None, dataset=common.DEMO, templates=None,
                   output_dir="docs/experiments", tag=None, max_examples=None, seed=0,
                   batch_size=64, cache_dir=None, model=None, ks=None, num_seeds=3,
                   l2_grid=None, selection_fraction=0.2, make_plot=True, objective_options=None):
    """Runs one experiment on one model and dataset and writes its JSON, Markdown and PNG.

    Args:
        name: one of `EXPERIMENTS`.
        preset: anything `CLIP.from_preset` accepts (ignored if `model` is given).
        dataset: `"demo"` (the held-out demo classes) or a
            `load_classification_dataset` spec (e.g. the CIFAR-10 test folder).
        templates: the dataset's own templates (shipped name such as `"cifar10"`,
            a file, or None: the demo's templates for `"demo"`, else
            `"a photo of a {}."`). `prompts` compares them with the other variants;
            `few_shot` uses them for zero-shot.
        output_dir: where `<name>_<tag>.json/.md/.png` go.
        tag: file-name tag (defaults to the dataset's name).
        max_examples: optional seeded subset size (the demo: number of images, 600).
        seed: subset and split seed.
        batch_size: images per forward pass.
        cache_dir: image-embedding cache (default `<output_dir>/embedding_cache`), so
            a second experiment on the same model and data encodes no image.
        model: optional already-built `CLIP`.
        ks, num_seeds, l2_grid: `few_shot` only (defaults: 1, 2, 4, 8, 16; 3 draws;
            the linear probe's 13-point grid).
        selection_fraction: `prompts` only, the template-selection split.
        make_plot: write the PNG (needs matplotlib).
        objective_options: `objectives` only: keyword arguments of
            `keras_clip.experiments.objectives.run` (`objectives`, `tower`,
            `schedule`, `data_dir`, ...). That experiment trains its own models:
            `preset`, `model` and `templates` do not apply; `dataset` is `"demo"`
            or `"flickr8k"` and `max_examples` the number of zero-shot images.

    Returns:
        The experiment's results dict (also written as JSON).
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"`name` must be one of {EXPERIMENTS}. Received: name={name!r}")
    if name == "objectives":
        from keras_clip.experiments import objectives

        return objectives.run(dataset=dataset, output_dir=output_dir, tag=tag,
                              cache_dir=cache_dir, max_examples=max_examples, seed=seed,
                              eval_batch_size=batch_size, make_plot=make_plot,
                              **(objective_options or {}))
    if model is None:
        from keras_clip import CLIP

        model = CLIP.from_preset(preset)
    if cache_dir is None:
        cache_dir = os.path.join(output_dir, "embedding_cache")
    data, dataset_templates = common.load_dataset(dataset, templates, max_examples, seed)
    logging.info("Experiment %s on %s (%d images, %d classes) with %s", name, data.name,
                 len(data), data.num_classes, preset)
    if name == "prompts":
        from keras_clip.experiments import prompts

        results = prompts.run(model, data, dataset_templates, output_dir, tag,
                              selection_fraction=selection_fraction, seed=seed,
                              batch_size=batch_size, cache_dir=cache_dir, make_plot=make_plot)
    else:
        from keras_clip.evaluation.linear_probe import DEFAULT_L2_GRID
        from keras_clip.experiments import few_shot

        results = few_shot.run(model, data, dataset_templates, output_dir, tag,
                               make_plot=make_plot, ks=tuple(ks or few_shot.DEFAULT_KS),
                               seeds=tuple(range(num_seeds)), split_seed=seed,
                               l2_grid=tuple(l2_grid or DEFAULT_L2_GRID),
                               batch_size=batch_size, cache_dir=cache_dir)
    results.update({"experiment": name, "preset": str(preset), "dataset_spec": str(dataset)})
    common.write_json(results, results["files"]["json"])
    return results
