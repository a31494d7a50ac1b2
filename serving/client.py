"""A Python gRPC client for a CLIP model served by TF Serving (or `local_server.py`).

Talks TF Serving's `PredictionService` and `ModelService` protocol to the
signatures that `export/export.py` writes (`encode_image`, `encode_text`,
`classify`, `similarity`).

Example:

    with CLIPClient("localhost:8500") as client:
        embeddings = client.encode_text(["a dog", "a cat"])    # (2, D) float32
        result = client.classify([open("dog.jpg", "rb").read()])
        result["top_labels"][0][0]                              # "dog"
"""
import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class ClientError(Exception):
    """A failed call: `code` is the `grpc.StatusCode`, `details` the server's message."""

    def __init__(self, code, details, method=None):
        self.code = code
        self.details = details
        self.method = method
        name = code.name if code is not None else "UNKNOWN"
        super().__init__(f"{method or 'call'} failed with {name}: {details}")


def _string_tensor(values, input_name):
    if isinstance(values, (str, bytes)):
        raise TypeError(f"`{input_name}` must be a list, not a single {type(values).__name__}.")
    values = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    return tf.make_tensor_proto(np.array(values, dtype=object), dtype=tf.string,
                                shape=[len(values)])


class CLIPClient:
    """Client for the CLIP serving signatures.

    Args:
        target: str, `host:port` of the server.
        model_name: str, the served model's name.
        version: optional int; None asks for the latest version.
        timeout: float, seconds per call.
        max_message_bytes: int, largest message sent or received.
    """

    def __init__(self, target, model_name="clip", version=None, timeout=30.0,
                 max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES):
        if timeout <= 0:
            raise ValueError(f"`timeout` must be positive. Received: timeout={timeout}")
        self.target = target
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    # -- plumbing -------------------------------------------------------------
    def _model_spec(self, spec, signature_name=None):
        spec.name = self.model_name
        if self.version is not None:
            spec.version.value = self.version
        if signature_name:
            spec.signature_name = signature_name

    def _call(self, method, request, name):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ClientError(e.code(), e.details(), name) from None

    def predict(self, signature_name, inputs):
        """Raw Predict: `inputs` maps names to TensorProtos; returns numpy outputs."""
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, signature_name)
        for key, proto in inputs.items():
            request.inputs[key].CopyFrom(proto)
        response = self._call(self._prediction.Predict, request, f"Predict({signature_name})")
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    # -- signatures -----------------------------------------------------------
    def encode_image(self, images):
        """Unit-norm image embeddings `(B, D)` float32 for a list of encoded images."""
        outputs = self.predict("encode_image", {"image_bytes": _string_tensor(images, "images")})
        return outputs["image_embeddings"]

    def encode_text(self, texts):
        """Unit-norm text embeddings `(B, D)` float32 for a list of str."""
        outputs = self.predict("encode_text", {"texts": _string_tensor(texts, "texts")})
        return outputs["text_embeddings"]

    def classify(self, images):
        """Zero-shot labels: dict of `scores` `(B, C)`, `top_labels` (B lists of k str)
        and `top_scores` `(B, k)`."""
        outputs = self.predict("classify", {"image_bytes": _string_tensor(images, "images")})
        return {
            "scores": outputs["scores"],
            "top_labels": [[label.decode("utf-8") for label in row]
                           for row in outputs["top_labels"]],
            "top_scores": outputs["top_scores"],
        }

    def similarity(self, images, texts):
        """Scaled cosine similarities `(B_images, B_texts)` float32."""
        outputs = self.predict(
            "similarity",
            {"image_bytes": _string_tensor(images, "images"),
             "texts": _string_tensor(texts, "texts")},
        )
        return outputs["logits_per_image"]

    # -- model service ----------------------------------------------------------
    def status(self):
        """`[{"version": int, "state": str, "error_code": int}]` of the served versions."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._model_spec(request.model_spec)
        response = self._call(self._models.GetModelStatus, request, "GetModelStatus")
        return [
            {
                "version": status.version,
                "state": get_model_status_pb2.ModelVersionStatus.State.Name(status.state),
                "error_code": status.status.error_code,
            }
            for status in response.model_version_status
        ]

    def metadata(self):
        """`{"version": int, "signatures": {name: {"inputs": {...}, "outputs": {...}}}}`,
        each tensor as `{"dtype": str, "shape": [int or None]}`."""
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._model_spec(request.model_spec)
        request.metadata_field.append("signature_def")
        response = self._call(self._prediction.GetModelMetadata, request, "GetModelMetadata")
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
