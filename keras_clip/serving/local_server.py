"""A local gRPC stand-in for TensorFlow Serving, for development and CI.

Implements the parts of TF Serving's protocol that `keras_clip/serving/client.py` uses, over
the same model directory layout (`<base_path>/<version>/saved_model.pb`):

* `PredictionService.Predict` and `PredictionService.GetModelMetadata`
  (`signature_def` field);
* `ModelService.GetModelStatus`.

It is NOT a replacement for TF Serving: no request batching, no version
hot-reloading after start-up (versions are listed when the server starts and
loaded on first use), no model management, REST or monitoring. Use
`tensorflow_model_server` with the `models.config` and `batching_parameters.txt`
that `export/export.py` writes for anything but development.

Defaults chosen for safety (limits in `keras_clip/serving/protocol.py`, each a flag):

* it listens on 127.0.0.1 only; TLS (and mutual TLS) with `--tls_cert_file`,
  `--tls_key_file` (and `--tls_client_ca_file`);
* requests over `--max_message_bytes` (32 MiB) get RESOURCE_EXHAUSTED from gRPC;
* every input tensor is checked (dtype, rank, dimensions >= 0, at most
  `--max_batch_size` (1024) elements, exactly as many values as its declared
  shape holds) before anything is allocated for it: INVALID_ARGUMENT;
* at most `--max_concurrent_calls` (2) TensorFlow calls run at once, at most
  `--max_queue_size` (16) more wait; beyond that UNAVAILABLE; more concurrent RPCs
  than handler threads get RESOURCE_EXHAUSTED from gRPC;
* a request whose deadline passes while it waits is not executed
  (DEADLINE_EXCEEDED);
* each version loads in its own thread, so loading one never holds up requests to
  another; a version that fails to load is reported as `END` with its error by
  `GetModelStatus` and answered NOT_FOUND at once, without loading it again.

Error codes follow TF Serving's for the same cases (source files cited where each
is raised), e.g. an unknown signature name is FAILED_PRECONDITION, an unknown
model or version NOT_FOUND. The server keeps serving after any bad request.

    python serving/local_server.py --model_name clip --model_base_path /models/clip --port 8500
"""
import os
import re
import threading
from concurrent import futures

import grpc
from absl import logging

from keras_clip.serving import protocol
from keras_clip.serving.protocol import DEFAULT_MAX_MESSAGE_BYTES  # noqa: F401  (re-exported)

_ASSERTION = re.compile(r"assertion failed: (.*)")

# Version states, as `ModelService.GetModelStatus` names them
# (tensorflow_serving/apis/get_model_status.proto, ModelVersionStatus.State).
START, LOADING, AVAILABLE, END = "START", "LOADING", "AVAILABLE", "END"

# TensorProto fields holding values, and how many of them one element takes.
_VALUE_FIELDS = {
    "string_val": 1, "float_val": 1, "double_val": 1, "int_val": 1, "int64_val": 1,
    "bool_val": 1, "half_val": 1, "uint32_val": 1, "uint64_val": 1,
    "scomplex_val": 2, "dcomplex_val": 2,
}


class ServingError(Exception):
    """A request error with the gRPC status code to answer with."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _list_versions(base_path):
    versions = []
    for name in os.listdir(base_path):
        if name.isdigit() and os.path.isdir(os.path.join(base_path, name)):
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


def _time_remaining(context):
    """Seconds left before the caller's deadline; None without a deadline."""
    if context is None:
        return None
    return context.time_remaining()


def _deadline_passed(where):
    return ServingError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"The request's deadline passed {where}; it was not executed.",
    )


def _dtype_name(enum_value):
    import tensorflow as tf

    try:
        return tf.dtypes.as_dtype(enum_value).name
    except TypeError:
        return f"dtype enum {enum_value}"


