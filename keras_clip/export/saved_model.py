"""Exports a CLIP model as a TF Serving SavedModel with named signatures.

Layout written under `export_base` (what `tensorflow_model_server
--model_base_path=<export_base>` and `serving/local_server.py` read):

    <export_base>/<version>/saved_model.pb
    <export_base>/<version>/variables/
    <export_base>/<version>/assets/
    <export_base>/<version>/assets.extra/tf_serving_warmup_requests
    <export_base>/models.config            ModelServerConfig text proto
    <export_base>/batching_parameters.txt  BatchingParameters text proto

Signatures (inputs and outputs by name; `B` is the batch, `D` the embedding width):

| signature | inputs | outputs |
|---|---|---|
| `encode_image` | `image_bytes` string `(B,)` | `image_embeddings` float32 `(B, D)`, unit norm |
| `encode_text` | `texts` string `(B,)` | `text_embeddings` float32 `(B, D)`, unit norm |
| `classify` | `image_bytes` string `(B,)` | `scores` float32 `(B, C)` (softmax over the labels), `top_labels` string `(B, k)`, `top_scores` float32 `(B, k)` |
| `similarity` | `image_bytes` string `(B,)`, `texts` string `(B',)` | `logits_per_image` float32 `(B, B')` |

`classify` exists only when labels are given, and is then also `serving_default`;
otherwise `serving_default` is `encode_image`.

Decoding and resizing run in the graph with the same `CLIPImagePreprocessor` layer
as training, and tokenisation with `CLIPTokenizer(fix_text=True)` (the in-graph
cleaning), both configured from `model.preprocessor_config` (the preset's image
size, mean/std, context length and limits, as training reads them), so serving
cannot drift from training. The graphs hold only TensorFlow
core and tensorflow-text ops: a server needs `import tensorflow_text` (TF Serving
links those ops in) and no Python code from this package.

Requests the graphs reject with `INVALID_ARGUMENT` and a message naming the
problem: an empty batch, bytes that are not an image (the message names the batch
index), an image whose header declares more pixels than the model's
`max_image_pixels` (checked before decoding; the message names the batch index,
the declared size and the limit, which the module also keeps as the variable
`max_image_pixels`), an empty (or all-whitespace) text and a text longer than
`max_text_bytes` (both naming the batch index).
"""
import os
import uuid

import numpy as np
import tensorflow as tf
from absl import logging

from keras_clip.preprocessing.text_cleaning import blank_mask
from keras_clip.zero_shot import (build_class_embeddings, checked_class_embeddings, class_logits,
                                  resolve_templates)
from keras_clip.serving.protocol import (CLASSIFY, DEFAULT_CLIENT_BATCH_SIZE,
                              ENCODE_IMAGE, ENCODE_TEXT, IMAGE_BYTES, IMAGE_EMBEDDINGS,
                              LOGITS_PER_IMAGE, SCORES, SERVING_DEFAULT, SIMILARITY,
                              TEXT_EMBEDDINGS, TEXTS, TOP_LABELS, TOP_SCORES)

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MODELS_CONFIG_FILE = "models.config"
BATCHING_FILE = "batching_parameters.txt"
# Prefixes of the hidden folders an export writes in and swaps out through. TF Serving
# takes only children whose whole name parses as an integer for versions
# (tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc,
# ParseVersionNumber), and `serving/local_server.py` only all-digit names, so
# neither ever sees these folders.
STAGING_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"

BATCHING_PARAMETERS = """\
max_batch_size { value: %d }
batch_timeout_micros { value: 2000 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 2 }
pad_variable_length_inputs: false
""" % DEFAULT_CLIENT_BATCH_SIZE


