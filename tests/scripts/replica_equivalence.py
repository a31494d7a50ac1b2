"""Runs one CLIP.train_step on a global batch with 1 and with 2 replicas (2 logical CPUs).

Prints a JSON line: loss under each setting and the max abs difference of the weight
updates (SGD, learning rate 1, so updates equal the summed gradients), plus the
per-replica logits shapes seen by the step.
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

CONFIG = dict(embed_dim=32, image_size=32, vision_architecture="vit", vision_num_layers=2,
              vision_hidden_dim=64, vision_num_heads=2, vision_patch_size=8, context_length=12,
              vocabulary_size=500, text_hidden_dim=64, text_num_layers=2, text_num_heads=2,
              end_token_id=499)
GLOBAL_BATCH = 8


def data():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 499, size=(GLOBAL_BATCH, 12))
    for i in range(GLOBAL_BATCH):
        tokens[i, 3 + i % 8:] = 0
        tokens[i, 2 + i % 8] = 499
    images = rng.normal(size=(GLOBAL_BATCH, 32, 32, 3)).astype("float32")
    return {"images": images, "token_ids": tokens.astype("int32")}


def one_step(strategy, initial_weights):
    shapes = []
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = CLIP(**CONFIG)
        model.set_weights(initial_weights)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0))
        model.optimizer.build(model.trainable_variables)
    model.logits_hook = lambda logits: shapes.append(tuple(logits.shape))
    dataset = tf.data.Dataset.from_tensor_slices(data()).batch(GLOBAL_BATCH, drop_remainder=True)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))

    @tf.function
    def step(it):
        strategy.run(model.train_step, args=(next(it),))
        return model.metrics[0].result()

    loss = float(step(iterator))
    updated = [np.asarray(v) for v in model.trainable_variables]
    return loss, updated, shapes


def main():
    keras.utils.set_random_seed(0)
    initial = CLIP(**CONFIG).get_weights()
    reference = CLIP(**CONFIG)
    reference.set_weights(initial)
    before = [np.asarray(v) for v in reference.trainable_variables]
    loss_1, after_1, shapes_1 = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), initial)
    loss_2, after_2, shapes_2 = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), initial)
    grads_1 = [b - a for a, b in zip(after_1, before)]
    grads_2 = [b - a for a, b in zip(after_2, before)]
    print(json.dumps({
        "loss_1": loss_1, "loss_2": loss_2,
        "max_grad_diff": max(float(np.max(np.abs(g1 - g2))) for g1, g2 in zip(grads_1, grads_2)),
        "max_grad": max(float(np.max(np.abs(g))) for g in grads_1),
        "logits_shapes_1": shapes_1, "logits_shapes_2": shapes_2,
    }))


if __name__ == "__main__":
    sys.exit(main())
