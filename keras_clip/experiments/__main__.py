"""Runs one of the paper's experiments: `python -m keras_clip.experiments NAME [flags]`.

NAME is `prompts` (prompt engineering and ensembling, the paper's Figure 4) or
`few_shot` (zero-shot vs k-shot linear probes, Figures 6-7). Examples:

    python -m keras_clip.experiments prompts --preset=runs/demo/preset --dataset=demo
    python -m keras_clip.experiments prompts --preset=runs/demo/preset \
        --dataset=../shared/data/cifar10_test --templates=cifar10 --max_examples=2000
    python -m keras_clip.experiments few_shot --preset=runs/demo/preset --dataset=demo

Outputs (`--output_dir`, default docs/experiments): `<NAME>_<tag>.json`, `.md`, `.png`.
"""
from absl import app, flags, logging

# Its own flag set: `keras_clip.evaluate` defines flags of the same names (`preset`,
# `dataset`, ...) in absl's global set, and both may be imported in one process.
FLAGS = flags.FlagValues()
flags.DEFINE_string("preset", "runs/demo/preset", "Anything `CLIP.from_preset` accepts.",
                    flag_values=FLAGS)
flags.DEFINE_string("dataset", "demo", "`demo` (held-out demo classes) or a labels CSV, IDX "
                    "folder, class-folder tree or tfds:NAME.", flag_values=FLAGS)
flags.DEFINE_string("templates", None, "The dataset's own templates: shipped name (cifar10), "
                    "file, or default (demo: its templates; else 'a photo of a {}.').",
                    flag_values=FLAGS)
flags.DEFINE_string("output_dir", "docs/experiments", "Where JSON, Markdown and PNG go.",
                    flag_values=FLAGS)
flags.DEFINE_string("tag", None, "File-name tag (default: the dataset's name).", flag_values=FLAGS)
flags.DEFINE_string("cache_dir", None,
                    "Image-embedding cache (default <output_dir>/embedding_cache).",
                    flag_values=FLAGS)
flags.DEFINE_integer("max_examples", None, "Seeded subset size (demo: number of images, 600).",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per forward pass.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Subset and split seed.", flag_values=FLAGS)
flags.DEFINE_float("selection_fraction", 0.2, "prompts: part of the data that selects templates.",
                    flag_values=FLAGS)
flags.DEFINE_list("ks", ["1", "2", "4", "8", "16"], "few_shot: labelled examples per class.",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_seeds", 3, "few_shot: k-shot draws per k.", flag_values=FLAGS)
flags.DEFINE_list("l2_grid", None, "few_shot: probe L2 strengths (default 1e-6..1e6, 13 points).",
                    flag_values=FLAGS)


def main(argv):
    from keras_clip.experiments.runner import EXPERIMENTS, run_experiment
    from keras_clip.optional import import_optional

    if len(argv) != 2 or argv[1] not in EXPERIMENTS:
        raise app.UsageError(f"Give one experiment name, one of {EXPERIMENTS}. "
                             f"Received: {argv[1:]}")
    import_optional("matplotlib", "`python -m keras_clip.experiments` (its PNG plots)")
    results = run_experiment(
        argv[1], FLAGS.preset, FLAGS.dataset, FLAGS.templates, FLAGS.output_dir, FLAGS.tag,
        FLAGS.max_examples, FLAGS.seed, FLAGS.batch_size, FLAGS.cache_dir,
        ks=[int(k) for k in FLAGS.ks], num_seeds=FLAGS.num_seeds,
        l2_grid=[float(v) for v in FLAGS.l2_grid] if FLAGS.l2_grid else None,
        selection_fraction=FLAGS.selection_fraction)
    with open(results["files"]["markdown"]) as f:
        logging.info("\n%s", f.read())


if __name__ == "__main__":
    from keras_clip import cli

    cli.run(main, FLAGS)
