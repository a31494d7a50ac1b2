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
import typing

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags, logging  # noqa: E402

from keras_clip.training.config import TrainConfig, help_text  # noqa: E402

_DEFAULTS = TrainConfig()
for field in dataclasses.fields(TrainConfig):
    default = getattr(_DEFAULTS, field.name)
    if default is None:  # optional fields (`float | None`, `bool | None`): unset means "automatic"
        if float in typing.get_args(field.type):
            flags.DEFINE_float(field.name, None, help_text(field.name))
        elif bool in typing.get_args(field.type):
            flags.DEFINE_bool(field.name, None, help_text(field.name))
        else:
            raise TypeError(f"No flag type for the optional field {field.name}: {field.type}")
    elif isinstance(default, bool) or field.type in ("bool",):
        flags.DEFINE_bool(field.name, default, help_text(field.name))
    elif isinstance(default, int):
        flags.DEFINE_integer(field.name, default, help_text(field.name))
    elif isinstance(default, float):
        flags.DEFINE_float(field.name, default, help_text(field.name))
    else:
        flags.DEFINE_string(field.name, default, help_text(field.name))
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
