"""Exported bf16 SavedModel against the float32 one: zero-shot CIFAR-10 through `classify`.

Exports one model twice with `keras_clip.export.export_saved_model` (`dtype=None`, the
float32 model, and `dtype="bfloat16"`, weights stored in bf16) with the CIFAR-10 class
names and templates baked into `classify`, loads each SavedModel as TF Serving would
(`import tensorflow_text`, `tf.saved_model.load`, the `classify` signature), and sends the
JPEG bytes of `--count` CIFAR-10 test images (the seeded subset of
`python -m keras_clip.evaluate --max_examples`). Prints each export's top-1 accuracy,
their top-1 agreement, the largest score difference and the size of each SavedModel.

    python benchmarks/export_bf16_zero_shot.py --preset PRESET [--count 2000]
        [--templates simple|cifar10] [--data_dir ../shared/data]

A trained model makes the comparison meaningful (random weights sit at chance, where
near-ties flip under any rounding); any `CLIP.from_preset` source works.
"""
import argparse
import csv
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = next((p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").exists()),
            ROOT / "missing")
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_vs_open_clip import SIMPLE_TEMPLATES  # noqa: E402  (the issue-14 benchmark's 4)


def folder_bytes(path):
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--templates", choices=["simple", "cifar10"], default="simple")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--data_dir", default=str(DATA))
    args = p.parse_args(argv)

    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (the tokenizer's ops, as TF Serving links them)

    from keras_clip import CLIP
    from keras_clip.evaluation.datasets import _select
    from keras_clip.export import export_saved_model
    from keras_clip.zero_shot_data import load_dataset_prompts

    cifar_dir = os.path.join(args.data_dir, "cifar10_test")
    class_names, templates = load_dataset_prompts("cifar10")
    if args.templates == "simple":
        templates = list(SIMPLE_TEMPLATES)
    with open(os.path.join(cifar_dir, "labels.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [rows[i] for i in _select(len(rows), args.count, seed=0)]
    images = [open(os.path.join(cifar_dir, row["path"]), "rb").read() for row in rows]
    labels = np.array([int(row["label"]) for row in rows])

    model = CLIP.from_preset(args.preset, dtype="float32")
    out = tempfile.mkdtemp(prefix="export_bf16_")
    results = {}
    for name, dtype in (("float32", None), ("bfloat16", "bfloat16")):
        base = os.path.join(out, name)
        version_dir = export_saved_model(model, base, 1, class_names=class_names,
                                         templates=templates, dtype=dtype)
        classify = tf.saved_model.load(version_dir).signatures["classify"]
        scores, start = [], time.perf_counter()
        for i in range(0, len(images), args.batch):
            scores.append(classify(image_bytes=tf.constant(images[i:i + args.batch]))["scores"].numpy())
        scores = np.concatenate(scores)
        results[name] = {"scores": scores, "seconds": time.perf_counter() - start,
                         "bytes": folder_bytes(os.path.join(version_dir, "variables"))}
    print(f"model: {args.preset}; CIFAR-10: {len(labels)} test images (seeded subset of "
          f"keras_clip.evaluate --max_examples), {len(templates)} templates {templates}")
    print("\n| export | top-1 | classify s | variables MB |\n|---|---|---|---|")
    top1 = {}
    for name, r in results.items():
        top1[name] = r["scores"].argmax(1)
        print(f"| {name} | {np.mean(top1[name] == labels):.2%} | {r['seconds']:.1f} | "
              f"{r['bytes'] / 2**20:.1f} |")
    agree = np.mean(top1["float32"] == top1["bfloat16"])
    diff = np.abs(results["float32"]["scores"] - results["bfloat16"]["scores"]).max()
    flips = np.flatnonzero(top1["float32"] != top1["bfloat16"])
    print(f"\ntop-1 agreement bf16 vs float32: {agree:.2%} ({len(flips)} of {len(labels)} images "
          f"differ); largest softmax score difference {diff:.4f}")
    if len(flips):
        gaps = []
        for i in flips:
            s = np.sort(results["float32"]["scores"][i])[::-1]
            gaps.append(s[0] - s[1])
        print(f"float32's top-1 margin on the images that differ: max {max(gaps):.4f}, "
              f"median {np.median(gaps):.4f}")


if __name__ == "__main__":
    main()
