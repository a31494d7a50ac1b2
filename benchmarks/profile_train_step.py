"""Where a keras_clip training step spends its time: input pipeline, towers forward and
backward, loss, optimizer update (issue 15, part 3).

The model is issue 14's / `speed_vs_open_clip.py`'s training model (6-layer 128 px ViT/16
width 256, 6-layer text width 256, context 32, embedding 256, GELU) at batch 128 by
default, `mixed_bfloat16` (fp32 master weights) or `float32`, AdamW built by the trainer's
own `create_optimizer`.

1. Stages, timed in turn round after round (median): `forward` (both towers, logits and
   loss), `forward+backward` (gradients of the loss), `train_step` (the trainer's step:
   forward, backward, optimizer update on the fp32 weights, trackers), each its own
   `tf.function` on the same batch. Backward = forward+backward - forward; optimizer =
   train_step - forward+backward.
2. The input pipeline alone: batches/s of the trainer's reader (`DataSpec.dataset`, the
   training transform) on Flickr8k photos, against the steps/s of the model.
3. One traced `train_step` (TensorFlow's profiler, `tf.profiler.experimental`): op kernel
   time grouped by part of the step (image tower / text tower forward, their gradients,
   loss and logits, optimizer) from the op names, and by op type (matmuls against the
   rest); a bf16 (or float32) `tf.matmul` peak measured in the same process.

    python benchmarks/profile_train_step.py [--precision mixed_bfloat16|float32]
        [--batch 128] [--rounds 5] [--data_dir ../shared/data]

Without Flickr8k (no `--data_dir`), the step runs on random pixels and tokens of the
captions' length and the pipeline part is skipped.
"""
import argparse
import collections
import glob
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = next((p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").exists()),
            ROOT / "missing")
MODEL = dict(embed_dim=256, image_size=128, vision_architecture="vit", vision_patch_size=16,
             vision_num_layers=6, vision_hidden_dim=256, vision_num_heads=4, context_length=32,
             text_hidden_dim=256, text_num_layers=6, text_num_heads=4, activation="gelu")
MATMUL_OPS = ("MatMul", "BatchMatMul", "Conv2D", "Einsum")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", default="mixed_bfloat16", choices=["mixed_bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pipeline_batches", type=int, default=10)
    p.add_argument("--peak_size", type=int, default=2048)
    p.add_argument("--data_dir", default=str(DATA))
    p.add_argument("--show_names", type=int, default=0,
                   help="also print the N slowest op names of each part (to check the grouping)")
    return p.parse_args(argv)


def flickr_table(flickr, path):
    """`image<TAB>caption` rows of the Flickr8k training captions (the trainer's table)."""
    import csv

    with open(flickr / "captions.tsv", newline="", encoding="utf-8") as f, open(path, "w") as out:
        out.write("image\tcaption\n")
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["split"] == "train":
                out.write(f"{row['image']}\t{row['caption'].replace(chr(9), ' ')}\n")


def part_of(name):
    """The part of the step an op belongs to, from its name scope."""
    lower = name.lower()
    backward = "gradient_tape/" in lower or "gradients/" in lower
    if "adamw" in lower or "/adam/" in lower or lower.startswith("adam") or "optimizer" in lower \
            or "assignaddvariableop" in lower or "resourceapply" in lower:
        return "optimizer update"
    if "visual" in lower or "vision" in lower:
        return "image tower backward" if backward else "image tower forward"
    if "/text/" in lower or lower.startswith("text/") or "text_" in lower or "token_embedding" in lower:
        return "text tower backward" if backward else "text tower forward"
    if backward:
        return "loss and logits backward"
    if any(k in lower for k in ("logit", "loss", "softmax_cross", "l2_normal", "sparse", "normalize")):
        return "loss and logits forward"
    return "other (trackers, casts, copies)"


def trace_ops(step, data, logdir):
    """Kernel microseconds of one `step(data)` call, by op name `(name, type)`."""
    import tensorflow as tf

    try:
        from tsl.profiler.protobuf import xplane_pb2
    except ImportError:  # the copy TensorFlow's wheel ships
        from tensorflow.tsl.profiler.protobuf import xplane_pb2

    shutil.rmtree(logdir, ignore_errors=True)
    tf.profiler.experimental.start(logdir)
    step(data)
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1], "rb") as f:
        space.ParseFromString(f.read())
    micros = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                label = plane.event_metadata[event.metadata_id].name
                if ":" not in label or "::" in label:  # executor bookkeeping, not an op
                    continue
                name, _, op_type = label.rpartition(":")
                micros[(name, op_type)] += event.duration_ps / 1e6
    return micros


