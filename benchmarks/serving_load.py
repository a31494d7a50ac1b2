"""Load test of `serving/local_server.py`: concurrent clients, latency and throughput.

    python benchmarks/serving_load.py            # exports a tiny model to a temp folder
    python benchmarks/serving_load.py --model_base_path /models/clip

Sends `--text_requests` encode_text and `--image_requests` encode_image requests
(one Flickr8k caption / photo each) from `--clients` threads, checks that none
failed, and prints p50/p99 latency and throughput per signature, next to the
in-process SavedModel's own time for the same batch (the floor a server adds to).
"""
import csv
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import numpy as np
from absl import app, flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

FLAGS = flags.FLAGS
flags.DEFINE_string("model_base_path", None, "Served model; default: export a tiny model.")
flags.DEFINE_string("flickr8k_dir", str(REPO_ROOT.parent / "shared" / "data" / "flickr8k"),
                    "Flickr8k folder (captions.tsv, images/).")
flags.DEFINE_integer("clients", 16, "Concurrent client threads.")
flags.DEFINE_integer("text_requests", 2000, "encode_text requests.")
flags.DEFINE_integer("image_requests", 500, "encode_image requests.")
flags.DEFINE_integer("max_concurrent_calls", 2, "Server's concurrent TensorFlow calls.")


def _samples(flickr8k_dir, count=64):
    images, captions = [], []
    with open(os.path.join(flickr8k_dir, "captions.tsv"), encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["caption_idx"] == "0":
                with open(os.path.join(flickr8k_dir, "images", row["image"]), "rb") as image:
                    images.append(image.read())
                captions.append(row["caption"])
                if len(images) == count:
                    break
    return images, captions


def _export_tiny(base):
    import keras

    import keras_clip
    from keras_clip.export.saved_model import export_saved_model

    keras.utils.set_random_seed(0)
    model = keras_clip.CLIP(
        embed_dim=32, image_size=32, vision_num_layers=1, vision_hidden_dim=32,
        vision_num_heads=2, vision_patch_size=16, context_length=16, text_hidden_dim=32,
        text_num_layers=1, text_num_heads=2,
    )
    export_saved_model(model, base, 1, class_names=["dog", "cat"])


def _floor(base, images, captions, repeats=50):
    """Median seconds of one in-process signature call on a 1-element batch."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    signatures = tf.saved_model.load(os.path.join(base, "1")).signatures
    floors = {}
    for name, key, values in (("encode_text", "texts", captions),
                              ("encode_image", "image_bytes", images)):
        times = []
        for i in range(repeats + 3):
            batch = tf.constant([values[i % len(values)]])
            start = time.perf_counter()
            signatures[name](**{key: batch})
            times.append(time.perf_counter() - start)
        floors[name] = float(np.median(times[3:]))
    return floors


def _run_load(client, jobs, num_clients):
    latencies = {"encode_text": [], "encode_image": []}
    errors = []
    lock = threading.Lock()

    def one(job):
        name, value = job
        start = time.perf_counter()
        try:
            getattr(client, name)([value])
        except Exception as e:  # counted, reported below
            with lock:
                errors.append(f"{name}: {e}")
            return
        with lock:
            latencies[name].append(time.perf_counter() - start)

    start = time.perf_counter()
    with futures.ThreadPoolExecutor(num_clients) as pool:
        list(pool.map(one, jobs))
    return latencies, errors, time.perf_counter() - start


def main(argv):
    del argv
    from keras_clip.serving.client import ClientError, CLIPClient

    images, captions = _samples(FLAGS.flickr8k_dir)
    tmp = tempfile.TemporaryDirectory()
    base = FLAGS.model_base_path
    if base is None:
        base = os.path.join(tmp.name, "clip")
        _export_tiny(base)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "serving" / "local_server.py"), "--model_name=clip",
         f"--model_base_path={base}", f"--port={port}",
         f"--max_concurrent_calls={FLAGS.max_concurrent_calls}",
         f"--max_workers={FLAGS.clients}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = CLIPClient(f"127.0.0.1:{port}", timeout=120)
    try:
        deadline = time.time() + 600
        while True:
            try:
                client.status()
                break
            except ClientError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("local server did not start")
                time.sleep(1)
        rng = np.random.default_rng(0)
        jobs = [("encode_text", captions[i % len(captions)]) for i in range(FLAGS.text_requests)]
        jobs += [("encode_image", images[i % len(images)]) for i in range(FLAGS.image_requests)]
        jobs = [jobs[i] for i in rng.permutation(len(jobs))]
        latencies, errors, wall = _run_load(client, jobs, FLAGS.clients)
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=30)
    floors = _floor(base, images, captions)
    tmp.cleanup()

    total = FLAGS.text_requests + FLAGS.image_requests
    print(f"{FLAGS.clients} clients, {total} requests (batch 1), server max_concurrent_calls="
          f"{FLAGS.max_concurrent_calls}, {os.cpu_count()} CPUs")
    print(f"errors: {len(errors)} of {total}" + (" (zero-error check passed)" if not errors
                                                  else f"; first: {errors[0]}"))
    print(f"overall throughput: {total / wall:.1f} requests/s over {wall:.1f} s")
    for name, times in latencies.items():
        times = np.asarray(times) * 1e3
        print(f"{name:13s} n={len(times):5d}  p50 {np.percentile(times, 50):7.1f} ms  "
              f"p99 {np.percentile(times, 99):7.1f} ms  "
              f"in-process floor (same batch) {floors[name] * 1e3:6.1f} ms")
    return 1 if errors else 0


if __name__ == "__main__":
    app.run(main)
