"""Runs one CLIP.train_step under several settings on the same global batch.

Usage: python step_equivalence.py '<JSON list of modes>', each mode
`{"replicas": 1 or 2, "model": {CLIP kwargs overrides}, "compile": {compile kwargs},
"reference": index of the mode to compare with (default 0)}`. Every mode starts from the same weights (SGD,
learning rate 1, so the update of each trainable variable is minus its gradient).

Prints one JSON line: per mode its loss, the per-replica logits shapes, the max abs
difference of its updates from its reference mode's, and its largest update.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_clip import CLIP  # noqa: E402
from step_common import CONFIG, record_logits_shapes  # noqa: E402


GLOBAL_BATCH = 8


def data():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 499, size=(GLOBAL_BATCH, 12))
    for i in range(GLOBAL_BATCH):
        tokens[i, 3 + i % 8:] = 0
        tokens[i, 2 + i % 8] = 499
    images = rng.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype("float32")
    return {"images": images, "token_ids": tokens.astype("int32")}


_STRATEGIES = {}


def one_step(mode):
    # One strategy per replica count: several MirroredStrategy objects in one process
    # mix up their collective instance keys.
    if mode["replicas"] not in _STRATEGIES:
        _STRATEGIES[mode["replicas"]] = (
            tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if mode["replicas"] == 2
            else tf.distribute.OneDeviceStrategy("/cpu:0"))
    strategy = _STRATEGIES[mode["replicas"]]
    shapes = []
    config = dict(CONFIG, **mode.get("model", {}))
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = CLIP(**config)
        before = [np.asarray(v, np.float64) for v in model.trainable_variables]
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), **mode.get("compile", {}))
        model.optimizer.build(model.trainable_variables)
    record_logits_shapes(shapes, tuple)
    dataset = tf.data.Dataset.from_tensor_slices(data()).batch(GLOBAL_BATCH, drop_remainder=True)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))

    @tf.function
    def step(it):
        strategy.run(model.train_step, args=(next(it),))
        return model.metrics[0].result()

    loss = float(step(iterator))
    names = [v.path.split("/", 1)[1] for v in model.trainable_variables]  # without "clip_N/"
    updates = {n: b - np.asarray(v, np.float64) for n, b, v in zip(names, before, model.trainable_variables)}
    return loss, updates, shapes


def main(argv):
    modes = json.loads(argv[1])
    results = [one_step(mode) for mode in modes]
    out = {"modes": []}
    for mode, (loss, updates, shapes) in zip(modes, results):
        _, reference, _ = results[mode.get("reference", 0)]
        assert sorted(updates) == sorted(reference), (sorted(updates), sorted(reference))
        out["modes"].append({
            "loss": loss, "logits_shapes": shapes,
            "max_grad": max(float(np.max(np.abs(g))) for g in updates.values()),
            "max_grad_diff": max(float(np.max(np.abs(updates[n] - reference[n]))) for n in reference),
        })
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