def flops_per_step(model, batch, text_length):
    """Multiply-adds x 2 of the step's matmuls: forward, and backward as twice forward."""
    v, t = model.visual, model.text
    tokens = v.grid_size**2 + 1
    d, f = v.hidden_dim, v.intermediate_dim
    image = (2 * batch * tokens * d * (4 * d + 2 * f) + 4 * batch * tokens**2 * d) * v.num_layers
    image += 2 * batch * v.grid_size**2 * d * 3 * v.patch_size**2 + 2 * batch * d * v.embed_dim
    dt, ft = t.hidden_dim, t.intermediate_dim
    text = (2 * batch * text_length * dt * (4 * dt + 2 * ft) + 4 * batch * text_length**2 * dt) * t.num_layers
    text += 2 * batch * dt * model.embed_dim
    logits = 2 * 2 * batch * batch * model.embed_dim
    return 3 * (image + text + logits)


def main(argv=None):
    args = parse_args(argv)
    import tensorflow as tf

    from keras_clip import CLIP
    from keras_clip.data.spec import DataSpec
    from keras_clip.training.optimizer import WarmupCosineDecay, create_optimizer

    print(f"uptime at start: {os.popen('uptime').read().strip()}")
    model = CLIP(**MODEL, dtype=args.precision)
    optimizer = create_optimizer(model, WarmupCosineDecay(5e-4, 100, 702), weight_decay=0.2)
    model.compile(optimizer=optimizer)
    optimizer.build(model.trainable_variables)

    flickr = pathlib.Path(args.data_dir) / "flickr8k"
    tmp = tempfile.mkdtemp(prefix="profile_train_step_")
    pipeline_rate = None
    if flickr.exists():
        table = os.path.join(tmp, "train.tsv")
        flickr_table(flickr, table)
        dataset = DataSpec.parse(table, image_root=str(flickr / "images")).dataset(
            preprocessing=model.preprocessor_config, batch_size=args.batch, training=True,
            seed=0, repeat=True)
        iterator = iter(dataset)
        batch = next(iterator)  # traces the decoding graphs
        start = time.perf_counter()
        for _ in range(args.pipeline_batches):
            next(iterator)
        pipeline_rate = args.pipeline_batches / (time.perf_counter() - start)
        data = {"images": batch["images"], "token_ids": batch["token_ids"]}
        source = "Flickr8k through the trainer's reader (training transform)"
    else:
        rng = np.random.default_rng(0)
        data = {"images": tf.constant(rng.standard_normal((args.batch, 128, 128, 3)), tf.float32),
                "token_ids": tf.constant(rng.integers(1, 49000, (args.batch, 32)), tf.int32)}
        source = "random pixels and tokens (no Flickr8k)"
    text_length = int(tf.reduce_max(tf.reduce_sum(tf.cast(data["token_ids"] != 0, tf.int32), 1)))

    @tf.function
    def forward(data):
        out, _ = model._contrastive_step(data, training=True)
        return out["loss"]

    @tf.function
    def forward_backward(data):
        with tf.GradientTape() as tape:
            out, _ = model._contrastive_step(data, training=True)
        return tape.gradient(out["loss"], model.trainable_variables)

    train_step = tf.function(model.train_step)
    n = args.peak_size
    compute = tf.bfloat16 if "bfloat16" in args.precision else tf.float32
    a = tf.constant(np.random.default_rng(1).standard_normal((n, n)), compute)
    peak_fn = tf.function(lambda a: tf.matmul(a, a)[0, 0])

    stages = {"forward": lambda: forward(data), "forward+backward": lambda: forward_backward(data),
              "train_step": lambda: train_step(data), "peak": lambda: peak_fn(a)}
    # train_step changes the weights: the stage timings use the same batch throughout, so
    # the step's cost does not depend on it.
    for fn in stages.values():
        fn()
    times = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, fn in stages.items():
            start = time.perf_counter()
            result = fn()
            tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)
            times[name].append(time.perf_counter() - start)
    median = {k: float(np.median(v)) for k, v in times.items()}
    peak_rate = 2 * n**3 / median["peak"] / 1e9
    step_flops = flops_per_step(model, args.batch, text_length)

    micros = trace_ops(train_step, data, os.path.join(tmp, "trace"))
    shutil.rmtree(tmp, ignore_errors=True)
    by_part, by_type, count = collections.Counter(), collections.Counter(), collections.Counter()
    for (name, op_type), us in micros.items():
        by_part[part_of(name)] += us
        by_type[op_type] += us
        count[op_type] += 1
    total = sum(micros.values())
    matmul = sum(us for (name, op_type), us in micros.items() if any(m in op_type for m in MATMUL_OPS))

    print(f"model: issue 14's (6+6 layers, width 256, 128 px ViT/16, context 32), "
          f"{args.precision}, batch {args.batch}, {model.count_params():,} parameters; "
          f"data: {source}; longest caption {text_length} tokens (the text tower is trimmed to it)")
    print(f"uptime at end: {os.popen('uptime').read().strip()}")
    step = median["train_step"]
    print(f"\ntrain_step: {step * 1e3:.0f} ms = {args.batch / step:.1f} pairs/s "
          f"({step_flops / 1e9:.0f} GFLOP of matmuls, {step_flops / step / 1e9:.1f} GFLOP/s; "
          f"{compute.name} tf.matmul {n}^3 in the same run: {peak_rate:.1f} GFLOP/s)")
    print("\n| stage (median of %d rounds, wall) | ms | share of the step |\n|---|---|---|" % args.rounds)
    rows = [("forward (towers, logits, loss)", median["forward"]),
            ("backward", median["forward+backward"] - median["forward"]),
            ("optimizer update and trackers", step - median["forward+backward"])]
    for label, seconds in rows:
        print(f"| {label} | {seconds * 1e3:.0f} | {seconds / step:.0%} |")
    if pipeline_rate is not None:
        print(f"\ninput pipeline alone: {pipeline_rate * args.batch:.0f} pairs/s "
              f"({pipeline_rate:.2f} batches/s against the step's {1 / step:.2f} steps/s: "
              f"{'not' if pipeline_rate > 1 / step else 'IS'} the bottleneck; in training it "
              f"runs ahead on tf.data's own threads, sharing the same 2 cores)")
    print(f"\ntraced train_step: op kernels {total / 1e3:.0f} ms summed over threads, of which "
          f"matmuls {matmul / 1e3:.0f} ms ({matmul / total:.0%})")
    print("\n| part of the step (traced kernels) | ms | share |\n|---|---|---|")
    for part, us in by_part.most_common():
        print(f"| {part} | {us / 1e3:.0f} | {us / total:.1%} |")
    if args.show_names:
        for part in by_part:
            names = sorted(((us, name) for (name, _), us in micros.items() if part_of(name) == part),
                           reverse=True)[:args.show_names]
            print(f"\n{part}: " + "; ".join(f"{name} {us / 1e3:.1f}" for us, name in names))
    print("\n| op type | ms | share | count |\n|---|---|---|---|")
    for op_type, us in by_type.most_common(18):
        print(f"| {op_type} | {us / 1e3:.1f} | {us / total:.1%} | {count[op_type]} |")


if __name__ == "__main__":
    main()
