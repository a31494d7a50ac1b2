"""Hostile images before and after the pixel cap and the bounded header walks (issue 13, items 4-5).

For each hostile file (built by `tests/test_image_hostile.py`), a fresh process
builds `CLIPImagePreprocessor(image_size=224)`, traces it on a normal image, then
times one call on the file and records how much its peak resident memory grew
(`ru_maxrss`). It does so with the preprocessing module of commit 0434641 (before)
and with the current one (after). Runs of the old code are protected: allocations
past `--memory_cap_gb` fail (RLIMIT_DATA) and each run is stopped after
`--timeout` seconds; such results are printed as `>` bounds.

Then, in one process, the normal path: images/s of both modules on the same
batches of 32 generated JPEGs (224x224 and 500x375), interleaved, median and
best of `--repeats`, and whether their outputs are identical.

    python benchmarks/hostile_images.py [--cases png_23000 jpeg_fill_8mb] [--repeats 7]
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OLD_COMMIT = "0434641"


def _cases():
    from tests import test_image_hostile as h

    return {
        "png_23000x23000": lambda: h.png_bomb(),
        "png_7100x7100": lambda: h.png_bomb(7100, 7100),  # just over 50 million pixels
        "jpeg_sof_60000x60000": lambda: h.jpeg_declaring(60000, 60000),
        "gif_65535x65535": lambda: h.gif_declaring(),
        "bmp_60000x60000": lambda: h.bmp_declaring(),
        "webp_16384x16384": lambda: h.webp_declaring(),
        "png_thin_20000x1": lambda: h.png_bomb(20000, 1),
        "jpeg_fill_8mb": lambda: h.jpeg_fill(),
        "jpeg_header_then_fill_8mb": lambda: h.jpeg_header_then_fill(),
        "jpeg_marker_flood_8mb": lambda: h.jpeg_marker_flood(),
        "gif_sub_block_flood_8mb": lambda: h.gif_sub_block_flood(),
        # Allowed: what an image at the limit costs (memory per pixel).
        "allowed_png_2000x2000": lambda: h.photo_bytes("PNG", 2000, 2000),
    }


def _old_module_dir():
    folder = tempfile.mkdtemp(prefix="old_preprocessor_")
    source = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:keras_clip/preprocessing/image_preprocessor.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    with open(os.path.join(folder, "old_image_preprocessor.py"), "w") as f:
        f.write(source)
    return folder


def _load(version, old_dir):
    if version == "old":
        sys.path.insert(0, old_dir)
        import old_image_preprocessor as module
    else:
        from keras_clip.preprocessing import image_preprocessor as module
    return module


def worker(version, case, old_dir, memory_cap_gb):
    """One case in this (fresh) process; prints a JSON line."""
    import tensorflow as tf

    from tests import test_image_hostile as h

    module = _load(version, old_dir)
    layer = module.CLIPImagePreprocessor(image_size=224)
    layer(tf.constant([h.photo_bytes("JPEG", 300, 200)]))  # trace
    data = tf.constant([_cases()[case]()])
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    with open("/proc/self/status") as f:
        data_kb = [int(line.split()[1]) for line in f if line.startswith("VmData")][0]
    resource.setrlimit(resource.RLIMIT_DATA, (data_kb * 1024 + int(memory_cap_gb * 2**30), hard))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        layer(data)
        outcome = "accepted"
    except tf.errors.InvalidArgumentError as e:
        lines = [line for line in e.message.splitlines() if "image bytes" in line or "JPEG data" in line
                 or "GIF data" in line]
        outcome = "INVALID_ARGUMENT: " + (lines[0].strip() if lines else e.message.splitlines()[0])[:160]
    except Exception as e:  # noqa: BLE001 - report whatever the old code does
        outcome = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    seconds = time.perf_counter() - start
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"seconds": seconds, "rss_growth_mb": growth, "outcome": outcome, "bytes": int(
        tf.strings.length(data[0]))}))


def run_case(version, case, old_dir, timeout, memory_cap_gb):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, __file__, "--worker", version, "--cases", case, "--old_dir", old_dir,
               "--memory_cap_gb", str(memory_cap_gb)]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "rss_growth_mb": None, "outcome": f"still running after {timeout} s: stopped"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1][:120]
        return {"seconds": None, "rss_growth_mb": None,
                "outcome": f"process died (exit {result.returncode}): {tail}"}
    return json.loads(lines[-1])


def throughput(old_dir, repeats):
    import numpy as np
    import tensorflow as tf

    from tests import test_image_hostile as h

    old, new = _load("old", old_dir), _load("new", old_dir)
    rows = []
    for width, height in ((224, 224), (500, 375)):
        batch = tf.constant([h.photo_bytes("JPEG", width, height, seed=i, quality=90) for i in range(32)])
        layers = {"before": old.CLIPImagePreprocessor(224), "after": new.CLIPImagePreprocessor(224)}
        outputs = {name: layer(batch).numpy() for name, layer in layers.items()}  # trace
        times = {name: [] for name in layers}
        for _ in range(repeats):
            for name, layer in layers.items():
                start = time.perf_counter()
                layer(batch)
                times[name].append(time.perf_counter() - start)
        median = {name: 32 / float(np.median(t)) for name, t in times.items()}
        best = {name: 32 / float(np.min(t)) for name, t in times.items()}
        rows.append((f"{width}x{height} JPEG", median["before"], median["after"], best["before"],
                     best["after"], bool(np.array_equal(outputs["before"], outputs["after"]))))
    return rows


def _fmt(value, unit):
    return "-" if value is None else f"{value:.3f} {unit}" if unit == "s" else f"{value:.0f} {unit}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--memory_cap_gb", type=float, default=6.0)
    parser.add_argument("--worker", choices=("old", "new"))
    parser.add_argument("--old_dir")
    parser.add_argument("--skip_old", action="store_true", help="Only the current code for hostile files.")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.cases[0], args.old_dir, args.memory_cap_gb)
        return
    old_dir = _old_module_dir()
    cases = args.cases or list(_cases())
    print(f"Hostile files, CLIPImagePreprocessor(image_size=224), fresh process each; "
          f"before = {OLD_COMMIT} (capped at {args.memory_cap_gb:g} GB more data, {args.timeout:g} s)")
    print(f"{'case':28s} {'version':7s} {'time':>10s} {'peak RSS +':>11s}  outcome")
    for case in cases:
        for version in (("new",) if args.skip_old else ("old", "new")):
            r = run_case(version, case, old_dir, args.timeout, args.memory_cap_gb)
            label = "before" if version == "old" else "after"
            print(f"{case:28s} {label:7s} {_fmt(r['seconds'], 's'):>10s} {_fmt(r['rss_growth_mb'], 'MB'):>11s}"
                  f"  {r['outcome']}", flush=True)
    print(f"\nNormal path, batches of 32, {args.repeats} interleaved runs (images/s; best-of is the"
          " least disturbed by other load)")
    print(f"{'batch':16s} {'median before':>14s} {'after':>8s} {'ratio':>6s} {'best before':>12s} "
          f"{'after':>8s} {'ratio':>6s}  identical outputs")
    for name, before, after, best_before, best_after, same in throughput(old_dir, args.repeats):
        print(f"{name:16s} {before:14.1f} {after:8.1f} {after / before:6.3f} {best_before:12.1f} "
              f"{best_after:8.1f} {best_after / best_before:6.3f}  {same}")


if __name__ == "__main__":
    main()
