"""Timing of a training step's cross-replica communication, without the compute.

`CLIP.train_step` communicates twice per step: the all-gather of the image and text
features (forward, plus its gradient on the way back) and the all-reduce of the
gradients that the optimizer performs. In a real step these overlap with compute
and with each other, so their cost cannot be read from the step time alone. This
module runs each one on its own, with the shapes and dtypes of the real step, on
the same strategy (so over the same cluster and transport), and reports the
milliseconds per step of each against an empty step that only reads its input.

Every worker must call `time_collectives` the same number of times: the
collectives are matched across workers in call order.

As a script it builds the strategy and the model itself, on every worker of a
cluster (one process without `TF_CONFIG`), and the chief writes the figures:

    python training/launch.py --num_workers=2 --script=benchmarks/collectives.py -- \
        --preset=clip_vit_tiny --global_batch_size=64 --steps=30 --output=/tmp/collectives.json
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_clip import distribute  # noqa: E402


def _per_replica_input(strategy, local_batch, embed_dim, dtype):
    """An iterator of per-replica `(local_batch, embed_dim)` features.

    The probes take their input from a distributed dataset, as the training step
    does: under `MultiWorkerMirroredStrategy` a collective needs values placed on
    the replicas' devices.
    """

    def dataset_fn(input_context):
        del input_context
        features = tf.random.stateless_normal([local_batch, embed_dim], seed=[1, 2], dtype=dtype)
        return tf.data.Dataset.from_tensors(features).repeat()

    return iter(strategy.distribute_datasets_from_function(dataset_fn))


def time_collectives(model, strategy, global_batch_size, steps=20, warmup=3):
    """Milliseconds per step of the step's collectives, each run alone.

    Args:
        model: the `CLIP` being trained (its embedding width, compute dtype and
            trainable variables give the shapes).
        strategy: the `tf.distribute` strategy of the run.
        global_batch_size: pairs per step across all replicas.
        steps: timed repetitions of each probe.
        warmup: untimed repetitions first (tracing, connection set-up).

    Returns:
        dict: `empty_ms` (a step that only reads its input); `all_gather_ms`: image
        and text features gathered, with the gradient of the gather computed, as in
        the step, minus `empty_ms`; `gradient_all_reduce_ms`: one SUM all-reduce of
        tensors shaped like every trainable variable, minus the same step without
        the all-reduce (filling the tensors); both floored at 0;
        `gathered_bytes`: image + text features of the global batch;
        `all_reduced_bytes`: gradient values each replica contributes (dense
        tensors, plus `sparse_gradient_rows` rows of each embedding table).
    """
    num_replicas = strategy.num_replicas_in_sync
    local_batch = global_batch_size // num_replicas
    dtype = tf.as_dtype(model.compute_dtype)
    shapes = [(tuple(v.shape), tf.as_dtype(v.dtype)) for v in model.trainable_variables]
    # The gradient of an embedding lookup is sparse (`tf.IndexedSlices`: one row per
    # token), and the strategy all-reduces it as such (by gathering the rows). The
    # probe sends as many rows as an untrimmed batch has tokens, an upper bound.
    sparse_paths = {layer.embeddings.path for layer in model._flatten_layers()
                    if isinstance(layer, keras.layers.Embedding)}
    sparse_rows = local_batch * model.context_length
    is_sparse = [v.path in sparse_paths for v in model.trainable_variables]

    def empty(features):
        return tf.reduce_sum(features)

    def all_gather(features):
        image, text = features, features * 2.0
        with tf.GradientTape() as tape:
            tape.watch([image, text])
            all_image = distribute.gather_with_gradient(image)
            all_text = distribute.gather_with_gradient(text)
            objective = tf.reduce_sum(all_image * all_text)
        image_grad, text_grad = tape.gradient(objective, [image, text])
        return tf.reduce_sum(image_grad) + tf.reduce_sum(text_grad)

    def fake_gradients(features):
        value = tf.reduce_sum(tf.cast(features, tf.float32))
        gradients = []
        for (shape, variable_dtype), sparse in zip(shapes, is_sparse):
            if sparse:
                rows = tf.fill((sparse_rows,) + shape[1:], tf.cast(value, variable_dtype))
                indices = tf.range(sparse_rows, dtype=tf.int64) % shape[0]
                gradients.append(tf.IndexedSlices(rows, indices, tf.constant(shape, tf.int64)))
            else:
                gradients.append(tf.fill(shape, tf.cast(value, variable_dtype)))
        return gradients

    def first_elements(tensors):
        firsts = []
        for t in tensors:
            t = t.values if isinstance(t, tf.IndexedSlices) else t
            firsts.append(tf.cast(tf.reshape(t, [-1])[0], tf.float32))
        return tf.add_n(firsts)

    def fill_only(features):
        return first_elements(fake_gradients(features))

    def gradient_all_reduce(features):
        context = tf.distribute.get_replica_context()
        return first_elements(context.all_reduce(tf.distribute.ReduceOp.SUM, fake_gradients(features)))

    def timed(replica_fn):
        iterator = _per_replica_input(strategy, local_batch, model.embed_dim, dtype)

        @tf.function
        def probe():
            return strategy.run(replica_fn, args=(next(iterator),))

        def once():
            for value in strategy.experimental_local_results(probe()):
                value.numpy()  # waits for the collective to finish

        for _ in range(warmup):
            once()
        start = time.perf_counter()
        for _ in range(steps):
            once()
        return 1000.0 * (time.perf_counter() - start) / steps

    empty_ms = timed(empty)
    gather_ms = timed(all_gather)
    fill_ms = timed(fill_only)
    all_reduce_ms = timed(gradient_all_reduce)
    itemsize = dtype.size
    return {
        "steps": steps,
        "num_replicas": num_replicas,
        "empty_ms": round(empty_ms, 3),
        "all_gather_ms": round(max(gather_ms - empty_ms, 0.0), 3),
        "gradient_all_reduce_ms": round(max(all_reduce_ms - fill_ms, 0.0), 3),
        "gathered_bytes": 2 * global_batch_size * model.embed_dim * itemsize,
        "all_reduced_bytes": sum(
            (sparse_rows * int(tf.TensorShape(shape[1:]).num_elements()) if sparse
             else int(tf.TensorShape(shape).num_elements())) * variable_dtype.size
            for (shape, variable_dtype), sparse in zip(shapes, is_sparse)
        ),
        "sparse_gradient_rows": sparse_rows if any(is_sparse) else 0,
    }


def run(preset, global_batch_size, steps=20, warmup=3, strategy=None):
    """`time_collectives` of `CLIP.from_preset(preset)` built in `strategy`'s scope
    (default: `MultiWorkerMirroredStrategy` under a `TF_CONFIG`, else the default)."""
    from keras_clip import CLIP

    if strategy is None:
        strategy = (tf.distribute.MultiWorkerMirroredStrategy() if os.environ.get("TF_CONFIG")
                    else tf.distribute.get_strategy())
    with strategy.scope():
        model = CLIP.from_preset(preset)
    return time_collectives(model, strategy, global_batch_size, steps=steps, warmup=warmup), strategy


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="clip_vit_tiny")
    parser.add_argument("--global_batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions of each collective")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", default="", help="JSON file the chief writes (also printed)")
    args = parser.parse_args(argv)
    result, strategy = run(args.preset, args.global_batch_size, args.steps, args.warmup)
    if _is_chief(strategy):
        print(json.dumps(result))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(result, f, indent=2)


def _is_chief(strategy):
    """The chief writes: the `chief` task, else worker 0, else the only process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not spec:
        return True
    if "chief" in spec:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and (resolver.task_id or 0) == 0


if __name__ == "__main__":
    main()
