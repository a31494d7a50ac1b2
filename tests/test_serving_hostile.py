"""The local PredictionService under hostile requests and faults.

One tiny export per module; servers run in this process on 127.0.0.1 so tests can
hold a request inside the server (a gate) and read its counters. No data files:
images are made with numpy.
"""
import os
import resource
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from keras_clip.export import saved_model as export_lib
from keras_clip.serving import local_server, protocol
from keras_clip.serving.client import ClientError, CLIPClient
from tests.test_export import tiny_clip

LABELS = ["dog", "cat"]
TEMPLATES = ["a photo of a {}."]
MAX_BATCH = 8
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
GATE_TEXT = "hold this request"


def _images(count, size=32):
    rng = np.random.default_rng(0)
    return [tf.io.encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).numpy()
            for _ in range(count)]


def _string_proto(values, dims):
    """A DT_STRING TensorProto declaring `dims`, holding `values` (no checks)."""
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING)
    proto.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]))
    proto.string_val.extend(values)
    return proto


def _start(repository, **kwargs):
    server, port = local_server.serve_repository(repository, 0, **kwargs)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def export_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile") / "clip"
    export_lib.export_saved_model(tiny_clip(), str(base), 1, class_names=LABELS,
                                  templates=TEMPLATES)
    return base


@pytest.fixture(scope="module")
def served(export_base):
    repository = local_server.ModelRepository(
        "clip", str(export_base), max_concurrent_calls=1, max_batch_size=MAX_BATCH,
        max_queue_size=1)
    assert repository.load(1) == local_server.AVAILABLE
    server, target = _start(repository, max_message_bytes=MAX_MESSAGE_BYTES)
    client = CLIPClient(target, timeout=30, max_attempts=1)
    reference = client.encode_text(["a dog", "a cat"])
    yield {"repository": repository, "target": target, "client": client,
           "reference": reference}
    client.close()
    server.stop(None)


@pytest.fixture
def gate(served, monkeypatch):
    """Requests with GATE_TEXT block inside the TF call until `gate["open"]` is set;
    `gate["executed"]` lists the texts of every executed call."""
    repository = served["repository"]
    state = {"open": threading.Event(), "running": threading.Event(), "executed": []}
    real = local_server.ModelRepository._call_signature

    def gated(self, function, inputs):
        texts = [t.decode() for t in inputs.get(protocol.TEXTS, tf.constant([], tf.string)).numpy()]
        state["executed"].append(texts)
        if GATE_TEXT in texts:
            state["running"].set()
            state["open"].wait(30)
        return real(self, function, inputs)

    monkeypatch.setattr(repository, "_call_signature", gated.__get__(repository))
    yield state
    state["open"].set()


def _in_thread(call):
    result = {}

    def run():
        try:
            result["value"] = call()
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _error(call):
    start = time.monotonic()
    with pytest.raises(ClientError) as info:
        call()
    return info.value, time.monotonic() - start


# -- item 6: declared shapes are checked before anything is allocated ------------------
def test_huge_declared_shape_is_rejected_at_once_without_memory_growth(served):
    # The server runs in this process: its peak resident memory (ru_maxrss, KiB on
    # Linux) must not grow, so even a short-lived spike would be caught.
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    request = {protocol.TEXTS: _string_proto([b"a dog"], [300_000_000])}
    error, seconds = _error(
        lambda: served["client"].predict(protocol.ENCODE_TEXT, request, timeout=60))
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details == (
        "Input 'texts' holds a batch of 300000000 elements; this server accepts at most "
        f"{MAX_BATCH} per request (split the request, or raise --max_batch_size).")
    assert seconds < 5, seconds
    assert growth_mb < 200, growth_mb
    np.testing.assert_allclose(served["client"].encode_text(["a dog", "a cat"]),
                               served["reference"], atol=0)


@pytest.mark.parametrize("values, dims, message", [
    ([b"a dog"], [3], "Input 'texts' declares shape [3] (3 elements) but holds 1 values."),
    ([b"a dog", b"a cat"], [1], "Input 'texts' declares shape [1] (1 elements) but holds 2 values."),
    ([b"a dog"], [-1], "Input 'texts' declares a negative dimension: shape [-1]"),
    ([b"a dog"], [1, 1], "Input 'texts' must have rank 1; received shape [1, 1]"),
    ([b"a dog"], [1, 250_000_000], "Input 'texts' must have rank 1; received shape [1, 250000000]"),
])
def test_declared_shape_must_match_the_values_sent(served, values, dims, message):
    error, seconds = _error(lambda: served["client"].predict(
        protocol.ENCODE_TEXT, {protocol.TEXTS: _string_proto(values, dims)}))
    assert (error.code, error.details) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert seconds < 5


def test_batch_over_the_cap_is_rejected(served):
    with CLIPClient(served["target"], batch_size=64, max_attempts=1) as client:
        error, _ = _error(lambda: client.encode_text(["a dog"] * (MAX_BATCH + 1)))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"holds a batch of {MAX_BATCH + 1} elements" in error.details
        assert client.encode_text(["a dog"] * MAX_BATCH).shape == (MAX_BATCH, 32)


