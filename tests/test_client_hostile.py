"""The gRPC client under faults: bounded retries with backoff, deadlines.

Runs against fake PredictionService servicers on 127.0.0.1 (no model needed).
"""
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from keras_clip.serving import protocol
from keras_clip.serving.client import ClientError, CLIPClient


class FakePrediction(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Fails the first `failures` calls with `code`, sleeps `delay` s, then answers
    one 4-wide embedding per text (its length)."""

    def __init__(self, failures=0, code=grpc.StatusCode.UNAVAILABLE, delay=0.0):
        self.failures = failures
        self.code = code
        self.delay = delay
        self.attempts = 0
        self.times = []
        self._lock = threading.Lock()

    def Predict(self, request, context):
        with self._lock:
            self.attempts += 1
            self.times.append(time.monotonic())
            attempt = self.attempts
        if attempt <= self.failures:
            context.abort(self.code, f"simulated {self.code.name} #{attempt}")
        time.sleep(self.delay)
        texts = tf.make_ndarray(request.inputs[protocol.TEXTS])
        embeddings = np.array([[len(t)] * 4 for t in texts], np.float32)
        response = predict_pb2.PredictResponse()
        response.outputs[protocol.TEXT_EMBEDDINGS].CopyFrom(tf.make_tensor_proto(embeddings))
        return response


@pytest.fixture
def fake_server():
    servers = []

    def start(servicer):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def test_unavailable_twice_then_success_is_retried(fake_server):
    servicer = FakePrediction(failures=2)
    with CLIPClient(fake_server(servicer), max_attempts=4, initial_backoff=0.05) as client:
        result = client.encode_text(["ab", "abc"])
    np.testing.assert_array_equal(result, [[2] * 4, [3] * 4])
    assert servicer.attempts == 3
    waits = np.diff(servicer.times)
    # Full-jitter exponential backoff: wait k is in [0.5, 1] x 0.05 x 2**(k-1).
    assert 0.025 <= waits[0] < 0.5 and 0.05 <= waits[1] < 0.6, waits


def test_always_unavailable_gives_up_after_max_attempts(fake_server):
    servicer = FakePrediction(failures=10**9)
    with CLIPClient(fake_server(servicer), max_attempts=3, initial_backoff=0.01) as client:
        with pytest.raises(ClientError) as info:
            client.encode_text(["a dog"])
    assert servicer.attempts == 3
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.attempts == 3
    assert str(info.value) == (
        "Predict(encode_text) failed with UNAVAILABLE after 3 attempts: simulated UNAVAILABLE #3")


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.INTERNAL])
def test_other_codes_are_not_retried(fake_server, code):
    servicer = FakePrediction(failures=1, code=code)
    with CLIPClient(fake_server(servicer), max_attempts=5, initial_backoff=0.01) as client:
        with pytest.raises(ClientError) as info:
            client.encode_text(["a dog"])
    assert (servicer.attempts, info.value.code, info.value.attempts) == (1, code, 1)


def test_default_deadline_is_a_client_error_naming_deadline_exceeded(fake_server):
    target = fake_server(FakePrediction(delay=2.0))
    with CLIPClient(target, timeout=0.3) as client:
        start = time.monotonic()
        with pytest.raises(ClientError) as info:
            client.encode_text(["a dog"])
    assert time.monotonic() - start < 1.5
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "failed with DEADLINE_EXCEEDED" in str(info.value)


def test_per_call_timeout_overrides_the_default(fake_server):
    target = fake_server(FakePrediction(delay=1.0))
    with CLIPClient(target, timeout=30) as client:
        with pytest.raises(ClientError) as info:
            client.encode_text(["a dog"], timeout=0.2)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        np.testing.assert_array_equal(client.encode_text(["a"], timeout=10), [[1] * 4])


def test_retries_stop_at_the_call_deadline(fake_server):
    servicer = FakePrediction(failures=10**9)
    with CLIPClient(fake_server(servicer), timeout=1.0, max_attempts=1000,
                    initial_backoff=0.2, max_backoff=0.2) as client:
        start = time.monotonic()
        with pytest.raises(ClientError) as info:
            client.encode_text(["a dog"])
    assert time.monotonic() - start < 2.0
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 3 <= servicer.attempts <= 12, servicer.attempts


def test_chunks_are_sent_in_order_and_concatenated(fake_server):
    servicer = FakePrediction()
    texts = ["x" * n for n in range(1, 11)]
    with CLIPClient(fake_server(servicer), batch_size=4) as client:
        result = client.encode_text(texts)
    assert servicer.attempts == 3  # 4 + 4 + 2
    np.testing.assert_array_equal(result[:, 0], np.arange(1, 11))


def test_server_not_listening_is_unavailable_after_bounded_attempts():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with CLIPClient(f"127.0.0.1:{port}", max_attempts=3, initial_backoff=0.01,
                    timeout=10) as client:
        with pytest.raises(ClientError) as info:
            client.encode_text(["a dog"])
    assert (info.value.code, info.value.attempts) == (grpc.StatusCode.UNAVAILABLE, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout": 0}, "`timeout` must be a positive number. Received: timeout=0"),
    ({"batch_size": 0}, "`batch_size` must be a positive integer. Received: batch_size=0"),
    ({"max_attempts": 0}, "`max_attempts` must be a positive integer. Received: max_attempts=0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError) as info:
        CLIPClient("127.0.0.1:1", **kwargs)
    assert str(info.value) == message
