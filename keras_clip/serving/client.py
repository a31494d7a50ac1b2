"""A Python gRPC client for a CLIP model served by TF Serving (or `keras_clip.serving.local_server`).

Talks TF Serving's `PredictionService` and `ModelService` protocol to the
signatures that `export/export.py` writes (`encode_image`, `encode_text`,
`classify`, `similarity`; names in `keras_clip/serving/protocol.py`).

Reliability: each method call has a deadline (`timeout`, default 30 s, covering
all its requests and retries), long lists are split into requests of at most
`batch_size` items, UNAVAILABLE is retried with exponential backoff up to
`max_attempts`, and TLS (optionally mutual) is one argument away.

Example:

    with CLIPClient("localhost:8500") as client:
        embeddings = client.encode_text(["a dog", "a cat"])    # (2, D) float32
        result = client.classify([open("dog.jpg", "rb").read()])
        result["top_labels"][0][0]                              # "dog"
"""
import random
import time

import grpc
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from keras_clip.serving import protocol
from keras_clip.serving.protocol import DEFAULT_MAX_MESSAGE_BYTES

# Every call this client makes is idempotent (Predict on these signatures has no side
# effects; status and metadata only read), so a call that failed with one of these
# codes may be sent again. UNAVAILABLE is the code for "not processed, try again"
# (server starting, connection refused or reset, queue full).
RETRYABLE_CODES = (grpc.StatusCode.UNAVAILABLE,)


class ClientError(Exception):
    """A failed call: `code` is the `grpc.StatusCode`, `details` the server's message."""

    def __init__(self, code, details, method=None, attempts=1):
        self.code = code
        self.details = details
        self.method = method
        self.attempts = attempts
        name = code.name if code is not None else "UNKNOWN"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{method or 'call'} failed with {name}{tries}: {details}")


def _string_tensor(values, input_name):
    values = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    return tf.make_tensor_proto(np.array(values, dtype=object), dtype=tf.string,
                                shape=[len(values)])


def _as_list(values, input_name):
    if isinstance(values, (str, bytes)):
        raise TypeError(f"`{input_name}` must be a list, not a single {type(values).__name__}.")
    return list(values)


def _chunks(values, size):
    """Consecutive slices of at most `size` items; one (empty) slice for an empty list,
    so the server still answers an empty batch with its own error."""
    if not values:
        return [values]
    return [values[i:i + size] for i in range(0, len(values), size)]


def _positive(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}")


def _read(path_or_bytes):
    if path_or_bytes is None or isinstance(path_or_bytes, bytes):
        return path_or_bytes
    with open(path_or_bytes, "rb") as f:
        return f.read()


