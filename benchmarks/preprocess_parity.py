"""Measures how far `CLIPImagePreprocessor` is from OpenAI's PIL pipeline, and its speed.

For N Flickr8k photos (224x224 JPEGs) at image_size 224 (no resize) and 336
(upscale), and for CIFAR-10 test JPEGs (32x32) upscaled to 224, prints:

* |ours - PIL| in 0-255 pixel levels (before normalisation): max, mean and the
  fraction of values that differ; and the max in normalised units;
* the same for the obvious alternative, `tf.image.resize(method="bicubic",
  antialias=True)` after the same ISLOW decode, rounded to uint8 (context for
  why the layer re-implements PIL's resampler);
* speed of the layer (batches of encoded bytes, graph mode, all CPU cores) and
  of the PIL + numpy pipeline (one Python thread): wall-clock images/s, and
  process CPU milliseconds per image (steadier on a shared machine).

    python benchmarks/preprocess_parity.py --num_flickr=500 --num_cifar=500
"""
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from keras_clip.preprocessing.image_preprocessor import CLIPImagePreprocessor  # noqa: E402
from tests import harness  # noqa: E402

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_DEFAULT_DATA = os.environ.get("KERAS_CLIP_SHARED_DATA", str(_REPO_ROOT.parent / "shared" / "data"))

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", _DEFAULT_DATA, "Folder holding flickr8k/ and cifar10_test/.")
flags.DEFINE_integer("num_flickr", 500, "Flickr8k photos to compare.")
flags.DEFINE_integer("num_cifar", 500, "CIFAR-10 test images to compare.")
flags.DEFINE_integer("batch_size", 50, "Encoded images per layer call.")
flags.DEFINE_bool("compare_tf_resize", True, "Also measure tf.image.resize(bicubic, antialias).")



pil_pipeline = harness.pil_resize_and_crop
normalise = harness.normalise
to_levels = harness.to_levels


def tf_resize_pipeline(image_size):
    """The simple alternative: tf.image.resize(bicubic, antialias), rounded to uint8."""

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def preprocess(data):
        image = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        short, long = tf.minimum(height, width), tf.maximum(height, width)
        ratio = tf.cast(image_size * long, tf.float64) / tf.cast(short, tf.float64)
        new_long = tf.cast(ratio, tf.int32)
        portrait = width <= height
        size = tf.where(
            portrait, tf.stack([new_long, image_size]), tf.stack([image_size, new_long])
        )
        image = tf.cast(image, tf.float32)
        resized = tf.image.resize(image, size, method="bicubic", antialias=True)
        resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
        top = tf.cast(tf.round(tf.cast(size[0] - image_size, tf.float64) / 2.0), tf.int32)
        left = tf.cast(tf.round(tf.cast(size[1] - image_size, tf.float64) / 2.0), tf.int32)
        return resized[top : top + image_size, left : left + image_size]

    return preprocess


def diff_stats(ours_levels, reference_levels):
    diff = np.abs(ours_levels.astype(np.int64) - reference_levels.astype(np.int64))
    return diff.max(), diff.mean(), np.mean(diff > 0)


def run_case(name, encoded, image_size, batch_size, compare_tf_resize):
    layer = CLIPImagePreprocessor(image_size=image_size)
    batches = [tf.constant(encoded[i : i + batch_size]) for i in range(0, len(encoded), batch_size)]
    layer(batches[0])  # trace once, outside the timing

    start, cpu_start = time.perf_counter(), time.process_time()
    ours = np.concatenate([layer(batch).numpy() for batch in batches])
    ours_rate = len(encoded) / (time.perf_counter() - start)
    ours_cpu_ms = 1000 * (time.process_time() - cpu_start) / len(encoded)

    start, cpu_start = time.perf_counter(), time.process_time()
    reference = np.stack([pil_pipeline(data, image_size) for data in encoded])
    reference_normalised = normalise(reference)
    pil_rate = len(encoded) / (time.perf_counter() - start)
    pil_cpu_ms = 1000 * (time.process_time() - cpu_start) / len(encoded)

    max_diff, mean_diff, fraction = diff_stats(to_levels(ours), reference)
    normalised_max = np.abs(ours - reference_normalised).max()
    rows = [
        f"{name:34s} {'CLIPImagePreprocessor':22s} {max_diff:4d} {mean_diff:10.2e} "
        f"{fraction:10.2e} {normalised_max:11.2e} {ours_rate:9.0f} {pil_rate:9.0f} "
        f"{ours_cpu_ms:11.1f} {pil_cpu_ms:10.1f}"
    ]
    if compare_tf_resize:
        alternative = tf_resize_pipeline(image_size)
        levels = np.stack([alternative(tf.constant(data)).numpy() for data in encoded])
        max_diff, mean_diff, fraction = diff_stats(levels, reference)
        normalised_max = np.abs(normalise(levels) - reference_normalised).max()
        rows.append(
            f"{'':34s} {'tf.image.resize':22s} {max_diff:4d} {mean_diff:10.2e} "
            f"{fraction:10.2e} {normalised_max:11.2e} {'':>9s} {'':>9s}"
        )
    return rows


def main(argv):
    del argv
    data_dir = pathlib.Path(FLAGS.data_dir)
    flickr_paths = sorted((data_dir / "flickr8k" / "images").glob("*.jpg"))[: FLAGS.num_flickr]
    cifar_paths = sorted((data_dir / "cifar10_test" / "images").glob("*/*.jpg"))
    step = max(len(cifar_paths) // max(FLAGS.num_cifar, 1), 1)
    cifar_paths = cifar_paths[::step][: FLAGS.num_cifar]  # spread over the 10 classes
    flickr = [p.read_bytes() for p in flickr_paths]
    cifar = [p.read_bytes() for p in cifar_paths]

    print(
        f"TensorFlow {tf.__version__}, Pillow {Image.__version__}, {os.cpu_count()} CPU cores; "
        "levels are 0-255 pixel values before normalisation; cpu-ms is process CPU time per image"
    )
    print(
        f"{'case':34s} {'pipeline':22s} {'max':>4s} {'mean|diff|':>10s} {'frac diff':>10s} "
        f"{'max normed':>11s} {'ours im/s':>9s} {'PIL im/s':>9s} "
        f"{'ours cpu-ms':>11s} {'PIL cpu-ms':>10s}"
    )
    cases = [
        (f"Flickr8k x{len(flickr)} 224->224 (no resize)", flickr, 224),
        (f"Flickr8k x{len(flickr)} 224->336 (upscale)", flickr, 336),
        (f"CIFAR-10 x{len(cifar)} 32->224 (upscale)", cifar, 224),
    ]
    for name, encoded, image_size in cases:
        for row in run_case(name, encoded, image_size, FLAGS.batch_size, FLAGS.compare_tf_resize):
            print(row, flush=True)


if __name__ == "__main__":
    app.run(main)