def _num_values(name, proto):
    """How many elements the TensorProto's payload holds (without materialising it)."""
    import tensorflow as tf

    if proto.tensor_content:
        if proto.dtype == tf.string.as_datatype_enum:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {name!r} is a string tensor with `tensor_content`; string values "
                "must be sent in `string_val`.",
            )
        itemsize = tf.dtypes.as_dtype(proto.dtype).size
        if len(proto.tensor_content) % itemsize:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {name!r} has {len(proto.tensor_content)} bytes of `tensor_content`, "
                f"not a multiple of its element size {itemsize}.",
            )
        return len(proto.tensor_content) // itemsize
    total = 0
    for field, per_element in _VALUE_FIELDS.items():
        total += len(getattr(proto, field)) // per_element
    return total


def tensor_from_proto(name, proto, tensor_info, max_batch_size):
    """Checks `proto` against the signature's `tensor_info` and the batch cap, then
    converts it to numpy.

    Everything is checked on the proto's declared shape and payload size BEFORE
    `tf.make_ndarray`, which would otherwise allocate the declared shape (filling it
    with the last value sent): a 20-byte request declaring 300 million strings would
    allocate gigabytes. The number of values sent must equal the declared number of
    elements; TensorFlow's own `Tensor::FromProto` would repeat the last value, which
    this server does not accept.

    Raises:
        ServingError: INVALID_ARGUMENT naming the problem.
    """
    import tensorflow as tf

    def invalid(message):
        return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)

    if proto.dtype != tensor_info.dtype:
        raise invalid(
            f"Input {name!r} must have dtype {tf.dtypes.as_dtype(tensor_info.dtype).name}; "
            f"received {_dtype_name(proto.dtype)}"
        )
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"Input {name!r} must declare its shape; received unknown_rank.")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(size < 0 for size in dims):
        raise invalid(f"Input {name!r} declares a negative dimension: shape {dims}")
    expected = tensor_info.tensor_shape
    if not expected.unknown_rank:
        if len(dims) != len(expected.dim):
            raise invalid(
                f"Input {name!r} must have rank {len(expected.dim)}; received shape {dims}"
            )
        for axis, (size, want) in enumerate(zip(dims, expected.dim)):
            if want.size >= 0 and size != want.size:
                raise invalid(
                    f"Input {name!r} must have size {want.size} on axis {axis}; "
                    f"received shape {dims}"
                )
    if dims and dims[0] > max_batch_size:
        raise invalid(
            f"Input {name!r} holds a batch of {dims[0]} elements; this server accepts at "
            f"most {max_batch_size} per request (split the request, or raise "
            "--max_batch_size)."
        )
    count = 1
    for size in dims:
        count *= size  # Python int: no overflow
    provided = _num_values(name, proto)
    if provided != count:
        raise invalid(
            f"Input {name!r} declares shape {dims} ({count} elements) but holds "
            f"{provided} values."
        )
    try:
        return tf.make_ndarray(proto)
    except Exception as e:  # malformed TensorProto
        raise invalid(f"Input {name!r} is not a valid tensor: {e}") from e


class _Version:
    """One version's state, the loaded SavedModel and how it failed."""

    def __init__(self, number, directory):
        self.number = number
        self.directory = directory
        self.state = START
        self.error = None  # (grpc.StatusCode, message) once loading failed
        self.loaded = None
        self.signature_defs = None
        self.ready = threading.Event()  # set when AVAILABLE or END


