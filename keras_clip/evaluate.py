"""Evaluates a CLIP preset: zero-shot classification, retrieval or a linear probe.

Examples:

    python -m keras_clip.evaluate --preset=runs/demo/preset --task=zero_shot \
        --dataset=../shared/data/cifar10_test --templates=cifar10 --select_templates \
        --max_examples=1000 --output_dir=runs/eval_cifar10
    python -m keras_clip.evaluate --preset=clip_vit_b32_openai --task=zero_shot \
        --dataset=tfds:cifar10/test --data_dir=~/tensorflow_datasets
    python -m keras_clip.evaluate --preset=runs/demo/preset --task=retrieval \
        --dataset=../shared/data/flickr8k/captions.tsv \
        --data_dir=../shared/data/flickr8k/images --max_examples=500

Outputs (`--output_dir`): `<task>.json`, `<task>.md` and PNG plots; see
`keras_clip.evaluation.report`.
"""
from absl import flags, logging

# Its own flag set, so that importing it beside another module with absl flags of
# the same names (`preset`, `dataset`, ...) cannot collide in absl's global set.
FLAGS = flags.FlagValues()
flags.DEFINE_string("preset", "runs/demo/preset", "Anything `CLIP.from_preset` accepts.",
                    flag_values=FLAGS)
flags.DEFINE_enum("task", "zero_shot", ["zero_shot", "retrieval", "linear_probe"], "Task.",
                  flag_values=FLAGS)
flags.DEFINE_string("dataset", None, "tfds:NAME[/SPLIT], labels CSV, IDX folder, class-folder "
                    "tree; for retrieval a captions CSV/TSV.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "TFDS data folder; for retrieval, the image folder.",
                    flag_values=FLAGS)
flags.DEFINE_string("templates", None, "Template file (one per line) or shipped dataset name "
                    "(e.g. cifar10, imagenet). Default: 'a photo of a {}.'.", flag_values=FLAGS)
flags.DEFINE_bool("select_templates", False, "Greedy template selection on a held-out split.",
                  flag_values=FLAGS)
flags.DEFINE_string("output_dir", "runs/eval", "Where JSON, Markdown and PNGs are written.",
                    flag_values=FLAGS)
flags.DEFINE_string("cache_dir", None, "Embedding cache (default <output_dir>/embedding_cache).",
                    flag_values=FLAGS)
flags.DEFINE_integer("max_examples", None, "Evaluate on a seeded random subset of this size.",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per forward pass.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Subset and split seed.", flag_values=FLAGS)
flags.DEFINE_list("shifted_datasets", [], "Zero-shot: datasets with the same classes, for "
                  "accuracy under distribution shift and effective robustness.", flag_values=FLAGS)
flags.DEFINE_list("baseline_fit", None, "SLOPE,INTERCEPT of a logit-space baseline fit "
                  "(Taori et al.); without it the plain accuracy gap is reported.",
                  flag_values=FLAGS)
flags.mark_flag_as_required("dataset", flag_values=FLAGS)


def main(argv):
    del argv
    from keras_clip.evaluation.report import run_evaluation
    from keras_clip.optional import import_optional

    # Fail before any encoding when the report's packages are missing.
    import_optional("matplotlib", "`python -m keras_clip.evaluate` (its PNG plots)")
    if FLAGS.task == "linear_probe":
        import_optional("scipy.optimize", "`--task=linear_probe`")

    baseline_fit = None
    if FLAGS.baseline_fit:
        slope, intercept = (float(v) for v in FLAGS.baseline_fit)
        baseline_fit = {"slope": slope, "intercept": intercept}
    results = run_evaluation(
        FLAGS.task, FLAGS.preset, FLAGS.dataset, data_dir=FLAGS.data_dir,
        templates=FLAGS.templates, select_templates=FLAGS.select_templates,
        output_dir=FLAGS.output_dir, max_examples=FLAGS.max_examples,
        batch_size=FLAGS.batch_size, cache_dir=FLAGS.cache_dir, seed=FLAGS.seed,
        shifted_datasets=FLAGS.shifted_datasets, baseline_fit=baseline_fit,
    )
    with open(results["files"]["markdown"]) as f:
        logging.info("\n%s", f.read())


if __name__ == "__main__":
    from keras_clip import cli

    cli.run(main, FLAGS)