class CLIPClient:
    """Client for the CLIP serving signatures.

    Long input lists are sent as several requests of at most `batch_size` items and
    the results concatenated in order. A call that fails with UNAVAILABLE (server
    starting, connection refused, queue full) is retried up to `max_attempts` times
    in all, with exponential backoff and jitter, within the call's deadline. Other
    codes are raised at once as `ClientError`.

    Args:
        target: str, `host:port` of the server.
        model_name: str, the served model's name.
        version: optional int; None asks for the latest version.
        timeout: float, default deadline in seconds of one method call (all its
            requests and retries); each method also takes `timeout=`.
        max_message_bytes: int, largest message sent or received.
        batch_size: int, most items per request (TF Serving's `max_batch_size` in
            the exported `batching_parameters.txt` is 64 as well).
        max_attempts: int, attempts per request, 1 disables retries.
        initial_backoff: float, seconds before the first retry; doubled (times
            `backoff_multiplier`) after each, up to `max_backoff`, with full jitter.
        max_backoff: float, longest wait between attempts.
        backoff_multiplier: float, growth of the wait per attempt.
        root_certificates: optional PEM bytes or file path; enables TLS and trusts
            these CAs (use `tls=True` alone to trust the system's CAs).
        private_key: optional PEM bytes or file path of a client key (mutual TLS).
        certificate_chain: optional PEM bytes or file path of the client certificate.
        tls: bool, use TLS even without `root_certificates`.
        tls_server_name: optional str, the name to check the server certificate
            against when it differs from the host in `target`.
    """

    def __init__(self, target, model_name="clip", version=None, timeout=30.0,
                 max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                 batch_size=protocol.DEFAULT_CLIENT_BATCH_SIZE, max_attempts=4,
                 initial_backoff=0.1, max_backoff=2.0, backoff_multiplier=2.0,
                 root_certificates=None, private_key=None, certificate_chain=None, tls=False,
                 tls_server_name=None):
        _positive("timeout", timeout)
        _positive("initial_backoff", initial_backoff)
        _positive("max_backoff", max_backoff)
        for name, value in (("batch_size", batch_size), ("max_attempts", max_attempts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
        if backoff_multiplier < 1:
            raise ValueError("`backoff_multiplier` must be >= 1. Received: "
                             f"backoff_multiplier={backoff_multiplier!r}")
        if (private_key is None) != (certificate_chain is None):
            raise ValueError("`private_key` and `certificate_chain` must be given together.")
        self.target = target
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.backoff_multiplier = backoff_multiplier
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # The retries are done here, with backoff the caller controls.
            ("grpc.enable_retries", 0),
        ]
        self.secure = bool(tls or root_certificates or private_key)
        if self.secure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(root_certificates),
                private_key=_read(private_key),
                certificate_chain=_read(certificate_chain),
            )
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    # -- plumbing -------------------------------------------------------------
    def _model_spec(self, spec, signature_name=None):
        spec.name = self.model_name
        if self.version is not None:
            spec.version.value = self.version
        if signature_name:
            spec.signature_name = signature_name

    def _deadline(self, timeout):
        _positive("timeout", timeout, allow_none=True)
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _backoff(self, attempt):
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_backoff,
                      self.initial_backoff * self.backoff_multiplier ** (attempt - 1))
        return random.uniform(0.5 * ceiling, ceiling)

    def _call(self, method, request, name, deadline):
        """One RPC with bounded retries on RETRYABLE_CODES, all before `deadline`."""
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  "Deadline exceeded before the call could be sent",
                                  name, attempt - 1 or 1)
            try:
                return method(request, timeout=remaining)
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
            if code not in RETRYABLE_CODES or attempt >= self.max_attempts:
                raise ClientError(code, details, name, attempt)
            wait = min(self._backoff(attempt), max(0.0, deadline - time.monotonic()))
            logging.info("%s failed with %s (attempt %d of %d); retrying in %.2fs",
                         name, code.name, attempt, self.max_attempts, wait)
            time.sleep(wait)

    def predict(self, signature_name, inputs, timeout=None):
        """Raw Predict: `inputs` maps names to TensorProtos; returns numpy outputs.

        Sent as one request (no chunking); retried on UNAVAILABLE.
        """
        return self._predict(signature_name, inputs, self._deadline(timeout))

    def _predict(self, signature_name, inputs, deadline):
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, signature_name)
        for key, proto in inputs.items():
            request.inputs[key].CopyFrom(proto)
        response = self._call(self._prediction.Predict, request, f"Predict({signature_name})",
                              deadline)
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def _predict_chunked(self, signature_name, input_name, values, timeout, outputs):
        """Predict over `values` in chunks of `batch_size`; concatenates each of
        `outputs` along the batch axis, in order."""
        deadline = self._deadline(timeout)
        parts = [
            self._predict(signature_name, {input_name: _string_tensor(chunk, input_name)},
                          deadline)
            for chunk in _chunks(values, self.batch_size)
        ]
        return {name: np.concatenate([part[name] for part in parts]) for name in outputs}

    # -- signatures -----------------------------------------------------------
    def encode_image(self, images, timeout=None):
        """Unit-norm image embeddings `(B, D)` float32 for a list of encoded images."""
        images = _as_list(images, "images")
        return self._predict_chunked(protocol.ENCODE_IMAGE, protocol.IMAGE_BYTES, images,
                                     timeout, [protocol.IMAGE_EMBEDDINGS]
                                     )[protocol.IMAGE_EMBEDDINGS]

    def encode_text(self, texts, timeout=None):
        """Unit-norm text embeddings `(B, D)` float32 for a list of str."""
        texts = _as_list(texts, "texts")
        return self._predict_chunked(protocol.ENCODE_TEXT, protocol.TEXTS, texts, timeout,
                                     [protocol.TEXT_EMBEDDINGS])[protocol.TEXT_EMBEDDINGS]

    def classify(self, images, timeout=None):
        """Zero-shot labels: dict of `scores` `(B, C)`, `top_labels` (B lists of k str)
        and `top_scores` `(B, k)`."""
        images = _as_list(images, "images")
        outputs = self._predict_chunked(
            protocol.CLASSIFY, protocol.IMAGE_BYTES, images, timeout,
            [protocol.SCORES, protocol.TOP_LABELS, protocol.TOP_SCORES])
        return {
            protocol.SCORES: outputs[protocol.SCORES],
            protocol.TOP_LABELS: [[label.decode("utf-8") for label in row]
                                  for row in outputs[protocol.TOP_LABELS]],
            protocol.TOP_SCORES: outputs[protocol.TOP_SCORES],
        }

    def similarity(self, images, texts, timeout=None):
        """Scaled cosine similarities `(B_images, B_texts)` float32.

        Long lists are sent as blocks of at most `batch_size` images by `batch_size`
        texts and the blocks assembled.
        """
        images = _as_list(images, "images")
        texts = _as_list(texts, "texts")
        deadline = self._deadline(timeout)
        rows = []
        for image_chunk in _chunks(images, self.batch_size):
            row = []
            for text_chunk in _chunks(texts, self.batch_size):
                outputs = self._predict(
                    protocol.SIMILARITY,
                    {protocol.IMAGE_BYTES: _string_tensor(image_chunk, "images"),
                     protocol.TEXTS: _string_tensor(text_chunk, "texts")},
                    deadline,
                )
                row.append(outputs[protocol.LOGITS_PER_IMAGE])
            rows.append(np.concatenate(row, axis=1))
        return np.concatenate(rows, axis=0)

    # -- model service ----------------------------------------------------------
    def status(self, timeout=None, details=False):
        """`[{"version": int, "state": str, "error_code": int}]` of the served versions;
        with `details=True` each also has `"error_message"`."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._model_spec(request.model_spec)
        response = self._call(self._models.GetModelStatus, request, "GetModelStatus",
                              self._deadline(timeout))
        result = []
        for status in response.model_version_status:
            entry = {
                "version": status.version,
                "state": get_model_status_pb2.ModelVersionStatus.State.Name(status.state),
                "error_code": status.status.error_code,
            }
            if details:
                entry["error_message"] = status.status.error_message
            result.append(entry)
        return result

    def metadata(self, timeout=None):
        """`{"version": int, "signatures": {name: {"inputs": {...}, "outputs": {...}}}}`,
        each tensor as `{"dtype": str, "shape": [int or None]}`."""
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._model_spec(request.model_spec)
        request.metadata_field.append("signature_def")
        response = self._call(self._prediction.GetModelMetadata, request, "GetModelMetadata",
                              self._deadline(timeout))
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)

        def describe(tensors):
            return {
                name: {
                    "dtype": tf.dtypes.as_dtype(info.dtype).name,
                    "shape": [d.size if d.size >= 0 else None for d in info.tensor_shape.dim],
                }
                for name, info in tensors.items()
            }

        return {
            "version": response.model_spec.version.value,
            "signatures": {
                name: {"inputs": describe(s.inputs), "outputs": describe(s.outputs)}
                for name, s in signature_map.signature_def.items()
            },
        }

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