def test_request_over_the_message_cap_is_resource_exhausted(served):
    request = {protocol.IMAGE_BYTES: _string_proto([b"x" * (MAX_MESSAGE_BYTES + 1)], [1])}
    error, seconds = _error(lambda: served["client"].predict(protocol.ENCODE_IMAGE, request))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert seconds < 5


# -- item 7: error codes as TF Serving's, bounded queue, deadlines -----------------------
def test_unknown_signature_is_failed_precondition_like_tf_serving(served):
    request = {protocol.IMAGE_BYTES: _string_proto(_images(1), [1])}
    error, _ = _error(lambda: served["client"].predict("segment", request))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details.startswith("Serving signature name 'segment' not found")


def test_status_of_unknown_version_is_not_found(served):
    with CLIPClient(served["target"], version=7, max_attempts=1) as client:
        error, _ = _error(client.status)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.details.startswith("Could not find version 7 of model 'clip'")


def test_full_queue_is_answered_unavailable_at_once(served, gate):
    client = served["client"]
    running, running_result = _in_thread(lambda: client.encode_text([GATE_TEXT]))
    assert gate["running"].wait(10)
    queued, queued_result = _in_thread(lambda: client.encode_text(["a cat"]))
    deadline = time.monotonic() + 10
    while served["repository"]._admitted < 2:  # one running, one waiting
        assert time.monotonic() < deadline
        time.sleep(0.01)
    error, seconds = _error(lambda: client.encode_text(["a dog"]))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.details == ("Server busy: 1 requests running and 1 waiting "
                             "(--max_queue_size); retry later.")
    assert seconds < 2
    gate["open"].set()
    running.join(30)
    queued.join(30)
    assert running_result["value"].shape == (1, 32)
    # Batch of 1 vs 2: equal up to float rounding of batch-dependent kernels.
    np.testing.assert_allclose(queued_result["value"], served["reference"][1:], atol=1e-6)
    assert gate["executed"] == [[GATE_TEXT], ["a cat"]]  # the rejected one never ran


def test_request_whose_deadline_passed_in_the_queue_is_not_executed(served, gate):
    client = served["client"]
    running, _ = _in_thread(lambda: client.encode_text([GATE_TEXT]))
    assert gate["running"].wait(10)
    error, seconds = _error(lambda: client.encode_text(["late text"], timeout=0.5))
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "DEADLINE_EXCEEDED" in str(error)
    assert seconds < 3
    gate["open"].set()
    running.join(30)
    time.sleep(0.5)  # time for the expired request to run, were it going to
    assert gate["executed"] == [[GATE_TEXT]]
    assert served["repository"]._admitted == 0


