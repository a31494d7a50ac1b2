"""The gRPC client against a served export: equal to the Keras model, clear errors.

Uses `tensorflow_model_server` when it is on PATH, else `serving/local_server.py`.
"""
import shutil
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tensorflow as tf

from keras_clip.serving.client import ClientError, CLIPClient
from tests import harness
from tests.test_export import (REPO_ROOT, TOLERANCE, export_tiny, flickr8k_samples,
                               keras_reference)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(base, port):
    binary = shutil.which("tensorflow_model_server")
    if binary:
        return [binary, f"--port={port}", "--model_name=clip", f"--model_base_path={base}"]
    return [sys.executable, str(REPO_ROOT / "serving" / "local_server.py"), "--model_name=clip",
            f"--model_base_path={base}", f"--port={port}"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, flickr8k_dir):
    base = tmp_path_factory.mktemp("serving") / "clip"
    model = export_tiny(base)
    images, captions = flickr8k_samples(flickr8k_dir)
    expected = keras_reference(model, images, captions)
    port = _free_port()
    log = open(base.parent / "server.log", "w")
    process = subprocess.Popen(_server_command(base, port), stdout=log, stderr=subprocess.STDOUT,
                               cwd=str(REPO_ROOT))
    client = CLIPClient(f"127.0.0.1:{port}", timeout=60)
    try:
        harness.wait_until_serving(client, process, base.parent / "server.log")
        yield {"client": client, "images": images, "captions": captions, "expected": expected,
               "process": process}
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_encode_image_matches_keras_model(served):
    result = served["client"].encode_image(served["images"])
    np.testing.assert_allclose(result, served["expected"]["image_embeddings"], atol=TOLERANCE)


def test_encode_text_matches_keras_model(served):
    result = served["client"].encode_text(served["captions"])
    np.testing.assert_allclose(result, served["expected"]["text_embeddings"], atol=TOLERANCE)


def test_similarity_matches_keras_model(served):
    result = served["client"].similarity(served["images"], served["captions"])
    np.testing.assert_allclose(result, served["expected"]["logits_per_image"], atol=TOLERANCE)


def test_classify_top_label_matches_zero_shot_classifier(served):
    result = served["client"].classify(served["images"])
    np.testing.assert_allclose(result["scores"], served["expected"]["scores"], atol=TOLERANCE)
    assert [labels[0] for labels in result["top_labels"]] == served["expected"]["top_label"]


def test_status_and_metadata(served):
    client = served["client"]
    assert client.status() == [{"version": 1, "state": "AVAILABLE", "error_code": 0}]
    metadata = client.metadata()
    assert metadata["version"] == 1
    signatures = metadata["signatures"]
    assert signatures["classify"]["inputs"] == {"image_bytes": {"dtype": "string", "shape": [None]}}
    assert set(signatures["classify"]["outputs"]) == {"scores", "top_labels", "top_scores"}
    assert set(signatures["similarity"]["inputs"]) == {"image_bytes", "texts"}


def _string(values):
    return tf.make_tensor_proto(values, dtype=tf.string)


BAD_REQUESTS = {
    # name: (call(client, images), expected code, substring of the message)
    "non_image_bytes": (lambda c, im: c.encode_image([im[0], b"not an image"]),
                        grpc.StatusCode.INVALID_ARGUMENT, "batch index 1"),
    "truncated_jpeg": (lambda c, im: c.classify([im[0][: len(im[0]) // 2]]),
                       grpc.StatusCode.INVALID_ARGUMENT, "batch index 0"),
    "empty_image_batch": (lambda c, im: c.encode_image([]),
                          grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    "empty_text_batch": (lambda c, im: c.encode_text([]),
                         grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    "empty_string_text": (lambda c, im: c.encode_text(["a dog", ""]),
                          grpc.StatusCode.INVALID_ARGUMENT, "empty or whitespace-only"),
    "very_long_text": (lambda c, im: c.encode_text(["x" * 100_000]),
                       grpc.StatusCode.INVALID_ARGUMENT, "longer than"),
    "wrong_dtype": (lambda c, im: c.predict(
                        "encode_image", {"image_bytes": tf.make_tensor_proto([1.0, 2.0])}),
                    grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    "missing_input": (lambda c, im: c.predict("similarity", {"image_bytes": _string([im[0]])}),
                      grpc.StatusCode.INVALID_ARGUMENT, "texts"),
    # TF Serving answers an unknown signature key with FAILED_PRECONDITION
    # (tensorflow_serving/servables/tensorflow/predict_util.cc).
    "unknown_signature": (lambda c, im: c.predict("segment", {"image_bytes": _string([im[0]])}),
                          grpc.StatusCode.FAILED_PRECONDITION, "segment"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request_is_rejected_and_server_keeps_serving(served, name):
    call, code, message = BAD_REQUESTS[name]
    client = served["client"]
    with pytest.raises(ClientError) as info:
        call(client, served["images"])
    assert info.value.code == code, info.value
    assert message in info.value.details, info.value.details
    result = client.encode_text(served["captions"][:2])
    np.testing.assert_allclose(result, served["expected"]["text_embeddings"][:2], atol=TOLERANCE)


@pytest.mark.parametrize("model_name, version", [("other_model", None), ("clip", 7)])
def test_unknown_model_or_version_is_not_found(served, model_name, version):
    target = served["client"].target
    with CLIPClient(target, model_name=model_name, version=version) as client:
        with pytest.raises(ClientError) as info:
            client.encode_text(["a dog"])
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert (model_name if version is None else str(version)) in info.value.details
    assert served["client"].encode_text(["a dog"]).shape == (1, 32)


def test_client_timeout_is_a_client_error(served):
    with CLIPClient(served["client"].target, timeout=1e-4) as client:
        with pytest.raises(ClientError) as info:
            client.encode_text(["a dog"] * 64)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