class CLIPServingModule(tf.Module):
    """The serving graph of a CLIP model: preprocessing, towers and label head.

    Args:
        model: a built `keras_clip.CLIP`.
        class_names: optional sequence of C str; enables `classify`.
        class_embeddings: float array `(C, D)` for `class_names` (see
            `keras_clip.zero_shot.build_class_embeddings`).
        top_k: int, labels returned per image by `classify` (at most C).
        max_text_bytes: int, longest accepted text in UTF-8 bytes; None: the
            model's `preprocessor_config.max_text_bytes` (its preset's).
    """

    def __init__(self, model, class_names=None, class_embeddings=None, top_k=5,
                 max_text_bytes=None):
        super().__init__(name="clip_serving")
        if max_text_bytes is None:
            max_text_bytes = model.preprocessor_config.max_text_bytes
        if top_k <= 0:
            raise ValueError(f"`top_k` must be positive. Received: top_k={top_k}")
        if max_text_bytes <= 0:
            raise ValueError(
                f"`max_text_bytes` must be positive. Received: max_text_bytes={max_text_bytes}"
            )
        self.model = model
        self.image_preprocessor = model.image_preprocessor()
        # The limit is a constant of the graph; this records it in the SavedModel.
        self.max_image_pixels = tf.Variable(
            self.image_preprocessor.max_pixels, dtype=tf.int64, trainable=False,
            name="max_image_pixels",
        )
        self.tokenizer = model.preprocessor_config.tokenizer(fix_text=True)
        self.max_text_bytes = int(max_text_bytes)
        self.class_names = list(class_names) if class_names else None
        if self.class_names:
            class_embeddings = checked_class_embeddings(class_embeddings, self.class_names, model)
            self.class_embeddings = tf.Variable(
                class_embeddings, trainable=False, name="class_embeddings"
            )
            self.labels = tf.Variable(
                tf.constant(self.class_names, tf.string), trainable=False, name="labels"
            )
            self.top_k = min(int(top_k), len(self.class_names))
        image_bytes = tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)
        texts = tf.TensorSpec([None], tf.string, name=TEXTS)
        functions = {
            ENCODE_IMAGE: (self._encode_image, [image_bytes]),
            ENCODE_TEXT: (self._encode_text, [texts]),
            SIMILARITY: (self._similarity, [image_bytes, texts]),
        }
        if self.class_names:  # `classify` needs the class embeddings
            functions[CLASSIFY] = (self._classify, [image_bytes])
        # The signatures' `tf.function`s live in a plain holder, not as attributes:
        # `tf.saved_model.save` retraces every tf.function it finds on a module, which
        # doubled the export's tracing time. The SavedModel's interface is its
        # signatures (what TF Serving serves); the restored object has no methods.
        self._functions = _Functions({
            name: tf.function(function, input_signature=specs)
            for name, (function, specs) in functions.items()
        })
        # Each tower with its preprocessing is traced once and called by every
        # signature that needs it (a graph function in the SavedModel's library).
        self._embeddings = _Functions({
            IMAGE_BYTES: tf.function(self._image_embeddings, input_signature=[image_bytes]),
            TEXTS: tf.function(self._text_embeddings, input_signature=[texts]),
        })

    # -- building blocks (traced inside the signatures) ------------------------
    def _check_batch(self, values, input_name):
        size = tf.size(values)
        return tf.debugging.Assert(
            size > 0, [f"`{input_name}` is an empty batch; send at least one element."]
        )

    def _image_embeddings(self, image_bytes):
        with tf.control_dependencies([self._check_batch(image_bytes, IMAGE_BYTES)]):
            images = self.image_preprocessor(image_bytes)  # (B, S, S, 3)
        return _unit_float32(self.model.encode_image(images, normalize=False))  # (B, D)

    def _text_embeddings(self, texts):
        lengths = tf.strings.length(texts)  # (B,) bytes
        blank = blank_mask(texts)  # (B,) empty or only whitespace (`str.isspace`, U+3000 included)
        too_long = lengths > self.max_text_bytes  # (B,)
        checks = [
            self._check_batch(texts, TEXTS),
            tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(blank)),
                ["`texts` holds an empty or whitespace-only string at batch index",
                 tf.reduce_min(tf.where(blank))],
            ),
            tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(too_long)),
                [f"`texts` holds a string longer than {self.max_text_bytes} UTF-8 bytes "
                 "at batch index", tf.reduce_min(tf.where(too_long)), "length",
                 tf.reduce_max(lengths)],
            ),
        ]
        with tf.control_dependencies(checks):
            token_ids = self.tokenizer(texts)  # (B, T)
        return _unit_float32(self.model.encode_text(token_ids, normalize=False, trim=True))  # (B, D)

    # -- signatures (Python bodies; traced once each by `self._functions`) -------
    def _encode_image(self, image_bytes):
        return {IMAGE_EMBEDDINGS: self._embeddings[IMAGE_BYTES](image_bytes)}

    def _encode_text(self, texts):
        return {TEXT_EMBEDDINGS: self._embeddings[TEXTS](texts)}

    def _similarity(self, image_bytes, texts):
        image = self._embeddings[IMAGE_BYTES](image_bytes)  # (B, D)
        text = self._embeddings[TEXTS](texts)  # (B', D)
        scale = tf.cast(self.model.logit_scale(), tf.float32)
        return {LOGITS_PER_IMAGE: scale * tf.matmul(image, text, transpose_b=True)}  # (B, B')

    def _classify(self, image_bytes):
        image = self._embeddings[IMAGE_BYTES](image_bytes)  # (B, D)
        logits = class_logits(self.model, image, self.class_embeddings)  # (B, C)
        # A softmax over the labels for either loss (a sigmoid model's bias cancels).
        scores = tf.nn.softmax(logits, axis=-1)  # (B, C)
        top_scores, top_indices = tf.math.top_k(scores, k=self.top_k)  # (B, k)
        return {
            SCORES: scores,
            TOP_LABELS: tf.gather(self.labels, top_indices),
            TOP_SCORES: top_scores,
        }

    # -- calling the signatures in Python ------------------------------------------
    def encode_image(self, image_bytes):
        return self._functions[ENCODE_IMAGE](image_bytes)

    def encode_text(self, texts):
        return self._functions[ENCODE_TEXT](texts)

    def similarity(self, image_bytes, texts):
        return self._functions[SIMILARITY](image_bytes, texts)

    def classify(self, image_bytes):
        if CLASSIFY not in self._functions:
            raise ValueError("This module has no labels, so no `classify`; pass `class_names`.")
        return self._functions[CLASSIFY](image_bytes)

    def signatures(self):
        """Signature name -> concrete function, as `tf.saved_model.save` takes them."""
        signatures = {name: function.get_concrete_function()
                      for name, function in self._functions.items()}
        signatures[SERVING_DEFAULT] = signatures.get(CLASSIFY, signatures[ENCODE_IMAGE])
        return signatures


