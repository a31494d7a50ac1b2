"""Training beyond one batch in memory: pairs/s and peak memory of each step mode.

One optimisation step (`CLIP.train_step` in a `tf.function`, AdamW) on a fixed small
ViT CLIP, random weights and data, one device. Each mode runs in its own subprocess,
so its peak resident memory (`ru_maxrss`) is its own.

Speed (default): every mode at the same global batch, `--rounds` rounds with the
modes interleaved (the fastest round of each mode is kept: the machine is shared).
Prints median step time, pairs/s relative to the plain step, peak RSS and its
increase over the process's RSS before the first step (model, optimizer and TF
runtime). Two extra modes time the image tower alone (forward + backward + AdamW
update of the image tower only) with patch dropout 0 and 0.5.

Memory (`--memory_budget_mib M`): for plain, gradient caching (chunks of
`--chunk_size` pairs, K = batch / chunk_size), remat and both, the largest global
batch (a multiple of `--chunk_size`, up to `--max_batch`) whose step keeps the
process's peak RSS within M: doubling, then bisection; one subprocess and one step
per tried batch.

    python benchmarks/large_batch.py [--batch 128] [--steps 3] [--rounds 2]
    python benchmarks/large_batch.py --memory_budget_mib 1536 [--chunk_size 32]
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

MODES = {
    "plain": {},
    "sigmoid loss": {"model": {"loss": "sigmoid"}},
    "gradient cache K=4": {"compile": {"gradient_cache_chunks": 4}},
    "remat": {"compile": {"remat": True}},
    "gradient cache K=4 + remat": {"compile": {"gradient_cache_chunks": 4, "remat": True}},
    "patch dropout 0.5": {"model": {"vision_patch_dropout": 0.5}},
    "lock image tower": {"lock": {"image": True}},
    "lock text tower": {"lock": {"text": True}},
    "image tower only": {"image_tower_only": True},
    "image tower only, patch dropout 0.5": {"image_tower_only": True,
                                            "model": {"vision_patch_dropout": 0.5}},
}
# The memory search's modes: gradient caching with a fixed chunk size.
MEMORY_MODES = {
    "plain": {},
    "gradient cache": {"chunk_size": True},
    "remat": {"compile": {"remat": True}},
    "gradient cache + remat": {"chunk_size": True, "compile": {"remat": True}},
}


def model_config(image_size):
    return dict(embed_dim=128, image_size=image_size, vision_architecture="vit",
                vision_num_layers=4, vision_hidden_dim=192, vision_num_heads=3,
                vision_patch_size=8, context_length=32, text_hidden_dim=192,
                text_num_layers=4, text_num_heads=3)


def build_step(mode, batch, image_size, chunk_size=32):
    """`(step, data)`: the mode's compiled step function and a random batch."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_clip import CLIP

    keras.utils.set_random_seed(0)
    model = CLIP(**model_config(image_size), **mode.get("model", {}))
    if "lock" in mode:
        model.lock_towers(**mode["lock"])
    compile_kwargs = dict(mode.get("compile", {}))
    if mode.get("chunk_size"):
        compile_kwargs["gradient_cache_chunks"] = max(1, batch // chunk_size)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), **compile_kwargs)
    if not mode.get("image_tower_only"):
        model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 49407, size=(batch, 32))
    for i in range(batch):
        tokens[i, 8 + i % 20] = 49407
        tokens[i, 9 + i % 20:] = 0
    data = {"images": tf.constant(rng.normal(size=(batch, image_size, image_size, 3)), tf.float32),
            "token_ids": tf.constant(tokens, tf.int32)}
    step = image_tower_step(model) if mode.get("image_tower_only") else tf.function(model.train_step)
    return step, data


