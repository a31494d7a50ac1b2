"""Training beyond one batch in memory: pairs/s and peak memory of each step mode.

One optimisation step (`CLIP.train_step` in a `tf.function`, AdamW) on a fixed small
ViT CLIP, random weights and data, one device. Each mode runs in its own subprocess,
so its peak resident memory (`ru_maxrss`) is its own. Prints a table: median step
time, pairs/s relative to the plain step, peak RSS and its increase over the
process's RSS before the first step (model, optimizer and TF runtime).

    python benchmarks/large_batch.py [--batch 64] [--steps 5] [--image_size 64]
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
}


def model_config(image_size):
    return dict(embed_dim=128, image_size=image_size, vision_architecture="vit",
                vision_num_layers=4, vision_hidden_dim=192, vision_num_heads=3,
                vision_patch_size=8, context_length=32, text_hidden_dim=192,
                text_num_layers=4, text_num_heads=3)


def run_mode(mode, batch, steps, image_size):
    """In a subprocess: median step seconds, peak RSS and RSS before the first step."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_clip import CLIP

    keras.utils.set_random_seed(0)
    model = CLIP(**model_config(image_size), **mode.get("model", {}))
    if "lock" in mode:
        model.lock_towers(**mode["lock"])
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), **mode.get("compile", {}))
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 49407, size=(batch, 32))
    for i in range(batch):
        tokens[i, 8 + i % 20] = 49407
        tokens[i, 9 + i % 20:] = 0
    data = {"images": tf.constant(rng.normal(size=(batch, image_size, image_size, 3)), tf.float32),
            "token_ids": tf.constant(tokens, tf.int32)}
    step = tf.function(model.train_step)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    float(step(data)["loss"])  # trace + warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        float(step(data)["loss"])
        times.append(time.perf_counter() - start)
    return {"seconds": float(np.median(times)), "rss_before_mib": rss_before,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_mode(MODES[args._child], args.batch, args.steps, args.image_size)))
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    results = {}
    for name in args.modes:
        out = subprocess.run(
            [sys.executable, __file__, "--_child", name, "--batch", str(args.batch),
             "--steps", str(args.steps), "--image_size", str(args.image_size)],
            capture_output=True, text=True, env=env, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    config = model_config(args.image_size)
    print(f"ViT {config['vision_num_layers']}x{config['vision_hidden_dim']} "
          f"({(args.image_size // 8) ** 2} patches), text {config['text_num_layers']}x"
          f"{config['text_hidden_dim']}, global batch {args.batch}, one device, "
          f"median of {args.steps} steps")
    print(f"{'mode':28s} {'step s':>8s} {'pairs/s':>8s} {'vs plain':>8s} "
          f"{'peak RSS MiB':>13s} {'step RSS MiB':>13s}")
    plain = results.get("plain", next(iter(results.values())))["seconds"]
    for name, r in results.items():
        print(f"{name:28s} {r['seconds']:8.3f} {args.batch / r['seconds']:8.1f} "
              f"{plain / r['seconds']:7.2f}x {r['peak_rss_mib']:13.0f} "
              f"{r['peak_rss_mib'] - r['rss_before_mib']:13.0f}")


if __name__ == "__main__":
    main()
