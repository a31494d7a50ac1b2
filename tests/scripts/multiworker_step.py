"""One CLIP.train_step per mode on this worker of a 2-worker MultiWorkerMirroredStrategy.

Usage (one process per worker, each with its TF_CONFIG; tests/test_large_batch_multiworker.py
starts them): python multiworker_step.py '<JSON list of modes>' OUT.json

Each mode is `{"model": {CLIP kwargs}, "compile": {compile kwargs}, "lock": {lock_towers
kwargs}, "reference_compile": {compile kwargs of the reference step},
"fixed_patches": bool}`. Worker i trains on rows [4i, 4i + 4) of a fixed global batch
of 8 pairs (replica i of 2); then the chief (worker 0) runs the reference: the same
model, from the same weights, one plain step (no strategy, `reference_compile`) on all
8 pairs. SGD with learning rate 1, so an update is minus the gradient.

`fixed_patches`: patch dropout keeps a fixed table of patches per global row (instead
of a random draw) in both runs, so the two are comparable: call c of
`patch_keep_indices` during tracing is chunk `c % K` of this worker's rows.

Writes OUT.json (chief only): per mode the 2-worker loss, the per-replica logits shapes
of both runs, the reference loss, the largest reference update, the max abs update
difference, and the names of trainable variables and of the weights the step changed.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

# Collective ops must be configured before the runtime starts: the strategy first.
STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
TASK = json.loads(os.environ["TF_CONFIG"])["task"]["index"]

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_clip import CLIP  # noqa: E402
from step_common import CONFIG, record_logits_shapes  # noqa: E402


GLOBAL_BATCH, WORKERS = 8, 2
LOCAL = GLOBAL_BATCH // WORKERS


def global_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 499, size=(GLOBAL_BATCH, 12))
    for i in range(GLOBAL_BATCH):
        tokens[i, 2 + i % 9] = 499
        tokens[i, 3 + i % 9:] = 0
    images = rng.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype("float32")
    return {"images": images, "token_ids": tokens.astype("int32")}


def kept_patches(num_patches, keep):
    """A fixed `(GLOBAL_BATCH, keep)` table of sorted patch indices, different per row."""
    rng = np.random.default_rng(1)
    return np.stack([np.sort(rng.permutation(num_patches)[:keep]) for _ in range(GLOBAL_BATCH)])


def build(mode, rows):
    """A model from seed 0 with the mode's settings; `rows`: the global rows it trains on."""
    keras.utils.set_random_seed(0)
    model = CLIP(**dict(CONFIG, **mode.get("model", {})))
    if mode.get("lock"):
        model.lock_towers(**mode["lock"])
    if mode.get("fixed_patches"):
        tower = model.visual
        table = kept_patches(tower.grid_size**2, tower.num_kept_patches)
        calls = []

        def fixed(batch, seed=None):
            chunks = len(rows) // int(batch)
            chunk = len(calls) % chunks
            calls.append(batch)
            return tf.constant(table[rows][chunk * batch:(chunk + 1) * batch], tf.int32)

        tower.patch_keep_indices = fixed
    return model


def weights(model):
    return {v.path.split("/", 1)[1]: np.asarray(v, np.float64) for v in model.weights}


def run_step(model, compile_kwargs, data, strategy=None):
    shapes = []
    before = weights(model)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), **compile_kwargs)
    model.optimizer.build(model.trainable_variables)
    record_logits_shapes(shapes, list)
    if strategy is None:
        loss = float(tf.function(model.train_step)(data)["loss"])
    else:
        @tf.function
        def step(local):
            strategy.run(model.train_step, args=(local,))
            return model.metrics[0].result()

        loss = float(step({k: tf.constant(v) for k, v in data.items()}))
    after = weights(model)
    return loss, {k: before[k] - after[k] for k in before}, shapes


def main(argv):
    modes, out_path = json.loads(argv[1]), argv[2]
    data = global_batch()
    mine = {k: v[TASK * LOCAL:(TASK + 1) * LOCAL] for k, v in data.items()}
    results = []
    for mode in modes:
        with STRATEGY.scope():
            model = build(mode, list(range(TASK * LOCAL, (TASK + 1) * LOCAL)))
        loss, updates, shapes = run_step(model, mode.get("compile", {}), mine, STRATEGY)
        results.append((loss, updates, shapes, [v.path.split("/", 1)[1] for v in model.trainable_variables]))
    if TASK != 0:
        return 0
    report = []
    for mode, (loss, updates, shapes, trainable) in zip(modes, results):
        reference = build(mode, list(range(GLOBAL_BATCH)))
        ref_loss, ref_updates, ref_shapes = run_step(reference, mode.get("reference_compile", {}), data)
        assert sorted(updates) == sorted(ref_updates)
        report.append({
            "loss": loss, "reference_loss": ref_loss, "logits_shapes": shapes,
            "reference_logits_shapes": ref_shapes,
            "max_reference_update": max(float(np.max(np.abs(u))) for u in ref_updates.values()),
            "max_update_diff": max(float(np.max(np.abs(updates[k] - ref_updates[k]))) for k in updates),
            "trainable": trainable,
            "changed": sorted(k for k, u in updates.items() if np.any(u != 0)),
        })
    with open(out_path, "w") as f:
        json.dump({"num_replicas": STRATEGY.num_replicas_in_sync, "modes": report}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