class ModelRepository:
    """The versions of one model under a base path, each loaded once, off the request path.

    A version is loaded by its own background thread the first time it is asked for
    (the latest one by `create_server` before serving). Requests for a version that
    is still loading wait for it until their deadline; requests for other versions
    are not held up (there is no lock across versions). A version that fails to load
    is remembered as failed (`END` with the error in `GetModelStatus`) and answered
    NOT_FOUND at once, without loading it again.

    Predict requests run at most `max_concurrent_calls` TensorFlow calls at once; up
    to `max_queue_size` more wait for a slot, and one more is answered UNAVAILABLE
    (as TF Serving's batch scheduler answers a full queue). A request whose deadline
    passes while it waits is not executed.

    Args:
        model_name: str, the only name requests may ask for.
        base_path: str, folder of numbered SavedModel versions.
        max_concurrent_calls: int, TensorFlow calls allowed to run at once.
        warmup: bool, replay `assets.extra/tf_serving_warmup_requests` on load.
        max_batch_size: int, most elements in one input tensor.
        max_queue_size: int, Predict requests allowed to wait for a slot.
    """

    def __init__(self, model_name, base_path,
                 max_concurrent_calls=protocol.DEFAULT_MAX_CONCURRENT_CALLS, warmup=True,
                 max_batch_size=protocol.DEFAULT_MAX_BATCH_SIZE,
                 max_queue_size=protocol.DEFAULT_MAX_QUEUE_SIZE):
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  (registers the tokenizer's ops)

        for arg, value, minimum in (("max_concurrent_calls", max_concurrent_calls, 1),
                                    ("max_batch_size", max_batch_size, 1),
                                    ("max_queue_size", max_queue_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"`{arg}` must be an integer >= {minimum}. Received: {arg}={value!r}"
                )
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
        self.max_concurrent_calls = max_concurrent_calls
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self._versions = {
            v: _Version(v, os.path.join(self.base_path, str(v))) for v in self.versions
        }
        self._state_lock = threading.Lock()  # guards state changes only, never held long
        self._calls = threading.Semaphore(max_concurrent_calls)
        self._admitted = 0  # Predict calls running or waiting for a slot
        # Counters for tests and monitoring.
        self.load_attempts = {v: 0 for v in self.versions}
        self.executed_calls = 0

    # -- loading ----------------------------------------------------------------------
    def _load_saved_model(self, directory):
        return self._tf.saved_model.load(directory)

    def _start_loading(self, version):
        entry = self._versions[version]
        with self._state_lock:
            if entry.state != START:
                return entry
            entry.state = LOADING
            self.load_attempts[version] += 1
        threading.Thread(target=self._load, args=(entry,), daemon=True,
                         name=f"load-{self.model_name}-{version}").start()
        return entry

    def _load(self, entry):
        logging.info("Loading %s version %d from %s", self.model_name, entry.number,
                     entry.directory)
        try:
            loaded = self._load_saved_model(entry.directory)
            signature_defs = _read_signature_defs(entry.directory)
            if self.warmup:
                self._run_warmup(entry, loaded, signature_defs)
        except Exception as e:  # any failure: remember it, never retry on requests
            code = grpc.StatusCode.UNKNOWN
            if isinstance(e, self._tf.errors.OpError):
                code = _grpc_code(e.error_code)
            message = f"{type(e).__name__}: {_clean_tf_message(str(e))}"
            logging.error("Version %d of %s failed to load: %s", entry.number,
                          self.model_name, message)
            with self._state_lock:
                entry.state, entry.error = END, (code, message)
        else:
            with self._state_lock:
                entry.loaded, entry.signature_defs = loaded, signature_defs
                entry.state = AVAILABLE
            logging.info("Version %d of %s is available", entry.number, self.model_name)
        finally:
            entry.ready.set()

    def load(self, version, timeout=None):
        """Starts loading `version` if needed and waits; returns its state string."""
        entry = self._start_loading(version)
        entry.ready.wait(timeout)
        return entry.state

    def _run_warmup(self, entry, loaded, signature_defs):
        from tensorflow_serving.apis import prediction_log_pb2

        path = os.path.join(entry.directory, "assets.extra", "tf_serving_warmup_requests")
        if not os.path.isfile(path):
            return
        for record in self._tf.data.TFRecordDataset(path).as_numpy_iterator():
            log = prediction_log_pb2.PredictionLog.FromString(record)
            function, inputs, _, _ = self._prepare(loaded, signature_defs,
                                                   log.predict_log.request)
            self._call_signature(function, inputs)
        logging.info("Warm-up requests replayed for version %d", entry.number)

    def version_states(self):
        """`{version: (state, error or None)}` for every version found at start-up."""
        with self._state_lock:
            return {v: (e.state, e.error) for v, e in self._versions.items()}

    # -- resolving a request's model spec -----------------------------------------------
    def check_model_name(self, model_spec):
        if model_spec.name != self.model_name:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found: model {model_spec.name!r} (this server serves only "
                f"{self.model_name!r})",
            )

    def resolve_version(self, model_spec):
        """The version number a request asks for (the newest usable one by default)."""
        self.check_model_name(model_spec)
        if model_spec.HasField("version_label"):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Version labels are not supported by the local server; request a version number.",
            )
        if model_spec.HasField("version"):
            version = model_spec.version.value
            if version not in self._versions:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Servable not found: model {self.model_name!r} version {version} "
                    f"(available versions: {self.versions})",
                )
            return version
        # Like TF Serving's "latest" request: the newest version that is available,
        # else the newest one that has not failed (it is loading or will be loaded).
        states = self.version_states()
        for wanted in ((AVAILABLE,), (START, LOADING)):
            candidates = [v for v, (state, _) in states.items() if state in wanted]
            if candidates:
                return max(candidates)
        raise ServingError(
            grpc.StatusCode.NOT_FOUND,
            f"Servable not found: every version of model {self.model_name!r} failed to load; "
            "see GetModelStatus.",
        )

    def servable(self, version, context=None):
        """The AVAILABLE `_Version`, loading it first if needed (until the deadline)."""
        entry = self._start_loading(version)
        if not entry.ready.is_set():
            remaining = _time_remaining(context)
            if not entry.ready.wait(remaining) and not entry.ready.is_set():
                raise _deadline_passed(f"while version {version} was loading")
        if entry.state == END:
            # TF Serving hands out only servables that loaded; any other version is
            # "not found" (tensorflow_serving/core/basic_manager.cc,
            # GetUntypedServableHandle).
            code, message = entry.error
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found: model {self.model_name!r} version {version} failed to "
                f"load ({code.name}: {message})",
            )
        return entry

    # -- Predict ------------------------------------------------------------------------
    def predict(self, request, context=None):
        version = self.resolve_version(request.model_spec)
        entry = self.servable(version, context)
        function, inputs, signature_name, output_filter = self._prepare(
            entry.loaded, entry.signature_defs, request)
        outputs = self._execute(function, inputs, context)
        if output_filter:
            outputs = {k: v for k, v in outputs.items() if k in output_filter}
        return outputs, version, signature_name

    def _prepare(self, loaded, signature_defs, request):
        """Checks the request against the signature; returns what `_execute` needs."""
        tf = self._tf
        signature_name = request.model_spec.signature_name or protocol.SERVING_DEFAULT
        if signature_name not in signature_defs or signature_name not in loaded.signatures:
            # TF Serving answers an unknown signature key with FAILED_PRECONDITION
            # (tensorflow_serving/servables/tensorflow/predict_util.cc, RunPredict).
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Serving signature name {signature_name!r} not found in signature def; "
                f"available: {sorted(k for k in signature_defs if not k.startswith('__'))}",
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
        output_filter = set(request.output_filter)
        unknown_outputs = output_filter - set(signature.outputs)
        if unknown_outputs:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output_filter names unknown output(s) {sorted(unknown_outputs)}; "
                f"available: {sorted(signature.outputs)}",
            )
        inputs = {}
        for name, info in signature.inputs.items():
            value = tensor_from_proto(name, request.inputs[name], info, self.max_batch_size)
            inputs[name] = tf.constant(value, dtype=info.dtype)
        return loaded.signatures[signature_name], inputs, signature_name, output_filter

    def _call_signature(self, function, inputs):
        return function(**inputs)

    def _execute(self, function, inputs, context):
        """Runs `function` in a free slot, after waiting in the bounded queue."""
        tf = self._tf
        with self._state_lock:
            if self._admitted >= self.max_concurrent_calls + self.max_queue_size:
                # A full queue is a transient condition: UNAVAILABLE, as TF Serving's
                # batch schedulers answer it (tensorflow_serving/batching/
                # streaming_batch_scheduler.h, Schedule), so clients retry with backoff.
                raise ServingError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"Server busy: {self.max_concurrent_calls} requests running and "
                    f"{self.max_queue_size} waiting (--max_queue_size); retry later.",
                )
            self._admitted += 1
        try:
            remaining = _time_remaining(context)
            if remaining is not None and remaining <= 0:
                raise _deadline_passed("before it was queued")
            if not self._calls.acquire(timeout=remaining):
                raise _deadline_passed("while it waited in the queue")
            try:
                remaining = _time_remaining(context)
                if remaining is not None and remaining <= 0:
                    raise _deadline_passed("while it waited in the queue")
                if context is not None and not context.is_active():
                    raise ServingError(grpc.StatusCode.CANCELLED,
                                       "The request was cancelled; it was not executed.")
                with self._state_lock:
                    self.executed_calls += 1
                try:
                    return self._call_signature(function, inputs)
                except tf.errors.InvalidArgumentError as e:
                    raise ServingError(
                        grpc.StatusCode.INVALID_ARGUMENT, _clean_tf_message(e.message)
                    ) from e
                except tf.errors.OpError as e:
                    raise ServingError(
                        grpc.StatusCode.INTERNAL, _clean_tf_message(e.message)
                    ) from e
            finally:
                self._calls.release()
        finally:
            with self._state_lock:
                self._admitted -= 1


