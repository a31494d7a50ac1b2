"""Runs one of the paper's experiments: `python -m keras_clip.experiments NAME [flags]`.

NAME is `prompts` (prompt engineering and ensembling, the paper's Figure 4),
`few_shot` (zero-shot vs k-shot linear probes, Figures 6-7) or `objectives`
(contrastive vs predictive training objectives, Figure 2; it trains its own
models, so `--preset` and `--templates` do not apply). Examples:

    python -m keras_clip.experiments prompts --preset=runs/demo/preset --dataset=demo
    python -m keras_clip.experiments prompts --preset=runs/demo/preset \
        --dataset=../shared/data/cifar10_test --templates=cifar10 --max_examples=2000
    python -m keras_clip.experiments few_shot --preset=runs/demo/preset --dataset=demo
    python -m keras_clip.experiments objectives --dataset=demo
    python -m keras_clip.experiments objectives --dataset=flickr8k --data_dir=../shared/data

Outputs (`--output_dir`, default docs/experiments): `<NAME>_<tag>.json`, `.md`, `.png`.
"""
from absl import app, flags, logging

# Its own flag set: `keras_clip.evaluate` defines flags of the same names (`preset`,
# `dataset`, ...) in absl's global set, and both may be imported in one process.
FLAGS = flags.FlagValues()
flags.DEFINE_string("preset", "runs/demo/preset", "Anything `CLIP.from_preset` accepts.",
                    flag_values=FLAGS)
flags.DEFINE_string("dataset", "demo", "`demo` (held-out demo classes) or a labels CSV, IDX "
                    "folder, class-folder tree or tfds:NAME. objectives: `demo` or `flickr8k` "
                    "(Flickr8k training, CIFAR-10 zero-shot; see --data_dir).",
                    flag_values=FLAGS)
flags.DEFINE_string("templates", None, "The dataset's own templates: shipped name (cifar10), "
                    "file, or default (demo: its templates; else 'a photo of a {}.').",
                    flag_values=FLAGS)
flags.DEFINE_string("output_dir", "docs/experiments", "Where JSON, Markdown and PNG go.",
                    flag_values=FLAGS)
flags.DEFINE_string("tag", None, "File-name tag (default: the dataset's name).", flag_values=FLAGS)
flags.DEFINE_string("cache_dir", None,
                    "Image-embedding cache (default <output_dir>/embedding_cache).",
                    flag_values=FLAGS)