class _Functions:
    """Name -> `tf.function`, in a plain object that `tf.Module` neither wraps nor
    tracks, so `tf.saved_model.save` does not retrace its functions."""

    def __init__(self, functions):
        self._functions = dict(functions)

    def __contains__(self, name):
        return name in self._functions

    def __getitem__(self, name):
        return self._functions[name]

    def items(self):
        return self._functions.items()


# -- export -------------------------------------------------------------------------
EXPORT_DTYPES = ("float32", "bfloat16", "mixed_bfloat16")


def _unit_float32(features):
    """L2-normalised float32 rows, whatever the towers' compute dtype (a bf16 model's
    features are normalised after the cast, so the outputs have unit norm in float32)."""
    return tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1)


def read_labels(path):
    """Class names from a text file, one per line (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        labels = [line.strip() for line in f if line.strip()]
    if not labels:
        raise ValueError(f"The labels file holds no labels. Received: path={path!r}")
    return labels


def _example_image_bytes(size=32):
    ramp = np.linspace(0, 255, size * size * 3).astype(np.uint8).reshape(size, size, 3)
    return tf.io.encode_jpeg(ramp).numpy()


def warmup_requests(model_name, signature_names):
    """One `PredictionLog` with a `PredictRequest` per signature, for TF Serving warm-up."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    image = tf.make_tensor_proto([_example_image_bytes()], dtype=tf.string)
    text = tf.make_tensor_proto(["a photo of a dog."], dtype=tf.string)
    inputs = {
        ENCODE_IMAGE: {IMAGE_BYTES: image},
        CLASSIFY: {IMAGE_BYTES: image},
        SERVING_DEFAULT: {IMAGE_BYTES: image},
        ENCODE_TEXT: {TEXTS: text},
        SIMILARITY: {IMAGE_BYTES: image, TEXTS: text},
    }
    logs = []
    for name in signature_names:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = name
        for key, proto in inputs[name].items():
            request.inputs[key].CopyFrom(proto)
        logs.append(
            prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
        )
    return logs