def _grpc_code(tf_error_code):
    """The grpc.StatusCode with the same number as a TensorFlow error code."""
    for code in grpc.StatusCode:
        if code.value[0] == tf_error_code:
            return code
    return grpc.StatusCode.UNKNOWN


# -- gRPC services ------------------------------------------------------------------
def _abort(context, error):
    context.abort(error.code, error.message)


def _guarded(method_name, handler):
    """Runs `handler(request, context)`; request errors become their status code and
    anything unexpected INTERNAL (never gRPC's opaque "Exception calling application")."""

    def wrapped(self, request, context):
        try:
            return handler(request, context)
        except ServingError as e:
            logging.info("%s rejected (%s): %s", method_name, e.code.name, e.message)
            return _abort(context, e)
        except Exception as e:  # noqa: BLE001  (the server must keep serving)
            logging.exception("%s failed", method_name)
            return _abort(context, ServingError(grpc.StatusCode.INTERNAL,
                                                f"{type(e).__name__}: {e}"))

    return wrapped


def make_servicers(repository):
    """The PredictionService and ModelService servicers over `repository`."""
    import tensorflow as tf
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2,
                                         prediction_service_pb2_grpc)

    def predict(request, context):
        outputs, version, signature_name = repository.predict(request, context)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = repository.model_name
        response.model_spec.version.value = version
        response.model_spec.signature_name = signature_name
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
        return response

    def get_model_metadata(request, context):
        # Only `signature_def` exists, as in TF Serving
        # (tensorflow_serving/servables/tensorflow/get_model_metadata_impl.cc).
        if list(request.metadata_field) != ["signature_def"]:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "metadata_field must be ['signature_def']; received "
                f"{list(request.metadata_field)}",
            )
        version = repository.resolve_version(request.model_spec)
        entry = repository.servable(version, context)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = repository.model_name
        response.model_spec.version.value = version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in entry.signature_defs.items():
            if not name.startswith("__"):
                signature_map.signature_def[name].CopyFrom(signature)
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def get_model_status(request, context):
        # Codes and per-version states as in TF Serving
        # (tensorflow_serving/model_servers/get_model_status_impl.cc): a missing
        # model_spec is INVALID_ARGUMENT, an unknown version NOT_FOUND, and each
        # version reports its own state with its load error as `status`.
        if not request.HasField("model_spec"):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        repository.check_model_name(request.model_spec)
        states = repository.version_states()
        if request.model_spec.HasField("version"):
            version = request.model_spec.version.value
            if version not in states:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {version} of model {repository.model_name!r} "
                    f"(versions: {sorted(states)})",
                )
            states = {version: states[version]}
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, (state, error) in sorted(states.items()):
            status = response.model_version_status.add()
            status.version = version
            status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
            if error is not None:
                status.status.error_code = error[0].value[0]
                status.status.error_message = error[1]
        return response

    class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        Predict = _guarded("Predict", predict)
        GetModelMetadata = _guarded("GetModelMetadata", get_model_metadata)

    class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
        GetModelStatus = _guarded("GetModelStatus", get_model_status)

    return PredictionServicer(), ModelServicer()


