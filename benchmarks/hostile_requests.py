"""Hostile requests against the local PredictionService: time to answer, code, memory.

Exports a tiny random-weight CLIP (or uses --export_dir), starts
`serving/local_server.py` in a subprocess on 127.0.0.1 (loopback only), and sends,
one after the other: a huge declared shape, a value-count mismatch, a negative
dimension, an oversize batch, a wrong dtype, an unknown signature, and a bounded
flood of concurrent requests. For each it prints the seconds to the answer, the
status code and the server's resident memory (RSS) before and after; then checks
that a good request still returns the same embedding as before the hostile ones,
and prints encode throughput at the start and at the end of the run.

    python benchmarks/hostile_requests.py
    python benchmarks/hostile_requests.py --server_script /path/to/old/local_server.py \
        --huge_elements 3000000      # the same run against another server version

All loops are bounded; the server is terminated at the end.
"""
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = flags.FLAGS
flags.DEFINE_string("export_dir", None, "Model base path to serve; default: a fresh tiny export.")
flags.DEFINE_string("server_script", None, "local_server.py to run; default: this repository's.")
flags.DEFINE_integer("huge_elements", 300_000_000, "Declared length of the huge-shape request.")
flags.DEFINE_integer("flood", 48, "Concurrent requests in the flood (bounded).")
flags.DEFINE_integer("flood_batch", 256, "Texts per flood request.")
flags.DEFINE_integer("throughput_requests", 20, "Sequential requests per throughput figure.")
flags.DEFINE_float("timeout", 30.0, "Client deadline per hostile request, seconds.")
flags.DEFINE_string("baseline_script", None,
                    "Another local_server.py (e.g. before a change): only its encode "
                    "throughput is measured, alternating with the server under test.")
flags.DEFINE_integer("rounds", 5, "Alternating throughput rounds with --baseline_script.")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export_tiny(base):
    import keras

    import keras_clip
    from keras_clip.export.saved_model import export_saved_model

    keras.utils.set_random_seed(0)
    model = keras_clip.CLIP(
        embed_dim=32, image_size=32, vision_num_layers=1, vision_hidden_dim=32,
        vision_num_heads=2, vision_patch_size=16, context_length=16, text_hidden_dim=32,
        text_num_layers=1, text_num_heads=2,
    )
    export_saved_model(model, base, 1, class_names=["dog", "cat"], templates=["a {}."])


def start_server(script, base):
    process = subprocess.Popen(
        [sys.executable, script, "--model_name=clip", f"--model_base_path={base}", "--port=0",
         "--host=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        line = process.stdout.readline()
        if line.startswith("READY"):
            return process, line.split()[1]
        if process.poll() is not None:
            break
    process.kill()
    raise RuntimeError("The server did not start.")


def string_proto(values, dims):
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING)
    proto.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]))
    proto.string_val.extend(values)
    return proto


def compare_throughput(client, throughput, base):
    """Median encode_image throughput of the server under test and of the baseline
    server, measured in alternating rounds so both see the same machine load."""
    import numpy as np

    from keras_clip.serving.client import CLIPClient

    process, target = start_server(FLAGS.baseline_script, base)
    baseline = CLIPClient(target, timeout=FLAGS.timeout, max_attempts=1, batch_size=1024)
    try:
        figures = {"tested": [], "baseline": []}
        for _ in range(FLAGS.rounds):
            figures["tested"].append(throughput(client))
            figures["baseline"].append(throughput(baseline))
        print(f"\nencode_image throughput, median of {FLAGS.rounds} alternating rounds: "
              f"this server {np.median(figures['tested']):.1f} images/s, "
              f"baseline {FLAGS.baseline_script} {np.median(figures['baseline']):.1f} images/s")
        print(f"  rounds (this / baseline): "
              + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(figures["tested"],
                                                             figures["baseline"])))
    finally:
        baseline.close()
        process.terminate()
        process.wait(timeout=30)


