"""Figures for the training-fault fixes (docs/reliability/training.md).

    python benchmarks/training_faults.py                   # both parts
    python benchmarks/training_faults.py --throughput_only  # e.g. against older code

1. Time until a repeating training stream with no usable record raises (before
   the fix: never), for a TFRecord of non-images, an empty TFRecord and a CSV
   whose image files are not images. Pipeline only: no model, no TF start-up.
2. Training-pipeline throughput (examples/s, repeat=True, 64-pixel demo JPEGs
   at image_size=32, batch 32) so that the per-pass markers and per-record
   positions can be compared with the code before them: run once with each
   PYTHONPATH, same machine, same minute.
"""
import argparse
import csv
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from keras_clip import demo_data  # noqa: E402
from keras_clip.data import pipeline, shards  # noqa: E402


def time_to_error(make_dataset):
    start = time.perf_counter()
    try:
        next(iter(make_dataset()))
    except tf.errors.InvalidArgumentError as e:
        return time.perf_counter() - start, e.message.split("assertion failed: [")[-1][:90]
    return None, "no error"


def empty_streams(root):
    common = dict(batch_size=8, image_size=32, context_length=16, seed=0, repeat=True)
    shards.write_shards([(f"k{i}", b"plain text", ["a caption"]) for i in range(1000)],
                        f"{root}/bad", prefix="bad")
    with tf.io.TFRecordWriter(f"{root}/empty.tfrecord"):
        pass
    os.makedirs(f"{root}/texts")
    with open(f"{root}/texts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(200):
            with open(f"{root}/texts/{i}.jpg", "w") as image:
                image.write("not a jpeg")
            writer.writerow([f"{i}.jpg", f"caption {i}"])
    cases = {
        "TFRecord, 1000 non-images": lambda: pipeline.tfrecord_dataset(f"{root}/bad/*.tfrecord", **common),
        "empty TFRecord": lambda: pipeline.tfrecord_dataset(f"{root}/empty.tfrecord", **common),
        "CSV, 200 non-image files": lambda: pipeline.csv_dataset(f"{root}/texts.csv", f"{root}/texts", **common),
    }
    for name, make in cases.items():
        seconds, message = time_to_error(make)
        print(f"empty stream | {name:28s} | error after {seconds:6.2f} s (graph tracing included) | {message}")


def throughput(root, batches=150):
    demo_data.write_demo_dataset(f"{root}/demo", num_train=2000, num_val=8, num_zero_shot=12, seed=0)
    dataset = pipeline.tfrecord_dataset(f"{root}/demo/train-*.tfrecord", batch_size=32, image_size=32,
                                        context_length=32, seed=0, repeat=True)
    iterator = iter(dataset)
    for _ in range(20):  # warm-up: tracing, shuffle buffer fill
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    print(f"throughput | {pipeline.__file__} | {batches * 32 / seconds:8.1f} examples/s "
          f"({batches} batches of 32 after 20 warm-up batches)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--throughput_only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        if not args.throughput_only:
            empty_streams(root)
        throughput(root)


if __name__ == "__main__":
    main()
