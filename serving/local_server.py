"""A local gRPC stand-in for TensorFlow Serving, for development and CI.

Implements the parts of TF Serving's protocol that `serving/client.py` uses, over
the same model directory layout (`<base_path>/<version>/saved_model.pb`):

* `PredictionService.Predict` and `PredictionService.GetModelMetadata`
  (`signature_def` field);
* `ModelService.GetModelStatus`.

It is NOT a replacement for TF Serving: no request batching, no version
hot-reloading after start-up (versions are listed when the server starts and
loaded on first use), no model management, REST, monitoring or SSL. Use
`tensorflow_model_server` with the `models.config` and `batching_parameters.txt`
that `export/export.py` writes for anything but development.

Defaults chosen for safety: it listens on 127.0.0.1 only, caps gRPC message
sizes, serves only the configured model name, and runs at most
`max_concurrent_calls` TensorFlow calls at a time (requests beyond that wait).
Bad requests get `INVALID_ARGUMENT` or `NOT_FOUND` with a message naming the
problem, and the server keeps serving.

    python serving/local_server.py --model_name clip --model_base_path /models/clip --port 8500
"""
import os
import re
import sys
import threading
from concurrent import futures

import grpc
from absl import logging

DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
_ASSERTION = re.compile(r"assertion failed: (.*)")