def server_credentials(cert_file, key_file, client_ca_file=None):
    """TLS credentials from PEM files; with `client_ca_file`, clients must present a
    certificate signed by it (mutual TLS)."""
    def read(path):
        with open(path, "rb") as f:
            return f.read()

    client_ca = read(client_ca_file) if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(read(key_file), read(cert_file))], root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def serve_repository(repository, port, host="127.0.0.1", max_workers=None,
                     max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, credentials=None):
    """Builds (does not start) a gRPC server over `repository`; returns `(server, port)`.

    Args:
        max_workers: handler threads; default: enough for every running and queued
            Predict plus 4 for status and metadata. gRPC itself answers calls beyond
            this RESOURCE_EXHAUSTED instead of queueing them without bound.
        max_message_bytes: largest request or response; gRPC answers a larger
            request RESOURCE_EXHAUSTED before it reaches the server code.
        credentials: optional `grpc.ServerCredentials` (see `server_credentials`).
    """
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    if max_workers is None:
        max_workers = repository.max_concurrent_calls + repository.max_queue_size + 4
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
        maximum_concurrent_rpcs=max_workers,
    )
    prediction, model = make_servicers(repository)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(model, server)
    address = f"{host}:{port}"
    if credentials is None:
        bound_port = server.add_insecure_port(address)
    else:
        bound_port = server.add_secure_port(address, credentials)
    if bound_port == 0:
        raise OSError(f"Could not bind {address}")
    return server, bound_port


