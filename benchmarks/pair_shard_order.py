"""How often a training batch holds two captions of one image, read from per-pair TFRecord
shards written in the table's order against shards written shuffled.

    python benchmarks/pair_shard_order.py [--images 6000 --captions 5 --batch_size 128
        --shuffle_buffer 2000 --examples_per_shard 1000 --passes 2]

A Flickr8k-style table (every image's captions on neighbouring rows) is converted with
`shards.convert_csv(group_by_image=False)`, once with `seed=None` (the table's order) and
once with the default seed (shuffled), then read by the training reader
(`pipeline.tfrecord_dataset(training=True)`: shuffled files, interleaved shards, the
shuffle buffer of `training/run.py`'s default). It prints, per batch, the mean number of
rows whose image already appeared in that batch. For a uniformly random order the
expected number is about `batch^2 * (captions - 1) / (2 * images * captions)` (1.1 at the
defaults). The images are one tiny PNG copied, so only the reader's order is measured.
README, "Training".
"""
import argparse
import csv
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_table(folder, images, captions):
    import tensorflow as tf

    png = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy()
    (folder / "images").mkdir()
    with open(folder / "captions.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["image", "caption"])
        for i in range(images):
            name = f"{i:06d}.png"
            (folder / "images" / name).write_bytes(png)
            writer.writerows([name, f"caption {j} of image {i}"] for j in range(captions))


def rows_sharing_an_image(folder, args, seed):
    from keras_clip.data import pipeline, shards

    out = folder / f"shards_{seed}"
    shards.convert_csv(str(folder / "captions.tsv"), str(folder / "images"), str(out), group_by_image=False,
                       examples_per_shard=args.examples_per_shard, seed=seed)
    dataset = pipeline.tfrecord_dataset(
        str(out / "*.tfrecord"), batch_size=args.batch_size, image_size=16, context_length=8, training=True,
        seed=0, shuffle_buffer=args.shuffle_buffer, return_keys=True)
    per_batch = []
    for _ in range(args.passes):
        for batch in dataset.as_numpy_iterator():
            images = [key.split(b"/")[0] for key in batch["keys"]]
            per_batch.append(len(images) - len(set(images)))
    return float(np.mean(per_batch)), len(per_batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--shuffle_buffer", type=int, default=2000)
    parser.add_argument("--examples_per_shard", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()
    uniform = args.batch_size * (args.batch_size - 1) * (args.captions - 1) / (
        2 * (args.images * args.captions - 1))
    print(f"{args.images} images x {args.captions} captions, batch {args.batch_size}, shuffle buffer "
          f"{args.shuffle_buffer}, {args.examples_per_shard} records per shard, {args.passes} passes")
    print(f"uniformly random order (formula): {uniform:.2f} rows per batch sharing an image with an earlier row")
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        write_table(folder, args.images, args.captions)
        for seed, name in ((None, "table order (seed=None)"), (0, "shuffled (seed=0, the default)")):
            mean, batches = rows_sharing_an_image(folder, args, seed)
            print(f"{name}: {mean:.2f} rows per batch sharing an image with an earlier row ({batches} batches)")


if __name__ == "__main__":
    main()