def models_config(model_name, base_path, num_versions=1):
    """TF Serving `ModelServerConfig` text proto serving the latest versions."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = model_name
    model.base_path = os.path.abspath(base_path)
    model.model_platform = "tensorflow"
    model.model_version_policy.latest.num_versions = num_versions
    return text_format.MessageToString(config)


def export_saved_model(model, export_base, version, class_names=None, templates=None,
                       model_name="clip", top_k=5, max_text_bytes=None,
                       overwrite=False, dtype=None):
    """Writes `<export_base>/<version>/` for TF Serving, plus its serving configs.

    The version is written into a hidden `<export_base>/.staging-*` folder and
    renamed to `<version>` only when complete (SavedModel and warm-up file), so a
    server polling `export_base` cannot load a half-written version, and an export
    that fails leaves no version folder behind.

    Args:
        model: a built `keras_clip.CLIP`.
        export_base: str, the model's base path (holds numbered versions).
        version: positive int.
        class_names: optional sequence of str; bakes a `classify` head in.
        templates: prompt templates for the class embeddings: a list of format
            strings, a `keras_clip.zero_shot_data` name (`"imagenet"`) or a file with
            one template per line. Defaults to `("a photo of a {}.",)`.
        model_name: str, the name in `models.config` and the warm-up requests.
        top_k: int, labels per image returned by `classify`.
        max_text_bytes: int, longest text the text signatures accept; None: the
            model's `preprocessor_config.max_text_bytes` (its preset's; 4096 by default).
        overwrite: bool, replace an existing version directory. The new version is
            written beside it and swapped in; the live folder is never written into.
        dtype: None (the model's own policy) or a Keras dtype policy name for the
            exported towers, e.g. `"bfloat16"`: weights stored in bf16 (half the size,
            the fast path on CPUs with AVX512-BF16/AMX, docs/speed.md). Signature
            inputs and outputs are unchanged: embeddings are float32 and unit-norm.

    Returns:
        str, the version directory written.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise ValueError(f"`version` must be a positive integer. Received: version={version!r}")
    version_dir = os.path.join(export_base, str(version))
    if tf.io.gfile.exists(version_dir) and not overwrite:
        raise FileExistsError(
            f"{version_dir} already exists; export a new version or pass overwrite=True."
        )
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"`dtype` must be one of {EXPORT_DTYPES} or None. Received: dtype={dtype!r}")
    if dtype is not None and dtype != model.dtype_policy.name:
        model = model.with_dtype(dtype)
    class_embeddings = None
    if class_names:
        templates = resolve_templates(templates)
        class_embeddings = build_class_embeddings(model, list(class_names), templates)
    module = CLIPServingModule(model, class_names, class_embeddings, top_k, max_text_bytes)
    signatures = module.signatures()

    # Everything is written into a hidden sibling folder first and renamed into place
    # only when complete, so a server polling `export_base` never sees a version
    # without its variables or warm-up file, and a failed export leaves nothing behind.
    tag = f"{version}-{uuid.uuid4().hex[:12]}"
    staging_dir = os.path.join(export_base, STAGING_PREFIX + tag)
    tf.io.gfile.makedirs(export_base)
    try:
        tf.saved_model.save(module, staging_dir, signatures=signatures)
        warmup_path = os.path.join(staging_dir, WARMUP_FILE)
        tf.io.gfile.makedirs(os.path.dirname(warmup_path))
        with tf.io.TFRecordWriter(warmup_path) as writer:
            for log in warmup_requests(model_name, sorted(signatures)):
                writer.write(log.SerializeToString())
        _swap_into_place(staging_dir, version_dir, os.path.join(export_base, RETIRED_PREFIX + tag))
    except BaseException:
        if tf.io.gfile.exists(staging_dir):
            tf.io.gfile.rmtree(staging_dir)
        raise
    _write_atomically(os.path.join(export_base, MODELS_CONFIG_FILE),
                      models_config(model_name, export_base))
    _write_atomically(os.path.join(export_base, BATCHING_FILE), BATCHING_PARAMETERS)
    logging.info(
        "Exported %s version %d to %s with signatures %s",
        model_name, version, version_dir, sorted(signatures),
    )
    return version_dir


def _swap_into_place(staging_dir, version_dir, retired_dir):
    """Renames the finished `staging_dir` to `version_dir`.

    An existing version folder is never written into: it is renamed away first, the
    new one renamed in, and only then the old one deleted. Between the two renames
    the version is briefly absent (a polling server may unload and reload it); it is
    never half-written. On a local file system each rename is atomic; on object
    stores (`gs://`, `s3://`) `tf.io.gfile.rename` copies, so there the new folder
    appears object by object.
    """
    if not tf.io.gfile.exists(version_dir):
        tf.io.gfile.rename(staging_dir, version_dir)
        return
    tf.io.gfile.rename(version_dir, retired_dir)
    try:
        tf.io.gfile.rename(staging_dir, version_dir)
    except BaseException:
        tf.io.gfile.rename(retired_dir, version_dir)  # put the old version back
        raise
    tf.io.gfile.rmtree(retired_dir)


def _write_atomically(path, text):
    """Writes `text` to a hidden sibling of `path`, then renames it over `path`."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}")
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)