def main(argv):
    del argv
    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from keras_clip.serving import protocol
    from keras_clip.serving.client import ClientError, CLIPClient

    workdir = tempfile.mkdtemp(prefix="hostile_requests_")
    base = FLAGS.export_dir
    if base is None:
        base = os.path.join(workdir, "clip")
        started = time.time()
        export_tiny(base)
        print(f"exported a tiny CLIP to {base} in {time.time() - started:.1f}s")
    script = FLAGS.server_script or os.path.join(REPO_ROOT, "serving", "local_server.py")
    process, target = start_server(script, base)
    def rss_mb():
        """The server's resident memory, from /proc (Linux)."""
        with open(f"/proc/{process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    client = CLIPClient(target, timeout=FLAGS.timeout, max_attempts=1, batch_size=1024)
    rng = np.random.default_rng(0)
    images = [tf.io.encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).numpy()
              for _ in range(8)]
    texts = ["a photo of a dog", "a photo of a cat"]

    def throughput(on=None):
        on = on or client
        started = time.perf_counter()
        for _ in range(FLAGS.throughput_requests):
            on.encode_image(images)
        return FLAGS.throughput_requests * len(images) / (time.perf_counter() - started)

    try:
        good_text = client.encode_text(texts)
        good_image = client.encode_image(images)
        throughput_before = throughput()
        print(f"server {script} at {target}; RSS {rss_mb():.0f} MB after warm-up")
        print(f"encode_image throughput before: {throughput_before:.1f} images/s "
              f"({FLAGS.throughput_requests} requests of {len(images)})")

        cases = [
            (f"huge declared shape [{FLAGS.huge_elements}], 1 value",
             protocol.ENCODE_TEXT, {protocol.TEXTS: string_proto([b"a dog"],
                                                                 [FLAGS.huge_elements])}),
            ("declared [1000], 1 value", protocol.ENCODE_TEXT,
             {protocol.TEXTS: string_proto([b"a dog"], [1000])}),
            ("negative dimension [-1]", protocol.ENCODE_TEXT,
             {protocol.TEXTS: string_proto([b"a dog"], [-1])}),
            ("oversize batch: 1025 texts", protocol.ENCODE_TEXT,
             {protocol.TEXTS: string_proto([b"a dog"] * 1025, [1025])}),
            ("wrong dtype (float)", protocol.ENCODE_IMAGE,
             {protocol.IMAGE_BYTES: tf.make_tensor_proto([1.0, 2.0])}),
            ("unknown signature 'segment'", "segment",
             {protocol.IMAGE_BYTES: string_proto([images[0]], [1])}),
        ]
        print(f"\n| case | seconds | code | RSS before MB | RSS after MB |")
        print("|---|---|---|---|---|")
        for name, signature, inputs in cases:
            before = rss_mb()
            started = time.perf_counter()
            try:
                client.predict(signature, inputs)
                code = "OK"
            except ClientError as e:
                code = e.code.name
            seconds = time.perf_counter() - started
            print(f"| {name} | {seconds:.3f} | {code} | {before:.0f} | {rss_mb():.0f} |")

        # A bounded flood: FLAGS.flood concurrent requests of FLAGS.flood_batch texts.
        channel = grpc.insecure_channel(target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "clip"
        request.model_spec.signature_name = protocol.ENCODE_TEXT
        request.inputs[protocol.TEXTS].CopyFrom(
            string_proto([b"a photo of a dog"] * FLAGS.flood_batch, [FLAGS.flood_batch]))
        before = rss_mb()
        started = time.perf_counter()
        calls = [stub.Predict.future(request, timeout=FLAGS.timeout) for _ in range(FLAGS.flood)]
        counts, first_reject = {}, None
        for call in calls:
            try:
                call.result()
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            counts[code] = counts.get(code, 0) + 1
        seconds = time.perf_counter() - started
        channel.close()
        print(f"| flood: {FLAGS.flood} concurrent x {FLAGS.flood_batch} texts | {seconds:.3f} "
              f"(all answered) | {counts} | {before:.0f} | {rss_mb():.0f} |")

        # The good request afterwards; a server still busy with queued work is given
        # a bounded 180 s to answer, and the wait is reported.
        started = time.perf_counter()
        for attempt in range(6):
            try:
                after_text = client.encode_text(texts)
                after_image = client.encode_image(images)
                break
            except ClientError as e:
                print(f"good request afterwards, attempt {attempt + 1}: {e.code.name}")
        else:
            raise RuntimeError("The server did not answer a good request within 180 s.")
        print(f"good request afterwards answered after {time.perf_counter() - started:.2f}s")
        throughput_after = throughput()
        print(f"\ngood request afterwards: text max |diff| "
              f"{np.abs(after_text - good_text).max():.1e}, image max |diff| "
              f"{np.abs(after_image - good_image).max():.1e} "
              f"({'same' if np.array_equal(after_text, good_text) and np.array_equal(after_image, good_image) else 'DIFFERENT'})")
        print(f"encode_image throughput after: {throughput_after:.1f} images/s; "
              f"server RSS at the end {rss_mb():.0f} MB")
        if FLAGS.baseline_script:
            compare_throughput(client, throughput, base)
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    app.run(main)