# -- item 7: versions load apart, failures are remembered, status tells the truth --------
@pytest.fixture
def versions_base(export_base, tmp_path):
    base = tmp_path / "clip"
    base.mkdir()
    for version in ("1", "2"):
        shutil.copytree(export_base / "1", base / version)
    corrupt = base / "3"
    (corrupt / "variables").mkdir(parents=True)
    (corrupt / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    return base


def test_loading_one_version_does_not_stall_another(versions_base, monkeypatch):
    release = threading.Event()
    real_load = tf.saved_model.load

    def slow_load(path, *args, **kwargs):
        if os.path.basename(os.path.normpath(path)) == "1":
            release.wait(60)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(tf.saved_model, "load", slow_load)
    repository = local_server.ModelRepository("clip", str(versions_base), warmup=False)
    assert repository.load(2) == local_server.AVAILABLE
    server, target = _start(repository)
    # Generous deadlines: loading takes tens of seconds on a busy machine.
    v1 = CLIPClient(target, version=1, max_attempts=1, timeout=300)
    v2 = CLIPClient(target, version=2, max_attempts=1, timeout=300)
    try:
        v2.encode_text(["a dog"])  # the first call of a fresh load builds its functions
        slow, slow_result = _in_thread(lambda: v1.encode_text(["a dog"]))
        deadline = time.monotonic() + 10
        while repository.version_states()[1][0] != local_server.LOADING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = time.monotonic()
        fast = v2.encode_text(["a dog"], timeout=60)
        assert time.monotonic() - start < 10  # before the fix: held until v1 loaded

        with CLIPClient(target, max_attempts=1) as any_version:
            states = {s["version"]: s["state"] for s in any_version.status()}
        assert states == {1: "LOADING", 2: "AVAILABLE", 3: "START"}
        release.set()
        slow.join(300)
        np.testing.assert_allclose(slow_result["value"], fast, atol=0)
        assert v1.status() == [{"version": 1, "state": "AVAILABLE", "error_code": 0}]
    finally:
        release.set()
        v1.close()
        v2.close()
        server.stop(None)


def test_corrupt_version_fails_fast_is_remembered_and_reported(versions_base):
    repository = local_server.ModelRepository("clip", str(versions_base), warmup=False)
    assert repository.load(3) == local_server.END  # the latest, as create_server does
    server, target = _start(repository)
    try:
        with CLIPClient(target, version=3, max_attempts=1) as v3:
            for _ in range(3):
                error, seconds = _error(lambda: v3.encode_text(["a dog"]))
                assert error.code == grpc.StatusCode.NOT_FOUND
                assert error.details.startswith(
                    "Servable not found: model 'clip' version 3 failed to load (UNKNOWN: "
                    "OSError: Cannot parse file")
                assert seconds < 1
        assert repository.load_attempts[3] == 1  # never retried by requests
        with CLIPClient(target, max_attempts=1, timeout=300) as latest:
            # The default version is the newest one that has not failed.
            assert latest.encode_text(["a dog"]).shape == (1, 32)
            status = latest.status(details=True)
        assert [(s["version"], s["state"], s["error_code"]) for s in status] == [
            (1, "START", 0), (2, "AVAILABLE", 0), (3, "END", grpc.StatusCode.UNKNOWN.value[0])]
        assert "Cannot parse file" in status[2]["error_message"]
    finally:
        server.stop(None)


def test_create_server_starts_and_reports_a_failed_latest_version(versions_base):
    server, port = local_server.create_server("clip", str(versions_base), 0, warmup=False)
    server.start()
    try:
        with CLIPClient(f"127.0.0.1:{port}", max_attempts=1) as client:
            assert [(s["version"], s["state"]) for s in client.status()] == [
                (1, "START"), (2, "START"), (3, "END")]
    finally:
        server.stop(None)


# -- item 9: the client against the local server: chunking and TLS ----------------------
def test_chunked_requests_give_the_embeddings_of_one_request(served):
    repository = served["repository"]
    images = _images(7)
    texts = [f"a photo of {n} dogs" for n in range(7)]
    with CLIPClient(served["target"], batch_size=MAX_BATCH, max_attempts=1) as whole, \
            CLIPClient(served["target"], batch_size=3, max_attempts=1) as chunked:
        before = repository.executed_calls
        image_chunks = chunked.encode_image(images)
        text_chunks = chunked.encode_text(texts)
        logits_chunks = chunked.similarity(images, texts)
        labels_chunks = chunked.classify(images)
        # 3 + 3 requests, 3 x 3 blocks for similarity, 3 for classify.
        assert repository.executed_calls - before == 3 + 3 + 9 + 3
        # Equal up to float rounding of batch-dependent kernels (batch 3 vs 7).
        np.testing.assert_allclose(image_chunks, whole.encode_image(images), atol=1e-6)
        np.testing.assert_allclose(text_chunks, whole.encode_text(texts), atol=1e-6)
        np.testing.assert_allclose(logits_chunks, whole.similarity(images, texts), atol=1e-4)
        labels_whole = whole.classify(images)
        np.testing.assert_allclose(labels_chunks["scores"], labels_whole["scores"], atol=1e-6)
        assert labels_chunks["top_labels"] == labels_whole["top_labels"]
        assert image_chunks.shape == (7, 32) and logits_chunks.shape == (7, 7)
        # An empty list still reaches the server, which names the problem.
        error, _ = _error(lambda: chunked.encode_text([]))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "`texts` is an empty batch" in error.details


def _self_signed_certificate(directory):
    """A key and a self-signed certificate for localhost / 127.0.0.1 (openssl CLI)."""
    import subprocess

    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return key, cert


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_client_talks_to_a_tls_server_and_mutual_tls(served, tmp_path):
    key, cert = _self_signed_certificate(tmp_path)
    repository = served["repository"]
    tls_server, tls_target = _start(
        repository, credentials=local_server.server_credentials(cert, key))
    # Mutual TLS: the server trusts client certificates signed by `cert` (itself).
    mtls_server, mtls_target = _start(
        repository, credentials=local_server.server_credentials(cert, key, cert))
    try:
        with CLIPClient(tls_target, root_certificates=str(cert), max_attempts=1) as client:
            np.testing.assert_allclose(client.encode_text(["a dog", "a cat"]),
                                       served["reference"], atol=0)
        with CLIPClient(tls_target, max_attempts=1, timeout=5) as plaintext:
            error, _ = _error(lambda: plaintext.encode_text(["a dog"]))
            assert error.code == grpc.StatusCode.UNAVAILABLE
        with CLIPClient(mtls_target, root_certificates=cert.read_bytes(),
                        private_key=str(key), certificate_chain=str(cert),
                        max_attempts=1) as client:
            np.testing.assert_allclose(client.encode_text(["a dog", "a cat"]),
                                       served["reference"], atol=0)
        with CLIPClient(mtls_target, root_certificates=str(cert), max_attempts=1,
                        timeout=5) as no_client_cert:
            error, _ = _error(lambda: no_client_cert.encode_text(["a dog"]))
            assert error.code == grpc.StatusCode.UNAVAILABLE
    finally:
        tls_server.stop(None)
        mtls_server.stop(None)
