"""Which keras_clip modules a training run enters, in order (docs/redesign_notes.md).

    python benchmarks/run_flow.py

Runs `keras_clip.training.loop.run` for 2 steps of a tiny model on generated TFRecords
with a validation set, under `sys.setprofile`, and prints as JSON: every `keras_clip`
module in the order one of its Python functions is first called (graph tracing
included), and the calls `loop.py` makes into other modules (consecutive calls into
the same module counted once).
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

from keras_clip import CLIP, demo_data  # noqa: E402
from keras_clip.training import loop  # noqa: E402
from keras_clip.training.config import TrainConfig  # noqa: E402

TINY = dict(embed_dim=32, image_size=32, vision_architecture="vit", vision_num_layers=1,
            vision_hidden_dim=64, vision_num_heads=2, vision_patch_size=8, context_length=24,
            text_hidden_dim=64, text_num_layers=1, text_num_heads=2)


def _module(frame):
    name = frame.f_globals.get("__name__", "")
    return name if name.startswith("keras_clip") else None


def main():
    tmp = tempfile.mkdtemp()
    keras.utils.set_random_seed(0)
    CLIP(**TINY).save_to_preset(f"{tmp}/preset")
    demo_data.write_demo_dataset(f"{tmp}/data", num_train=32, num_val=8, num_zero_shot=12, image_size=32, seed=0)
    config = TrainConfig(preset=f"{tmp}/preset", train_data=f"{tmp}/data/train-*.tfrecord",
                         val_data=f"{tmp}/data/val-*.tfrecord", model_dir=f"{tmp}/run", steps=2,
                         global_batch_size=8, checkpoint_every=1, log_every=1, shuffle_buffer=16)
    order, from_loop = [], []

    def profile(frame, event, arg):
        module = _module(frame) if event == "call" else None
        if module is None:
            return
        if module not in order:
            order.append(module)
        caller = frame.f_back
        if (caller is not None and _module(caller) == "keras_clip.training.loop"
                and module != "keras_clip.training.loop" and (not from_loop or from_loop[-1] != module)):
            from_loop.append(module)

    sys.setprofile(profile)
    loop.run(config)
    sys.setprofile(None)
    print(json.dumps({"modules_in_order": order, "calls_from_loop": from_loop}, indent=1))


if __name__ == "__main__":
    main()
