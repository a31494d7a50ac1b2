"""Figures for the training-fault fixes (docs/reliability/training.md).

    python benchmarks/training_faults.py                   # both parts
    python benchmarks/training_faults.py --throughput_only  # e.g. against older code
    python benchmarks/training_faults.py --throughput_only \
        --serving_images ../shared/data/flickr8k/images      # + serving preprocessing

1. Time until a repeating training stream with no usable record raises (before
   the fix: never), for a TFRecord of non-images, an empty TFRecord and a CSV
   whose image files are not images. Pipeline only: no model, no TF start-up.
2. Training-pipeline throughput (examples/s, repeat=True, 64-pixel demo JPEGs
   at image_size=32, batch 32) so that the per-pass markers and per-record
   positions can be compared with the code before them: run once with each
   PYTHONPATH, same machine, same minute. Also CPU time per example (the
   process's time over the timed loop, all threads), which other jobs on the
   machine disturb far less than wall-clock throughput.
3. With --serving_images: CPU time per image of `CLIPImagePreprocessor(224)` (the
   exported encode_image's first stage) on the folder's first 64 JPEGs, best of 3.
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
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"throughput | {pipeline.__file__} | {batches * 32 / seconds:8.1f} examples/s "
          f"({batches} batches of 32 after 20 warm-up batches)")
    print(f"cpu | {pipeline.__file__} | {1e6 * cpu / (batches * 32):8.1f} CPU us/example")


def serving_preprocess_cost(images_dir, count=64):
    import glob

    import tensorflow as tf

    from keras_clip.preprocessing import image_preprocessor

    files = sorted(glob.glob(os.path.join(images_dir, "*.jpg")))[:count]
    data = tf.constant([open(f, "rb").read() for f in files])
    layer = image_preprocessor.CLIPImagePreprocessor(image_size=224, dtype="float32")
    preprocess = tf.function(lambda images: layer(images))
    half = len(files) // 2
    preprocess(data[:half])  # tracing
    costs = []
    for _ in range(3):
        cpu = time.process_time()
        preprocess(data[:half])
        preprocess(data[half:])
        costs.append((time.process_time() - cpu) / len(files))
    print(f"serving cpu | {image_preprocessor.__file__} | {1e3 * min(costs):.2f} CPU ms/image "
          f"({len(files)} JPEGs at 224 px, best of 3)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--throughput_only", action="store_true")
    parser.add_argument("--serving_images", default="", help="Folder of JPEGs (e.g. Flickr8k's).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        if not args.throughput_only:
            empty_streams(root)
        throughput(root)
    if args.serving_images:
        serving_preprocess_cost(args.serving_images)


if __name__ == "__main__":
    main()
