"""Train-time image augmentation: open_clip's RandomResizedCrop, in-graph.

open_clip's training transform for CLIP models is

    RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=BICUBIC)
    -> convert("RGB") -> ToTensor -> Normalize(OPENAI_MEAN, OPENAI_STD)

This module reproduces it with stateless TensorFlow ops, seeded per element, so
it runs in `tf.data.Dataset.map` with no Python in the per-example path and is
reproducible from a seed. Decoding and normalisation are the ones of
`keras_clip.preprocessing.image_preprocessor` (the serving path), so training and
serving share everything but the crop.

Deviations from torchvision/PIL:

* The crop box is drawn with torchvision's algorithm (`RandomResizedCrop.get_params`:
  10 attempts, then the central-crop fallback) but from TensorFlow's stateless
  random streams, so the boxes differ from torch's for the same seed.
* The resize is `tf.image.resize(method="bicubic", antialias=True)`, the same Keys
  (a = -0.5) kernel PIL uses, computed in float and rounded once to 8 bits. PIL
  rounds between its two passes, so about 10-20% of pixels differ from PIL by one
  level. The serving path (`CLIPImagePreprocessor`) is PIL-exact; at training
  time this noise is far below the augmentation itself.
"""

import math

import tensorflow as tf

from keras_clip.preprocessing.image_preprocessor import decode_image

DEFAULT_SCALE = (0.9, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)

# torchvision's `RandomResizedCrop.get_params` tries this many boxes before
# falling back to a central crop.
NUM_ATTEMPTS = 10


def _validate_range(name, value):
    if len(value) != 2 or not 0.0 < value[0] <= value[1]:
        raise ValueError(
            f"`{name}` must be two positive numbers (low, high) with low <= high. Received: {name}={value}"
        )


@tf.autograph.experimental.do_not_convert
def sample_crop_box(height, width, seed, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO):
    """Draws a RandomResizedCrop box with torchvision's algorithm, statelessly.

    Up to 10 candidate boxes are drawn at once: area `U(scale) * H * W`, aspect
    ratio `exp(U(log ratio))`, sides `round(sqrt(area * aspect))` and
    `round(sqrt(area / aspect))`; the first one that fits in the image is placed
    at a uniform integer offset. When none fits, the image is centre-cropped to
    the nearest allowed aspect ratio (the whole image when its own ratio is
    allowed).

    Args:
        height: int32 scalar, image height.
        width: int32 scalar, image width.
        seed: shape `(2,)` int32/int64 tensor, the stateless seed.
        scale: `(low, high)` range of the crop area as a fraction of the image.
        ratio: `(low, high)` range of the crop aspect ratio (width / height).

    Returns:
        int32 tensor `(4,)`: `(top, left, crop_height, crop_width)`.
    """
    _validate_range("scale", scale)
    _validate_range("ratio", ratio)
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=4)
    )
    area = tf.cast(height * width, tf.float64)
    target_area = area * tf.random.stateless_uniform(
        [NUM_ATTEMPTS], area_seed, scale[0], scale[1], dtype=tf.float64
    )  # (A,)
    log_ratio = tf.random.stateless_uniform(
        [NUM_ATTEMPTS], ratio_seed, math.log(ratio[0]), math.log(ratio[1]), dtype=tf.float64
    )
    aspect = tf.exp(log_ratio)  # (A,)
    widths = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)  # (A,)
    heights = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)  # (A,)
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    found = tf.reduce_any(fits)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

    # torchvision fallback: central crop clamped to the allowed aspect ratios.
    in_ratio = tf.cast(width, tf.float64) / tf.cast(height, tf.float64)
    narrow = in_ratio < ratio[0]
    wide = in_ratio > ratio[1]
    fallback_width = tf.where(
        wide, tf.cast(tf.round(tf.cast(height, tf.float64) * ratio[1]), tf.int32), width
    )
    fallback_height = tf.where(
        narrow, tf.cast(tf.round(tf.cast(width, tf.float64) / ratio[0]), tf.int32), height
    )

    crop_height = tf.where(found, tf.gather(heights, first), fallback_height)
    crop_width = tf.where(found, tf.gather(widths, first), fallback_width)
    # randint(0, n + 1) for a found box; (n // 2) for the fallback.
    random_top = tf.random.stateless_uniform(
        [], top_seed, 0, height - crop_height + 1, dtype=tf.int32
    )
    random_left = tf.random.stateless_uniform(
        [], left_seed, 0, width - crop_width + 1, dtype=tf.int32
    )
    top = tf.where(found, random_top, (height - crop_height) // 2)
    left = tf.where(found, random_left, (width - crop_width) // 2)
    return tf.stack([top, left, crop_height, crop_width])


@tf.autograph.experimental.do_not_convert
def random_resized_crop(image, image_size, seed, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO):
    """RandomResizedCrop of one image: crop a random box, resize it bicubically.

    Args:
        image: uint8 tensor `(H, W, 3)`.
        image_size: int, side of the square output.
        seed: shape `(2,)` int32/int64 tensor, the stateless seed.
        scale: `(low, high)` range of the crop area as a fraction of the image.
        ratio: `(low, high)` range of the crop aspect ratio (width / height).

    Returns:
        uint8 tensor `(image_size, image_size, 3)`.

    Example:

    >>> image = tf.zeros([300, 400, 3], tf.uint8)
    >>> random_resized_crop(image, 224, seed=[0, 1]).shape
    TensorShape([224, 224, 3])
    """
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"`image` must be uint8. Received: dtype={image.dtype.name}")
    if image.shape.rank != 3:
        raise ValueError(f"`image` must have shape (H, W, C). Received: shape={image.shape}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"`image_size` must be a positive integer. Received: image_size={image_size}")
    shape = tf.shape(image)
    box = sample_crop_box(shape[0], shape[1], seed, scale=scale, ratio=ratio)
    crop = tf.slice(image, [box[0], box[1], 0], [box[2], box[3], -1])  # (h, w, C)
    resized = tf.image.resize(
        tf.cast(crop, tf.float32), [image_size, image_size], method="bicubic", antialias=True
    )  # (S, S, C)
    resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
    return tf.ensure_shape(tf.cast(resized, tf.uint8), [image_size, image_size, image.shape[-1]])


@tf.autograph.experimental.do_not_convert
def train_transform(image_bytes, seed, preprocessor, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO):
    """open_clip's training transform on one encoded image.

    Decodes with the serving decoder (`image_preprocessor.decode_image`: PIL's
    JPEG IDCT, PIL's `convert("RGB")`), applies `random_resized_crop`, then
    normalises by calling `preprocessor` on the `image_size`-sized uint8 crop
    (no resize happens there), so the normalisation is the serving layer's own.

    Args:
        image_bytes: scalar `tf.string`, an encoded JPEG/PNG/GIF/BMP/WebP file.
        seed: shape `(2,)` int32/int64 tensor, the stateless seed.
        preprocessor: a `CLIPImagePreprocessor`; its `image_size`, `mean` and
            `std` are used.
        scale: `(low, high)` range of the crop area as a fraction of the image.
        ratio: `(low, high)` range of the crop aspect ratio (width / height).

    Returns:
        float32 tensor `(image_size, image_size, 3)`, normalised.

    Raises:
        tf.errors.InvalidArgumentError: at run time, when the bytes are not a
            decodable image.
    """
    pixels = decode_image(image_bytes, max_pixels=preprocessor.max_pixels)  # (H, W, 3) uint8
    crop = random_resized_crop(pixels, preprocessor.image_size, seed, scale=scale, ratio=ratio)
    return preprocessor(crop)  # (S, S, 3)
