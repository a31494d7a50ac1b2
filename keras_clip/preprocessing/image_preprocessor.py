"""CLIP image preprocessing as a Keras layer that reproduces OpenAI's PIL pipeline.

OpenAI's `clip._transform(n_px)` (and open_clip's `image_transform(n_px,
is_train=False)` for OpenAI models) is, on a PIL image:

    Resize(n_px, BICUBIC) -> CenterCrop(n_px) -> convert("RGB") -> ToTensor -> Normalize

This module does the same with TensorFlow core ops only (no `py_function`), so it
runs in `tf.function`, `tf.data` and SavedModels. It is built to agree with PIL
bit for bit rather than approximately. Its parts:

* `image_decode.py`: the format table, header reading and size limits (hostile
  input is refused before decoding), and the per-format decoders (JPEGs with
  libjpeg's ISLOW IDCT, as PIL; the PIL mode read from the header).
* `resampling.py`: PIL's two-pass 8-bit bicubic resize (NEAREST for palette and
  bilevel images, premultiplied alpha for RGBA) and torchvision's center crop.
* here: normalisation and the `CLIPImagePreprocessor` layer.

The two modules' names are re-exported here, where callers have always imported
them from.
"""

import functools

import keras
import numpy as np
import tensorflow as tf

from keras_clip.preprocessing.image_decode import (  # noqa: F401 (re-exported)
    _BMP,
    _BYTE_STRINGS,
    _FILL_WINDOW,
    _GIF,
    _GIF_STRIDE,
    _JPEG,
    _PNG,
    _WEBP,
    DEFAULT_MAX_PIXELS,
    FORMAT_SIGNATURES,
    MAX_GIF_STEPS,
    MAX_JPEG_SEGMENTS,
    SIGNATURE_LENGTH,
    SUPPORTED_FORMATS,
    _Bytes,
    _Limits,
    _bmp_size,
    _bytes_prefix,
    _check,
    _decode_bmp,
    _decode_gif,
    _decode_jpeg,
    _decode_png,
    _decode_rgba,
    _decode_webp,
    _detect_format,
    _gif_palette_is_identity,
    _gif_size,
    _gif_walk,
    _jpeg_walk,
    _png_size,
    _resized_size,
    _unlowered,
    _webp_size,
    _with_alpha,
    declared_size,
    decode_image,
    detect_format,
    validate_max_pixels,
)
from keras_clip.preprocessing.resampling import (  # noqa: F401 (re-exported)
    _PRECISION_BITS,
    RESAMPLE_BICUBIC,
    RESAMPLE_NEAREST,
    RESAMPLE_PREMULTIPLIED,
    _bicubic_coefficients,
    _bicubic_kernel,
    _center_crop,
    _nearest_indices,
    _premultiply,
    _resample_axis,
    _resize_and_center_crop_batch,
    _resize_bicubic,
    _resize_nearest,
    _shortest_side_size,
    _trunc,
    _unpremultiply,
    resize_and_center_crop,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------


class _GraphFunctions:
    """`tf.function`s of one Python function, one per input (dtype, rank).

    A plain (non-trackable) holder, so neither Keras nor `tf.saved_model` tries to
    serialise these eager-mode helpers with the layer. Batch and image sizes are
    left unknown in the signature, so they never cause a retrace.
    """

    def __init__(self, python_function):
        self._python_function = python_function
        self._functions = {}

    def __call__(self, inputs):
        rank = inputs.shape.rank
        # Pixels keep their (validated) channel count; all other sizes are free.
        if inputs.dtype == tf.string:
            shape = [None] * rank
        else:
            shape = [None] * (rank - 1) + [inputs.shape[-1]]
        key = (inputs.dtype, tuple(shape))
        if key not in self._functions:
            spec = tf.TensorSpec(shape, inputs.dtype)
            self._functions[key] = tf.function(self._python_function, input_signature=[spec])
        return self._functions[key](inputs)


def _preprocess_bytes(image_bytes, index, image_size, max_pixels):
    """One encoded image -> (image_size, image_size, 3) uint8."""
    rgba, mode = _decode_rgba(image_bytes, index, _Limits(max_pixels, image_size))
    return _resize_and_center_crop_batch(rgba[None], image_size, mode)[0]


@functools.lru_cache(maxsize=None)
def _per_image_function(image_size, max_pixels, with_index):
    """The traced `_preprocess_bytes` for one (image size, pixel limit), per process.

    The per-image graph (format detection, header walks, five decoders, resampling)
    is large. It is traced once per process and called, not inlined, by every graph
    that preprocesses encoded images with these settings (the batch `tf.map_fn` of
    each signature of an export, each `tf.data` map, every layer instance), and
    traced without AutoGraph: the code uses TensorFlow control flow explicitly, and
    the conversion only added tracing time (image_decode.py). Not tracked by Keras
    or `tf.saved_model`: a SavedModel stores the traced graph in its function library.
    """
    image_bytes = tf.TensorSpec([], tf.string)
    if with_index:
        return tf.function(
            lambda data, index: _preprocess_bytes(data, index, image_size, max_pixels),
            autograph=False, input_signature=[image_bytes, tf.TensorSpec([], tf.int32)])
    return tf.function(lambda data: _preprocess_bytes(data, None, image_size, max_pixels),
                       autograph=False, input_signature=[image_bytes])


@keras.saving.register_keras_serializable(package="keras_clip")
class CLIPImagePreprocessor(keras.layers.Layer):
    """CLIP image preprocessing: decode, resize, center crop, normalise.

    Reproduces OpenAI CLIP's `_transform(image_size)` (torchvision `Resize(BICUBIC)`
    on the shortest side, `CenterCrop`, `convert("RGB")`, `ToTensor`, `Normalize`)
    with TensorFlow core ops, so it runs eagerly, in `tf.function`, in
    `tf.data.Dataset.map` and in an exported SavedModel. Its output is bit-identical
    to that pipeline on JPEG, PNG (grey, RGB, palette, RGBA), GIF, BMP and WebP
    input (see the module docstring for how). Each encoded image is processed on
    its own (`tf.map_fn`), so a batch may mix sizes and formats.

    Known deviations from the PIL pipeline:

    * 16-bit greyscale PNGs are scaled to 8 bits (high byte); PIL's "I;16" ->
      "RGB" clips them to 255 instead.
    * CMYK JPEGs are converted to RGB before resizing (PIL resizes the CMYK
      channels, then converts); equal without a resize.
    * The first frame of a GIF is taken as TensorFlow decodes it: frames smaller
      than the logical screen may differ outside the frame. Animated WebP is not
      composited as PIL does.
    * Only uncompressed 8-, 24- and 32-bit BMPs (and 32-bit BGRA/BGRX
      bitfields) are accepted.
    * A PNG without its IEND chunk is rejected (PIL decodes it); truncated files
      are otherwise rejected by both, as PIL does without LOAD_TRUNCATED_IMAGES.
    * Images whose header declares more than `max_pixels` pixels, or that the
      resize to `image_size` would make larger than that, are rejected before
      decoding (PIL only warns from 89.5 million pixels). JPEGs with more than
      `MAX_JPEG_SEGMENTS` marker segments before the image data and GIFs with
      more than `MAX_GIF_STEPS` blocks and short sub-blocks before the end of
      the first frame are rejected too.

    Args:
        image_size: int, side of the square output (224 for ViT-B/32, 336 for
            ViT-L/14@336px).
        mean: 3 floats, per-channel mean subtracted after scaling to [0, 1].
        std: 3 positive floats, per-channel standard deviation divided by.
        max_pixels: positive int, most pixels (width x height) an encoded image
            may declare in its header, and may have once resized to
            `image_size` on its shortest side (before the center crop). Checked
            before anything is decoded, so a small file declaring a huge image
            (a decompression bomb) costs no memory. Default 50 million (a
            48-megapixel photo passes).
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`).

    Call arguments:
        inputs: `tf.string` of shape `(B,)` (or scalar) holding encoded JPEG,
            PNG, GIF, BMP or WebP files of any size and mode; or integer
            (uint8) pixels of shape `(B, H, W, 3)` or `(H, W, 3)`, any size.

    Returns:
        Normalised float tensor (the layer's compute dtype, float32 by default),
        channels last: `(B, image_size, image_size, 3)`, or
        `(image_size, image_size, 3)` for a scalar string or `(H, W, 3)` input.

    Raises:
        tf.errors.InvalidArgumentError: at run time, when some bytes are not an
            image; the message reads `image bytes at batch index <i> are not a
            decodable JPEG/PNG/GIF/BMP/WebP image: <reason>`; or when an image
            is too large: `image bytes at batch index <i> declare a <W>x<H>
            image (<N> pixels), more than the limit of <max_pixels> pixels
            (`max_pixels`)`.

    Example:

    >>> import numpy as np
    >>> preprocessor = CLIPImagePreprocessor(image_size=224)
    >>> pixels = np.zeros((2, 300, 400, 3), dtype="uint8")
    >>> preprocessor(pixels).shape
    TensorShape([2, 224, 224, 3])
    """

    def __init__(self, image_size=224, mean=OPENAI_MEAN, std=OPENAI_STD,
                 max_pixels=DEFAULT_MAX_PIXELS, **kwargs):
        super().__init__(**kwargs)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(
                f"`image_size` must be a positive integer. Received: image_size={image_size}"
            )
        mean = tuple(float(m) for m in mean)
        std = tuple(float(s) for s in std)
        if len(mean) != 3:
            raise ValueError(f"`mean` must have 3 values (R, G, B). Received: mean={mean}")
        if len(std) != 3 or min(std) <= 0.0:
            raise ValueError(f"`std` must have 3 positive values (R, G, B). Received: std={std}")
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.max_pixels = validate_max_pixels(max_pixels, image_size=image_size)
        # ToTensor then Normalize, in float32 and in torchvision's order:
        # ((level / 255) - mean) / std, for every level and channel.
        levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
        table = (levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        self._normalization_table = table.reshape(-1)  # (256 * 3,) float32
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self._graph_functions = _GraphFunctions(self._preprocess)
        self.built = True

    @tf.autograph.experimental.do_not_convert
    def is_too_large(self, image_bytes, check_resize=True, jpeg_header_reader="walk"):
        """Whether one encoded image's header declares a size over `max_pixels`.

        Decodes nothing. For input pipelines that drop and count such images
        instead of failing.

        Args:
            image_bytes: scalar `tf.string`.
            check_resize: bool, also check the size after the resize to
                `image_size` (what calling the layer does; False for a pipeline
                that crops before resizing).
            jpeg_header_reader: how a JPEG's size is read. `"walk"` (default):
                `declared_size`'s in-graph walk of the marker segments, which
                never raises (bytes whose size cannot be read give False;
                decoding them then enforces the limit). `"libjpeg"`: libjpeg's
                own header reader (`tf.io.extract_jpeg_shape`, what the decoder
                checks), several times cheaper per image, which raises
                `InvalidArgumentError` on a header libjpeg cannot read, as
                decoding would: for a pipeline stage that decodes next and
                counts decoding errors anyway.

        Returns:
            Scalar `tf.bool`.
        """
        if jpeg_header_reader not in ("walk", "libjpeg"):
            raise ValueError(
                '`jpeg_header_reader` must be "walk" or "libjpeg". '
                f"Received: jpeg_header_reader={jpeg_header_reader!r}"
            )
        if jpeg_header_reader == "libjpeg":
            image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
            is_jpeg = tf.equal(detect_format(image_bytes), _JPEG)

            def libjpeg():
                shape = tf.cast(tf.io.extract_jpeg_shape(image_bytes), tf.int64)
                return shape[0], shape[1]

            def walk():
                height, width, _ = declared_size(image_bytes)
                return height, width

            height, width = _unlowered(lambda: tf.cond(is_jpeg, libjpeg, walk))
        else:
            height, width, _ = declared_size(image_bytes)
        limits = _Limits(self.max_pixels, self.image_size if check_resize else None)
        return limits.exceeded(height, width)

    def _per_image(self, image_bytes, index=None):
        """One encoded image -> (image_size, image_size, 3) uint8 (one process-wide trace)."""
        function = _per_image_function(self.image_size, self.max_pixels, index is not None)
        return function(image_bytes) if index is None else function(image_bytes, index)

    def _normalize(self, pixels):
        # A lookup of the (level, channel) table: bit-identical to torchvision's
        # float32 ToTensor + Normalize whatever Grappler does to arithmetic.
        table = tf.constant(self._normalization_table)  # (256 * 3,)
        indices = 3 * tf.cast(pixels, tf.int32) + tf.range(3)  # (..., 3)
        return tf.cast(tf.gather(table, indices), self.compute_dtype)

    def _preprocess(self, inputs):
        if inputs.dtype != tf.string:
            return self._normalize(resize_and_center_crop(inputs, self.image_size))
        if inputs.shape.rank == 0:
            return self._normalize(self._per_image(inputs))
        indices = tf.range(tf.shape(inputs)[0])
        pixels = tf.map_fn(
            lambda args: self._per_image(args[0], args[1]),
            (inputs, indices),
            fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.uint8),
        )  # (B, image_size, image_size, 3)
        return self._normalize(pixels)

    def call(self, inputs):
        inputs = tf.convert_to_tensor(inputs)
        if inputs.dtype == tf.string:
            if inputs.shape.rank not in (0, 1, None):
                raise ValueError(
                    "Encoded images must be a scalar or a 1-D batch of strings. "
                    f"Received: shape={inputs.shape}"
                )
        elif not inputs.dtype.is_integer:
            raise ValueError(
                "Pixel inputs must be integer levels in [0, 255] (uint8); pass "
                f"encoded images as tf.string. Received: dtype={inputs.dtype.name}"
            )
        elif inputs.shape.rank not in (3, 4) or inputs.shape[-1] != 3:
            raise ValueError(
                "Pixel inputs must have shape (B, H, W, 3) or (H, W, 3). "
                f"Received: shape={inputs.shape}"
            )
        if tf.executing_eagerly():
            # Op-by-op execution of the per-image loops is ~10x slower, and a
            # failing assert inside an eager `map_fn` leaves TensorArray warnings.
            return self._graph_functions(inputs)
        return self._preprocess(inputs)

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) in (0, 3):
            return (self.image_size, self.image_size, 3)
        return (input_shape[0], self.image_size, self.image_size, 3)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_size": self.image_size,
                "mean": list(self.mean),
                "std": list(self.std),
                "max_pixels": self.max_pixels,
            }
        )
        return config