flags.DEFINE_integer("max_examples", None, "Seeded subset size (demo: number of images, 600; "
                     "objectives: zero-shot images, 240 demo / 200 CIFAR-10).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per forward pass (objectives: also the training "
                     "batch of every objective).", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Subset and split seed.", flag_values=FLAGS)
flags.DEFINE_float("selection_fraction", 0.2, "prompts: part of the data that selects templates.",
                    flag_values=FLAGS)
flags.DEFINE_list("ks", ["1", "2", "4", "8", "16"], "few_shot: labelled examples per class.",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_seeds", 3, "few_shot: k-shot draws per k.", flag_values=FLAGS)
flags.DEFINE_list("l2_grid", None, "few_shot: probe L2 strengths (default 1e-6..1e6, 13 points).",
                    flag_values=FLAGS)

# objectives (the paper's Figure 2); unset budget and size flags take the defaults of
# keras_clip.experiments.objectives (DEFAULT_BUDGETS, DEFAULT_TOWER), unset optimisation
# flags TrainConfig's.
flags.DEFINE_list("objectives", None, "objectives: which to train (default all of "
                  "transformer_contrastive, bag_of_words_contrastive, bag_of_words_prediction, "
                  "caption_lm).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "../shared/data", "objectives, flickr8k: folder with flickr8k/ "
                    "and cifar10_test/.", flag_values=FLAGS)
flags.DEFINE_integer("images", None, "objectives: training images per objective.",
                     flag_values=FLAGS)
flags.DEFINE_integer("eval_every", None, "objectives: zero-shot evaluation every this many "
                     "training images (a multiple of --batch_size).", flag_values=FLAGS)
flags.DEFINE_integer("image_size", None, "objectives: image side of the shared ViT.",
                     flag_values=FLAGS)
flags.DEFINE_integer("patch_size", None, "objectives: ViT patch size.", flag_values=FLAGS)
flags.DEFINE_integer("vision_layers", None, "objectives: ViT blocks.", flag_values=FLAGS)
flags.DEFINE_integer("text_layers", None, "objectives: text tower / caption decoder blocks.",
                     flag_values=FLAGS)
flags.DEFINE_integer("width", None, "objectives: width of the ViT, the text towers and the "
                     "decoder.", flag_values=FLAGS)
flags.DEFINE_integer("heads", None, "objectives: attention heads.", flag_values=FLAGS)
flags.DEFINE_integer("embed_dim", None, "objectives: embedding width.", flag_values=FLAGS)
flags.DEFINE_integer("context_length", None, "objectives: caption tokens.", flag_values=FLAGS)
flags.DEFINE_float("learning_rate", None, "objectives: peak learning rate (default "
                   "TrainConfig's).", flag_values=FLAGS)
flags.DEFINE_integer("warmup_steps", None, "objectives: warm-up steps (default "
                     "TrainConfig's).", flag_values=FLAGS)
flags.DEFINE_float("weight_decay", None, "objectives: AdamW weight decay (default "
                   "TrainConfig's).", flag_values=FLAGS)
flags.DEFINE_integer("demo_examples", None, "objectives, demo: generated training images "
                     "(default TrainConfig's).", flag_values=FLAGS)


def objective_options():
    """`objectives.run` keyword arguments from the flags (validated objectives first,
    so a typo fails before any data is read)."""
    from keras_clip.experiments import objectives

    chosen = objectives.validate_objectives(FLAGS.objectives or objectives.OBJECTIVES)
    tower, schedule, demo_examples = objectives.default_budget(
        FLAGS.dataset, batch_size=FLAGS.batch_size, images=FLAGS.images,
        eval_every=FLAGS.eval_every, image_size=FLAGS.image_size, patch_size=FLAGS.patch_size,
        vision_layers=FLAGS.vision_layers, text_layers=FLAGS.text_layers, width=FLAGS.width,
        heads=FLAGS.heads, embed_dim=FLAGS.embed_dim, context_length=FLAGS.context_length,
        learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
        weight_decay=FLAGS.weight_decay, demo_examples=FLAGS.demo_examples, seed=FLAGS.seed)
    return {"objectives": chosen, "tower": tower, "schedule": schedule,
            "demo_examples": demo_examples, "data_dir": FLAGS.data_dir}


def main(argv):
    from keras_clip.experiments.runner import EXPERIMENTS, run_experiment
    from keras_clip.optional import import_optional

    if len(argv) != 2 or argv[1] not in EXPERIMENTS:
        raise app.UsageError(f"Give one experiment name, one of {EXPERIMENTS}. "
                             f"Received: {argv[1:]}")
    options = objective_options() if argv[1] == "objectives" else None
    import_optional("matplotlib", "`python -m keras_clip.experiments` (its PNG plots)")
    results = run_experiment(
        argv[1], FLAGS.preset, FLAGS.dataset, FLAGS.templates, FLAGS.output_dir, FLAGS.tag,
        FLAGS.max_examples, FLAGS.seed, FLAGS.batch_size, FLAGS.cache_dir,
        ks=[int(k) for k in FLAGS.ks], num_seeds=FLAGS.num_seeds,
        l2_grid=[float(v) for v in FLAGS.l2_grid] if FLAGS.l2_grid else None,
        selection_fraction=FLAGS.selection_fraction, objective_options=options)
    with open(results["files"]["markdown"]) as f:
        logging.info("\n%s", f.read())


if __name__ == "__main__":
    from keras_clip import cli

    cli.run(main, FLAGS)
