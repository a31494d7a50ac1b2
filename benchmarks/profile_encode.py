"""Where keras_clip's image encoding spends its time, op by op, against the matmul peak.

Traces one `encode_image` call of a random-weight ViT (ViT-B/32 by default, batch 32)
with TensorFlow's step statistics (`RunOptions(trace_level=FULL_TRACE)` on the frozen
graph of the `tf.function`, with grappler's oneDNN rewrites applied as in any TF run),
groups kernel time by op type, and sets the achieved GFLOP/s of the matrix
multiplies and of the whole call against a large bf16 (or float32) `tf.matmul`
measured in the same process.

    python benchmarks/profile_encode.py [--dtype bfloat16|mixed_bfloat16|float32]
        [--batch 32] [--preset clip_vit_b32] [--repeats 3]

Freezing turns weights into constants: the cast of float32 weights that a
`mixed_bfloat16` model does on every call is then folded away, so that policy's
per-call casts are not in this profile (they are in benchmarks/speed_vs_open_clip.py).
"""
import argparse
import collections
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MATMUL_OPS = ("MatMul", "FusedMatMul", "BatchMatMul", "Conv2D", "Einsum")


def vit_flops(model, batch):
    """Multiply-adds x 2 of a ViT image tower's matmuls and convolution."""
    v = model.visual
    tokens = v.grid_size**2 + 1
    rows = batch * tokens
    d, f = v.hidden_dim, v.intermediate_dim
    per_layer = 2 * rows * d * (3 * d + d + 2 * f) + 2 * 2 * batch * tokens * tokens * d
    conv = 2 * batch * v.grid_size**2 * d * 3 * v.patch_size**2
    return conv + v.num_layers * per_layer + 2 * batch * d * v.embed_dim


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--preset", default="clip_vit_b32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak_size", type=int, default=2048)
    args = parser.parse_args()
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    import keras_clip

    model = keras_clip.CLIP.from_preset(args.preset, load_weights=False, dtype=args.dtype)
    size = model.image_size
    fn = tf.function(lambda x: model.encode_image(x))
    frozen = convert_variables_to_constants_v2(
        fn.get_concrete_function(tf.TensorSpec((args.batch, size, size, 3), tf.float32)))
    graph = tf.Graph()
    compute = tf.bfloat16 if "bfloat16" in args.dtype else tf.float32
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, (args.batch, size, size, 3))
        (embeddings,) = tf.import_graph_def(
            frozen.graph.as_graph_def(), input_map={frozen.inputs[0].name: images},
            return_elements=[frozen.outputs[0].name])
        n = args.peak_size
        a = tf.compat.v1.placeholder(compute, (n, n))
        peak = tf.reduce_sum(tf.cast(tf.matmul(a, a), tf.float32))
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    x = np.random.default_rng(0).standard_normal((args.batch, size, size, 3)).astype("float32")
    a_value = np.random.default_rng(1).standard_normal((n, n)).astype(compute.as_numpy_dtype)
    with tf.compat.v1.Session(graph=graph, config=config) as session:
        walls, peaks = [], []
        session.run(embeddings, {images: x})
        session.run(peak, {a: a_value})
        for _ in range(args.repeats):  # interleaved, so load hits both alike
            start = time.perf_counter()
            session.run(embeddings, {images: x})
            walls.append(time.perf_counter() - start)
            start = time.perf_counter()
            session.run(peak, {a: a_value})
            peaks.append(time.perf_counter() - start)
        metadata = tf.compat.v1.RunMetadata()
        session.run(embeddings, {images: x}, run_metadata=metadata, options=tf.compat.v1.RunOptions(
            trace_level=tf.compat.v1.RunOptions.FULL_TRACE))
    by_op, count = collections.Counter(), collections.Counter()
    for device in metadata.step_stats.dev_stats:
        for node in device.node_stats:
            label = node.timeline_label
            op = label.split("(")[0].split("=")[-1].strip() if "=" in label else node.node_name
            by_op[op] += node.op_end_rel_micros - node.op_start_rel_micros
            count[op] += 1
    total = sum(by_op.values())
    matmul = sum(t for op, t in by_op.items() if any(m in op for m in MATMUL_OPS))
    flops = vit_flops(model, args.batch)
    peak_rate = 2 * n**3 / float(np.median(peaks)) / 1e9
    wall = float(np.median(walls))
    print(f"{args.preset} {args.dtype} batch {args.batch}: {args.batch / wall:.1f} images/s, "
          f"{flops / 1e9:.1f} GFLOP per call")
    print(f"{compute.name} tf.matmul {n}^3 peak in the same run: {peak_rate:.1f} GFLOP/s")
    print(f"whole call: {flops / wall / 1e9:.1f} GFLOP/s ({flops / wall / 1e9 / peak_rate:.0%} of peak)")
    print(f"traced call: kernels {total / 1e3:.0f} ms, of which matmul/conv {matmul / 1e3:.0f} ms "
          f"({matmul / total:.0%}) at {flops / (matmul / 1e6) / 1e9:.1f} GFLOP/s "
          f"({flops / (matmul / 1e6) / 1e9 / peak_rate:.0%} of peak)")
    print("| op | ms | share | count |\n|---|---|---|---|")
    for op, t in by_op.most_common(16):
        if t > 0:
            print(f"| {op} | {t / 1e3:.1f} | {t / total:.1%} | {count[op]} |")


if __name__ == "__main__":
    main()
