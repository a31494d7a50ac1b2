"""Train a CLIP: `python training/run.py` (no flags: the built-in demo run).

Thin entry point: parses flags into a `TrainConfig`, creates the distribution
strategy, and calls `keras_clip.training.run`. Every flag is optional.

    python training/run.py --preset=clip_vit_tiny --train_data='shards/train-*.tfrecord' \
        --val_data='shards/val-*.tfrecord' --global_batch_size=256 --epochs=10 \
        --strategy=multiworker --model_dir=runs/exp1
"""
import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags, logging  # noqa: E402

from keras_clip.training.config import TrainConfig  # noqa: E402

_DEFAULTS = TrainConfig()
_HELP = {
    "preset": "Model preset name or path.",
    "train_data": "demo | TFRecord pattern | CSV/TSV | tfds:NAME[/SPLIT].",
    "val_data": "Validation data in the same forms ('' for none).",
    "image_root": "Folder of the CSV's image paths (or TFDS data_dir).",
    "global_batch_size": "Pairs per step across all replicas.",
    "epochs": "Passes over the training data (ignored if --steps > 0).",
    "steps": "Total optimisation steps.",
    "learning_rate": "Peak learning rate.",
    "warmup_steps": "Linear warm-up steps.",
    "weight_decay": "AdamW decoupled weight decay.",
    "clipnorm": "Gradient clipping norm (unset: off).",
    "decay_embeddings": "Also weight-decay the token and positional embeddings (open_clip's rule).",
    "precision": "float32 | mixed_bfloat16 | mixed_float16.",
    "jit_compile": "auto | true | false (XLA for the towers).",
    "strategy": "one_device | mirrored | multiworker (TF_CONFIG).",
    "model_dir": "Output folder (checkpoints, logs, preset, summary.json).",
    "seed": "Random seed.",
    "checkpoint_every": "Steps between checkpoints.",
    "log_every": "Steps between TensorBoard points.",
    "demo_examples": "Size of the generated demo training set.",
    "shuffle_buffer": "Shuffle buffer (records).",
    "max_train_seconds": "Stop (with a checkpoint) after this many seconds on the chief's clock "
                         "(every worker stops at the same step); 0: never.",
    "time_collectives_steps": "After training, time the all-gather and gradient all-reduce alone "
                              "this many times each (summary.json 'collectives'); 0: off.",
    "loss": "softmax (CLIP) | sigmoid (SigLIP: learned temperature and bias, init 10 and -10).",
    "lock_image": "Freeze the image tower (LiT): no gradients, no optimizer state, frozen BN.",
    "lock_text": "Freeze the text tower.",
    "unlocked_image_blocks": "With --lock_image: leave the last N image blocks and the head trainable.",
    "unlocked_text_blocks": "With --lock_text: leave the last N text blocks and the head trainable.",
    "gradient_cache_chunks": "Gradient caching: compute each replica's batch in K chunks (activation "
                             "memory of one chunk, same update as K=1, ~2 forward passes).",
    "patch_dropout": "FLIP: fraction of image patch tokens dropped in training (ViT; 0: off).",
    "remat": "Recompute each transformer block in the backward pass (less memory, same gradients).",
}
for field in dataclasses.fields(TrainConfig):
    default = getattr(_DEFAULTS, field.name)
    if field.name == "clipnorm":
        flags.DEFINE_float(field.name, None, _HELP[field.name])
    elif isinstance(default, bool) or field.type in ("bool",):
        flags.DEFINE_bool(field.name, default, _HELP[field.name])
    elif isinstance(default, int):
        flags.DEFINE_integer(field.name, default, _HELP[field.name])
    elif isinstance(default, float):
        flags.DEFINE_float(field.name, default, _HELP[field.name])
    else:
        flags.DEFINE_string(field.name, default, _HELP[field.name])
FLAGS = flags.FLAGS


def make_strategy(name):
    """The `tf.distribute` strategy for `--strategy` (only entry points create one)."""
    import tensorflow as tf

    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise SystemExit("--strategy=multiworker needs TF_CONFIG (see training/launch.py)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


def main(argv):
    del argv
    from keras_clip.training import run

    config = TrainConfig(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(TrainConfig)})
    summary = run(config.validate(), strategy=make_strategy(config.strategy))
    if "demo_zero_shot" in summary:
        zs = summary["demo_zero_shot"]
        print(f"Demo zero-shot top-1 on {zs['num_classes']} held-out classes: "
              f"{100 * zs['top1']:.1f}% (chance {100 * zs['chance']:.1f}%)")
    if "val_retrieval" in summary:
        print("Validation retrieval: " + ", ".join(
            f"{k} {v:.1f}" for k, v in summary["val_retrieval"].items() if "R@" in k))
    print(f"Summary written to {os.path.join(config.model_dir, 'summary.json')}")
    logging.flush()


if __name__ == "__main__":
    sys.exit(app.run(main))
