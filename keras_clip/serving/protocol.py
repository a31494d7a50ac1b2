"""The serving protocol in one place: signature and tensor names, and the limits.

`keras_clip.export` writes SavedModels with these names, `keras_clip.serving.client`
sends them and `keras_clip.serving.local_server` checks requests against these limits.
Nothing here imports TensorFlow.
"""

# -- signatures ------------------------------------------------------------------
ENCODE_IMAGE = "encode_image"
ENCODE_TEXT = "encode_text"
CLASSIFY = "classify"
SIMILARITY = "similarity"
SERVING_DEFAULT = "serving_default"

# -- input tensors -------------------------------------------------------------------
IMAGE_BYTES = "image_bytes"
TEXTS = "texts"

# -- output tensors ------------------------------------------------------------------
IMAGE_EMBEDDINGS = "image_embeddings"
TEXT_EMBEDDINGS = "text_embeddings"
SCORES = "scores"
TOP_LABELS = "top_labels"
TOP_SCORES = "top_scores"
LOGITS_PER_IMAGE = "logits_per_image"

# -- limits (all overridable: server flags, client and export arguments) ---------------
# Largest gRPC message either side sends or accepts (`--max_message_bytes`).
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
# Most elements the local server accepts in one input tensor (`--max_batch_size`).
DEFAULT_MAX_BATCH_SIZE = 1024
# Predict requests allowed to wait for a free TensorFlow slot (`--max_queue_size`);
# one more gets UNAVAILABLE.
DEFAULT_MAX_QUEUE_SIZE = 16
# TensorFlow calls the local server runs at once (`--max_concurrent_calls`).
DEFAULT_MAX_CONCURRENT_CALLS = 2
# Items the client puts in one request; equals `max_batch_size` in the
# `batching_parameters.txt` that the export writes for TF Serving.
DEFAULT_CLIENT_BATCH_SIZE = 64
# Longest text (UTF-8 bytes) the exported text signatures accept.
DEFAULT_MAX_TEXT_BYTES = 4096