class ServingError(Exception):
    """A request error with the gRPC status code to answer with."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _list_versions(base_path):
    versions = []
    for name in os.listdir(base_path):
        if name.isdigit() and os.path.isfile(os.path.join(base_path, name, "saved_model.pb")):
            versions.append(int(name))
    return sorted(versions)


def _read_signature_defs(version_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    return saved_model.meta_graphs[0].signature_def


def _clean_tf_message(message):
    """The useful line of a TF runtime error (the assertion text when there is one)."""
    match = _ASSERTION.search(message)
    if match:
        return match.group(1).strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else message


class ModelRepository:
    """The versions of one model under a base path, loaded on first use.

    Args:
        model_name: str, the only name requests may ask for.
        base_path: str, folder of numbered SavedModel versions.
        max_concurrent_calls: int, TensorFlow calls allowed to run at once.
        warmup: bool, replay `assets.extra/tf_serving_warmup_requests` on load.
    """

    def __init__(self, model_name, base_path, max_concurrent_calls=2, warmup=True):
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  (registers the tokenizer's ops)

        self._tf = tf
        self.model_name = model_name
        self.base_path = os.path.abspath(base_path)
        if not os.path.isdir(self.base_path):
            raise FileNotFoundError(f"Model base path not found: {self.base_path}")
        self.versions = _list_versions(self.base_path)
        if not self.versions:
            raise FileNotFoundError(
                f"No numbered SavedModel versions (<version>/saved_model.pb) in {self.base_path}"
            )
        self.warmup = warmup
        self._loaded = {}
        self._signature_defs = {}
        self._load_lock = threading.Lock()
        self._calls = threading.BoundedSemaphore(max_concurrent_calls)

    # -- resolving a request's model spec -------------------------------------
    def resolve_version(self, model_spec):
        if model_spec.name != self.model_name:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found: model {model_spec.name!r} (this server serves only "
                f"{self.model_name!r})",
            )
        if model_spec.HasField("version_label"):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Version labels are not supported by the local server; request a version number.",
            )
        if not model_spec.HasField("version"):
            return self.versions[-1]
        version = model_spec.version.value
        if version not in self.versions:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found: model {self.model_name!r} version {version} "
                f"(available versions: {self.versions})",
            )
        return version

    def load(self, version):
        with self._load_lock:
            if version not in self._loaded:
                version_dir = os.path.join(self.base_path, str(version))
                logging.info("Loading %s version %d from %s", self.model_name, version, version_dir)
                self._loaded[version] = self._tf.saved_model.load(version_dir)
                self._signature_defs[version] = _read_signature_defs(version_dir)
                if self.warmup:
                    self._run_warmup(version, version_dir)
            return self._loaded[version], self._signature_defs[version]

    def _run_warmup(self, version, version_dir):
        from tensorflow_serving.apis import prediction_log_pb2

        path = os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")
        if not os.path.isfile(path):
            return
        for record in self._tf.data.TFRecordDataset(path).as_numpy_iterator():
            log = prediction_log_pb2.PredictionLog.FromString(record)
            request = log.predict_log.request
            self._run(self._loaded[version], self._signature_defs[version], request)
        logging.info("Warm-up requests replayed for version %d", version)

    # -- Predict --------------------------------------------------------------
    def predict(self, request):
        version = self.resolve_version(request.model_spec)
        loaded, signature_defs = self.load(version)
        outputs, signature_name = self._run(loaded, signature_defs, request)
        return outputs, version, signature_name

    def _run(self, loaded, signature_defs, request):
        tf = self._tf
        signature_name = request.model_spec.signature_name or "serving_default"
        if signature_name not in signature_defs or signature_name not in loaded.signatures:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Serving signature name {signature_name!r} not found in signature def; "
                f"available: {sorted(signature_defs)}",
            )
        signature = signature_defs[signature_name]
        expected = set(signature.inputs)
        received = set(request.inputs)
        if expected - received:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Missing input(s) {sorted(expected - received)} for signature "
                f"{signature_name!r}; expected {sorted(expected)}",
            )
        if received - expected:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Unknown input(s) {sorted(received - expected)} for signature "
                f"{signature_name!r}; expected {sorted(expected)}",
            )
        unknown_outputs = set(request.output_filter) - set(signature.outputs)
        if unknown_outputs:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output_filter names unknown output(s) {sorted(unknown_outputs)}; "
                f"available: {sorted(signature.outputs)}",
            )
        inputs = {}
        for name, info in signature.inputs.items():
            proto = request.inputs[name]
            if proto.dtype != info.dtype:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Input {name!r} must have dtype {tf.dtypes.as_dtype(info.dtype).name}; "
                    f"received {_dtype_name(proto.dtype)}",
                )
            try:
                value = tf.make_ndarray(proto)
            except Exception as e:  # malformed TensorProto
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Input {name!r} is not a valid tensor: {e}"
                ) from e
            expected_rank = len(info.tensor_shape.dim)
            if not info.tensor_shape.unknown_rank and value.ndim != expected_rank:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Input {name!r} must have rank {expected_rank}; received shape "
                    f"{list(value.shape)}",
                )
            inputs[name] = tf.constant(value, dtype=info.dtype)
        function = loaded.signatures[signature_name]
        with self._calls:
            try:
                outputs = function(**inputs)
            except tf.errors.InvalidArgumentError as e:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, _clean_tf_message(e.message)
                ) from e
            except tf.errors.OpError as e:
                raise ServingError(grpc.StatusCode.INTERNAL, _clean_tf_message(e.message)) from e
        if request.output_filter:
            outputs = {k: v for k, v in outputs.items() if k in set(request.output_filter)}
        return outputs, signature_name


def _dtype_name(enum_value):
    import tensorflow as tf

    try:
        return tf.dtypes.as_dtype(enum_value).name
    except TypeError:
        return f"dtype enum {enum_value}"


# -- gRPC services ------------------------------------------------------------------
def _abort(context, error):
    context.abort(error.code, error.message)


def make_servicers(repository):
    """The PredictionService and ModelService servicers over `repository`."""
    import tensorflow as tf
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2,
                                         prediction_service_pb2_grpc)

    class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            try:
                outputs, version, signature_name = repository.predict(request)
            except ServingError as e:
                logging.info("Predict rejected: %s", e.message)
                return _abort(context, e)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = repository.model_name
            response.model_spec.version.value = version
            response.model_spec.signature_name = signature_name
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

        def GetModelMetadata(self, request, context):
            try:
                if list(request.metadata_field) != ["signature_def"]:
                    raise ServingError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "metadata_field must be ['signature_def']; received "
                        f"{list(request.metadata_field)}",
                    )
                version = repository.resolve_version(request.model_spec)
                _, signature_defs = repository.load(version)
            except ServingError as e:
                return _abort(context, e)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = repository.model_name
            response.model_spec.version.value = version
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            for name, signature in signature_defs.items():
                if not name.startswith("__"):
                    signature_map.signature_def[name].CopyFrom(signature)
            response.metadata["signature_def"].Pack(signature_map)
            return response

    class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):
            try:
                requested = repository.resolve_version(request.model_spec)
            except ServingError as e:
                return _abort(context, e)
            versions = (
                [requested] if request.model_spec.HasField("version") else repository.versions
            )
            response = get_model_status_pb2.GetModelStatusResponse()
            for version in versions:
                status = response.model_version_status.add()
                status.version = version
                status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            return response

    return PredictionServicer(), ModelServicer()


def create_server(model_name, model_base_path, port, host="127.0.0.1", max_workers=8,
                  max_concurrent_calls=2, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                  warmup=True):
    """Builds (does not start) the gRPC server; returns `(server, bound_port)`.

    The latest version is loaded (and warmed up) before the server is returned.
    """
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    repository = ModelRepository(model_name, model_base_path, max_concurrent_calls, warmup)
    repository.load(repository.versions[-1])
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    prediction, model = make_servicers(repository)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(model, server)
    bound_port = server.add_insecure_port(f"{host}:{port}")
    if bound_port == 0:
        raise OSError(f"Could not bind {host}:{port}")
    return server, bound_port


def main(argv):
    del argv
    from absl import flags

    FLAGS = flags.FLAGS
    server, port = create_server(
        FLAGS.model_name, FLAGS.model_base_path, FLAGS.port, host=FLAGS.host,
        max_workers=FLAGS.max_workers, max_concurrent_calls=FLAGS.max_concurrent_calls,
        max_message_bytes=FLAGS.max_message_bytes,
    )
    server.start()
    logging.info("Serving %s from %s on %s:%d", FLAGS.model_name, FLAGS.model_base_path,
                 FLAGS.host, port)
    print(f"READY {FLAGS.host}:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("model_name", "clip", "The only model name requests may use.")
    flags.DEFINE_string("model_base_path", None, "Folder of numbered SavedModel versions.")
    flags.DEFINE_integer("port", 8500, "gRPC port (0 picks a free one).")
    flags.DEFINE_string("host", "127.0.0.1",
                        "Interface to listen on; loopback by default. Use 0.0.0.0 only on a "
                        "trusted network (no TLS, no authentication).")
    flags.DEFINE_integer("max_workers", 8, "gRPC handler threads.")
    flags.DEFINE_integer("max_concurrent_calls", 2, "TensorFlow calls run at once.")
    flags.DEFINE_integer("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES,
                         "Largest gRPC request or response.")
    flags.mark_flag_as_required("model_base_path")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