def create_server(model_name, model_base_path, port, host="127.0.0.1", max_workers=None,
                  max_concurrent_calls=protocol.DEFAULT_MAX_CONCURRENT_CALLS,
                  max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, warmup=True,
                  max_batch_size=protocol.DEFAULT_MAX_BATCH_SIZE,
                  max_queue_size=protocol.DEFAULT_MAX_QUEUE_SIZE,
                  tls_cert_file=None, tls_key_file=None, tls_client_ca_file=None):
    """Builds (does not start) the gRPC server; returns `(server, bound_port)`.

    The latest version is loaded (and warmed up) before the server is returned; if
    it fails to load, the failure is logged and reported by `GetModelStatus`.
    """
    repository = ModelRepository(model_name, model_base_path, max_concurrent_calls, warmup,
                                 max_batch_size=max_batch_size, max_queue_size=max_queue_size)
    repository.load(repository.versions[-1])
    credentials = None
    if tls_cert_file or tls_key_file:
        if not (tls_cert_file and tls_key_file):
            raise ValueError(
                "`tls_cert_file` and `tls_key_file` must be given together. Received: "
                f"tls_cert_file={tls_cert_file!r}, tls_key_file={tls_key_file!r}"
            )
        credentials = server_credentials(tls_cert_file, tls_key_file, tls_client_ca_file)
    return serve_repository(repository, port, host=host, max_workers=max_workers,
                            max_message_bytes=max_message_bytes, credentials=credentials)

