"""Parity and speed of keras_clip's CLIP tokenizer against open_clip's.

Prints the number of Flickr8k captions, how many tokenize differently from
`open_clip.tokenize` through `keras_clip...tokenize()` (host cleaning) and
through the in-graph `CLIPTokenizer` layer, the same counts on the hard strings
of tests/test_tokenizer.py, and strings per second of both tokenizers.

Usage (from the repository root):

    python benchmarks/tokenizer_parity.py [--data_dir=/work/shared/data/flickr8k]
"""
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from keras_clip.preprocessing.tokenizer import CLIPTokenizer, tokenize  # noqa: E402
from tests.reference import import_open_clip  # noqa: E402
from tests.test_tokenizer import (  # noqa: E402
    HARD_STRINGS,
    MOJIBAKE_STRINGS,
    read_captions,
)

FLAGS = flags.DEFINE_string(
    "data_dir",
    str(REPO_ROOT.parent / "shared" / "data" / "flickr8k"),
    "Folder with Flickr8k's captions.tsv.",
)
BATCH_SIZE = 256


def count_mismatches(ids, reference_ids):
    return int(np.sum(np.any(np.asarray(ids) != np.asarray(reference_ids), axis=1)))


def batches(texts):
    return [texts[i : i + BATCH_SIZE] for i in range(0, len(texts), BATCH_SIZE)]


def main(argv):
    del argv
    open_clip = import_open_clip()
    captions = read_captions(pathlib.Path(FLAGS.value))
    layer = CLIPTokenizer()
    traced = tf.function(layer, input_signature=[tf.TensorSpec([None], tf.string)])
    traced(tf.constant(captions[:BATCH_SIZE]))  # Trace once before timing.

    # open_clip, cold cache: a fresh SimpleTokenizer, one pass in batches.
    reference_tokenizer = open_clip.tokenizer.SimpleTokenizer()
    start = time.perf_counter()
    reference = np.concatenate([reference_tokenizer(b).numpy() for b in batches(captions)])
    reference_cold_s = time.perf_counter() - start
    # open_clip, warm cache: the same tokenizer again (its BPE cache is full).
    start = time.perf_counter()
    for b in batches(captions):
        reference_tokenizer(b)
    reference_warm_s = time.perf_counter() - start

    start = time.perf_counter()
    layer_ids = np.concatenate([traced(tf.constant(b)).numpy() for b in batches(captions)])
    layer_s = time.perf_counter() - start

    start = time.perf_counter()
    host_ids = np.concatenate([tokenize(b).numpy() for b in batches(captions)])
    host_s = time.perf_counter() - start

    hard_reference = open_clip.tokenize(HARD_STRINGS).numpy()
    mojibake_reference = open_clip.tokenize(MOJIBAKE_STRINGS).numpy()
    n = len(captions)
    print(f"Flickr8k captions:                       {n}")
    print(f"mismatches via tokenize() (host clean):  {count_mismatches(host_ids, reference)}")
    print(f"mismatches via CLIPTokenizer (in-graph): {count_mismatches(layer_ids, reference)}")
    print(f"hard strings:                            {len(HARD_STRINGS)}")
    print(
        "hard-string mismatches via tokenize():   "
        f"{count_mismatches(tokenize(HARD_STRINGS).numpy(), hard_reference)}"
    )
    print(
        "hard-string mismatches via CLIPTokenizer:"
        f" {count_mismatches(traced(tf.constant(HARD_STRINGS)).numpy(), hard_reference)}"
    )
    print(
        f"mojibake strings (documented in-graph difference): {len(MOJIBAKE_STRINGS)}; "
        "mismatches tokenize() / CLIPTokenizer: "
        f"{count_mismatches(tokenize(MOJIBAKE_STRINGS).numpy(), mojibake_reference)} / "
        f"{count_mismatches(traced(tf.constant(MOJIBAKE_STRINGS)).numpy(), mojibake_reference)}"
    )
    print(f"speed, batches of {BATCH_SIZE}, {os.cpu_count()} CPU cores (strings/s):")
    print(f"  keras_clip CLIPTokenizer, tf.function: {n / layer_s:10.0f}")
    print(f"  keras_clip tokenize() (ftfy on host):  {n / host_s:10.0f}")
    print(f"  open_clip tokenizer, cold BPE cache:   {n / reference_cold_s:10.0f}")
    print(f"  open_clip tokenizer, warm BPE cache:   {n / reference_warm_s:10.0f}")
    print(
        f"  CLIPTokenizer / open_clip: {reference_cold_s / layer_s:.2f}x (cold), "
        f"{reference_warm_s / layer_s:.2f}x (warm)"
    )


if __name__ == "__main__":
    app.run(main)