def run_mode(mode, batch, steps, image_size, chunk_size=32):
    """In a subprocess: median step seconds, peak RSS and RSS before the first step."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    step, data = build_step(mode, batch, image_size, chunk_size)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    float(step(data)["loss"])  # trace + warm-up
    times = [time.perf_counter() - start] if not steps else []
    for _ in range(steps):
        start = time.perf_counter()
        float(step(data)["loss"])
        times.append(time.perf_counter() - start)
    return {"seconds": float(np.median(times)), "rss_before_mib": rss_before,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def interleaved_speed(args, modes):
    """Every mode in this one process, steps interleaved A B C A B C ...: median seconds.

    The modes share the machine's state at every moment, so their ratios hold under a
    changing load; memory is not measured here (see `--memory_budget_mib`).
    """
    import numpy as np

    steps = {name: build_step(MODES[name], args.batch, args.image_size, args.chunk_size)
             for name in modes}
    # Warm up after every model is built: `build_step` resets the global seed, and a
    # tf.function retraces when the global seed changes.
    for step, data in steps.values():
        float(step(data)["loss"])  # trace + warm-up
    times = {name: [] for name in modes}
    loads = [os.getloadavg()[0]]
    for _ in range(args.steps):
        for name in modes:
            step, data = steps[name]
            start = time.perf_counter()
            float(step(data)["loss"])
            times[name].append(time.perf_counter() - start)
    loads.append(os.getloadavg()[0])
    print(f"global batch {args.batch}, one process, {args.steps} interleaved steps per mode "
          f"(median); load average (1 min) before/after: {loads[0]:.1f} {loads[1]:.1f}")
    seconds = {name: float(np.median(t)) for name, t in times.items()}
    print(f"{'mode':36s} {'step s':>8s} {'pairs/s':>8s} {'vs plain':>8s}  all step times (s)")
    plain = seconds.get("plain", next(iter(seconds.values())))
    for name, value in seconds.items():
        print(f"{name:36s} {value:8.3f} {args.batch / value:8.1f} {plain / value:7.2f}x  "
              + " ".join(f"{t:.2f}" for t in times[name]))
    if "image tower only" in seconds and "image tower only, patch dropout 0.5" in seconds:
        print(f"image tower alone: patch dropout 0.5 gives "
              f"{seconds['image tower only'] / seconds['image tower only, patch dropout 0.5']:.2f}x "
              f"the pairs/s of patch dropout 0")


def image_tower_step(model):
    """A step of the image tower alone: embed, a fixed linear loss, AdamW on its weights."""
    import keras
    import tensorflow as tf

    weights = model.visual.trainable_variables
    optimizer = keras.optimizers.AdamW(1e-4)
    optimizer.build(weights)
    direction = tf.random.stateless_normal((1, model.embed_dim), (0, 1))

    @tf.function
    def step(data):
        with tf.GradientTape() as tape:
            embeddings = model.visual(data["images"], training=True)  # (B, E)
            loss = tf.reduce_mean(tf.reduce_sum(embeddings * direction, axis=-1))
        optimizer.apply(tape.gradient(loss, weights), weights)
        return {"loss": loss}

    return step


def _child(name, table, batch, steps, image_size, chunk_size):
    """One mode in a fresh interpreter: its figures (dict)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, __file__, "--_child", name, "--_table", table, "--batch", str(batch),
         "--steps", str(steps), "--image_size", str(image_size), "--chunk_size", str(chunk_size)],
        capture_output=True, text=True, env=env)
    if out.returncode:
        return {"failed": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_search(args):
    """Largest batch per memory mode whose peak RSS stays within the budget."""
    print(f"Memory budget {args.memory_budget_mib} MiB peak RSS; gradient cache chunks of "
          f"{args.chunk_size} pairs; batches multiple of {args.chunk_size} up to {args.max_batch}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = {}
    for name in args.modes or list(MEMORY_MODES):
        tried = {}

        def fits(batch):
            if batch not in tried:
                tried[batch] = _child(name, "memory", batch, 0, args.image_size, args.chunk_size)
                r = tried[batch]
                print(f"  {name:24s} batch {batch:5d}: peak RSS "
                      f"{r.get('peak_rss_mib', float('nan')):7.0f} MiB "
                      f"({r.get('seconds', float('nan')):.1f} s first step) {r.get('failed', '')}",
                      flush=True)
            r = tried[batch]
            return "failed" not in r and r["peak_rss_mib"] <= args.memory_budget_mib

        low, high = 0, None  # low fits (0: nothing yet), high does not
        batch = args.start_batch or args.chunk_size
        while batch <= args.max_batch:
            if not fits(batch):
                high = batch
                break
            low, batch = batch, batch * 2
        if high is not None:
            while high - low > args.chunk_size:
                middle = (low + high) // 2 // args.chunk_size * args.chunk_size
                if fits(middle):
                    low = middle
                else:
                    high = middle
        rows[name] = (low, high, tried)
    print(f"{'mode':24s} {'largest batch':>14s} {'peak RSS MiB':>13s} {'next batch (over)':>18s}")
    for name, (low, high, tried) in rows.items():
        over = f"{high} ({tried[high].get('peak_rss_mib', float('nan')):.0f})" if high else "none tried"
        capped = "" if high else f" (cap {args.max_batch})"
        peak = tried[low]["peak_rss_mib"] if low else float("nan")
        print(f"{name:24s} {str(low) + capped:>14s} {peak:13.0f} {over:>18s}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--in_process", action="store_true",
                        help="speed only: all modes in one process, steps interleaved")
    parser.add_argument("--modes", nargs="*", default=None)
    parser.add_argument("--memory_budget_mib", type=float, default=None)
    parser.add_argument("--chunk_size", type=int, default=32)
    parser.add_argument("--max_batch", type=int, default=1024)
    parser.add_argument("--start_batch", type=int, default=None,
                        help="first batch the memory search tries (default: --chunk_size)")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_table", default="speed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    print("Command: python benchmarks/large_batch.py " + " ".join(sys.argv[1:]), flush=True)
    if args._child:
        table = MODES if args._table == "speed" else MEMORY_MODES
        print(json.dumps(run_mode(table[args._child], args.batch, args.steps, args.image_size,
                                  args.chunk_size)))
        return
    config = model_config(args.image_size)
    print(f"ViT {config['vision_num_layers']}x{config['vision_hidden_dim']} "
          f"({(args.image_size // 8) ** 2} patches), text {config['text_num_layers']}x"
          f"{config['text_hidden_dim']}, one device", flush=True)
    if args.memory_budget_mib:
        memory_search(args)
        return
    modes = args.modes or list(MODES)
    if args.in_process:
        interleaved_speed(args, modes)
        return
    results, loads = {}, []
    for round_index in range(args.rounds):
        loads.append(os.getloadavg()[0])
        order = modes if round_index % 2 == 0 else modes[::-1]  # interleaved A/B
        for name in order:
            r = _child(name, "speed", args.batch, args.steps, args.image_size, args.chunk_size)
            print(f"  round {round_index + 1} {name:36s} {r.get('seconds', float('nan')):.3f} s/step",
                  flush=True)
            if "failed" in r:
                raise SystemExit(f"{name} failed: {r['failed']}")
            if name not in results or r["seconds"] < results[name]["seconds"]:
                results[name] = r
    loads.append(os.getloadavg()[0])
    print(f"global batch {args.batch}, median of {args.steps} steps, fastest of {args.rounds} "
          f"interleaved rounds; load average (1 min) at round starts/end: "
          + " ".join(f"{x:.1f}" for x in loads))
    print(f"{'mode':36s} {'step s':>8s} {'pairs/s':>8s} {'vs plain':>8s} "
          f"{'peak RSS MiB':>13s} {'step RSS MiB':>13s}")
    plain = results.get("plain", next(iter(results.values())))["seconds"]
    for name, r in results.items():
        if name == "image tower only, patch dropout 0.5" and "image tower only" in results:
            # against the image tower alone without patch dropout, not the full step
            print(f"  (image tower only: patch dropout 0.5 is "
                  f"{results['image tower only']['seconds'] / r['seconds']:.2f}x the pairs/s of 0)")
        print(f"{name:36s} {r['seconds']:8.3f} {args.batch / r['seconds']:8.1f} "
              f"{plain / r['seconds']:7.2f}x {r['peak_rss_mib']:13.0f} "
              f"{r['peak_rss_mib'] - r['rss_before_mib']:13.0f}")


if __name__ == "__main__":
    main()
