"""Parity of `CLIPImagePreprocessor` with OpenAI's PIL preprocessing pipeline.

The reference is OpenAI CLIP's `_transform(n_px)` written with PIL and numpy:
shortest side to `n_px` with PIL's bicubic resize (torchvision's size arithmetic),
torchvision's center crop, `convert("RGB")` after the crop, `/ 255`, normalise.
`test_pil_reference_matches_open_clip_transform` checks that reference against
open_clip's own `image_transform`.

Tolerance: none. Measured with `benchmarks/preprocess_parity.py` on 500 Flickr8k
photos (image_size 224 and 336) and 500 CIFAR-10 images (32 -> 224), and here on
160/288 and every format below: 0 differing values, in 0-255 levels and in
normalised units. That is by construction, not luck: JPEGs are decoded with
the same libjpeg ISLOW IDCT as PIL, PIL's fixed-point two-pass resampler is
re-implemented exactly, and normalisation is a table computed in float32 in
torchvision's operation order. Any non-zero difference is a regression (for
scale: `tf.image.resize(..., "bicubic", antialias=True)`, the obvious
alternative, differs from PIL on 16% (CIFAR 32->224) to 23% (Flickr 224->336)
of values, mostly by 1 level, at most by 16).
"""
import io
import re
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras
from tests import harness
from keras_clip.preprocessing.image_preprocessor import (
    CLIPImagePreprocessor,
    decode_image,
    resize_and_center_crop,
)

# Largest allowed |ours - PIL| (see the module docstring for the measurement).
MAX_LEVEL_DIFF = 0  # 0-255 pixel levels, before normalisation
MAX_NORMALISED_DIFF = 0.0  # after ToTensor + Normalize


# Reference: OpenAI's transform with PIL + numpy, from the shared harness
pil_pixels = harness.pil_resize_and_crop
normalise = harness.normalise
to_levels = harness.to_levels


def assert_matches_pil(ours, encoded, image_size):
    """Compares a batch of layer outputs with the PIL reference, with statistics."""
    reference = np.stack([pil_pixels(b, image_size) for b in encoded]).astype(np.int64)
    level_diff = np.abs(to_levels(ours) - reference)
    normalised_diff = np.abs(ours - normalise(reference))
    stats = (
        f"levels: max {level_diff.max()}, mean {level_diff.mean():.2e}, "
        f"fraction differing {np.mean(level_diff > 0):.2e}; "
        f"normalised: max {normalised_diff.max():.2e}"
    )
    assert level_diff.max() <= MAX_LEVEL_DIFF, stats
    assert normalised_diff.max() <= MAX_NORMALISED_DIFF, stats


encode = harness.encode


def bmp_bgra_bitfields(rgba):
    """32-bit BMP, BITMAPV4HEADER, BI_BITFIELDS with BGRA masks (PIL opens it as RGBA)."""
    pixels = np.asarray(rgba)[::-1][..., [2, 1, 0, 3]].tobytes()  # bottom-up BGRA
    width, height = rgba.size
    header = struct.pack(
        "<IiiHHIIiiII", 108, width, height, 1, 32, 3, len(pixels), 2835, 2835, 0, 0
    )
    header += struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000) + b"BGRs" + bytes(48)
    return b"BM" + struct.pack("<IHHI", 14 + 108 + len(pixels), 0, 0, 14 + 108) + header + pixels


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flickr_bytes(flickr8k_dir):
    """24 Flickr8k JPEGs (224x224), spread over the sorted file list."""
    paths = sorted((flickr8k_dir / "images").glob("*.jpg"))
    return [p.read_bytes() for p in paths[:: len(paths) // 24][:24]]


@pytest.fixture(scope="module")
def photo(flickr_bytes):
    return Image.open(io.BytesIO(flickr_bytes[0])).convert("RGB")


@pytest.fixture(scope="module")
def graph_call_224(layers):
    """The 224 layer as a graph function over a batch of strings."""
    return tf.function(layers(224).call, input_signature=[tf.TensorSpec([None], tf.string)])


@pytest.fixture(scope="module")
def layers():
    """One layer per image size, shared so each traces once."""
    cache = {}

    def get(image_size):
        if image_size not in cache:
            cache[image_size] = CLIPImagePreprocessor(image_size=image_size)
        return cache[image_size]

    return get


# ---------------------------------------------------------------------------
# Parity with PIL
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [224, 288, 336, 160])
def test_flickr8k_jpegs_match_pil_pipeline(layers, flickr_bytes, image_size):
    # 224: resize is a no-op (decode + crop + normalise only); 288/336 upscale;
    # 160 downscales (kernel support widened by 1.4x).
    ours = layers(image_size)(tf.constant(flickr_bytes)).numpy()
    assert ours.shape == (len(flickr_bytes), image_size, image_size, 3)
    assert_matches_pil(ours, flickr_bytes, image_size)


def test_non_square_images_match_pil_shortest_side_and_center_crop(layers, photo, tmp_path):
    # Landscape, portrait, an odd-sized crop (odd margins exercise round-half-even
    # in the crop offset) and a near-square one (long side 224 * 224 / 223).
    boxes = [(0, 0, 224, 150), (50, 0, 170, 224), (7, 3, 204, 40), (0, 0, 224, 223)]
    encoded = []
    for i, box in enumerate(boxes):
        for fmt in ("PNG", "JPEG"):
            path = tmp_path / f"crop{i}.{fmt.lower()}"
            photo.crop(box).save(path, fmt, quality=90)
            encoded.append(path.read_bytes())
    for image_size in (224, 160):
        ours = layers(image_size)(tf.constant(encoded)).numpy()
        assert_matches_pil(ours, encoded, image_size)


def test_cifar10_jpegs_upscaled_to_224_match_pil(cifar10_dir):
    cifar10 = cifar10_dir
    classes = (cifar10 / "classes.txt").read_text().split()
    paths = [cifar10 / "images" / name / f"{i:04d}.jpg" for name in classes for i in range(4)]
    encoded = [p.read_bytes() for p in paths]  # 40 images, 32x32 -> 224x224 (7x)
    ours = CLIPImagePreprocessor(image_size=224)(tf.constant(encoded)).numpy()
    assert_matches_pil(ours, encoded, 224)


def test_formats_and_modes_match_pil_resize_then_convert(layers, photo):
    # OpenAI converts to RGB *after* resizing, so the PIL mode matters: "P" and
    # "1" are resized with NEAREST, "RGBA"/"LA" on premultiplied alpha (but not
    # when the size is unchanged: PIL then returns a copy).
    rgb = photo.crop((0, 0, 224, 150))  # resized to 331x224 then cropped
    grey = rgb.convert("L")
    alpha = np.asarray(Image.open(io.BytesIO(encode(rgb.rotate(90), "PNG"))).convert("L")).copy()
    alpha[:10] = 0  # fully transparent rows keep their colour in PIL's unpremultiply
    alpha[10:20] = 255
    alpha = Image.fromarray(alpha)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=100)
    second_frame = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    rgba = Image.merge("RGBA", (*rgb.split(), alpha))
    square_rgba = Image.merge("RGBA", (*photo.split(), photo.convert("L")))  # no resize
    cases = {
        "PNG RGB": (encode(rgb, "PNG"), "RGB"),
        "BMP 24-bit": (encode(rgb, "BMP"), "RGB"),
        "GIF 2 frames": (encode(rgb, "GIF", save_all=True, append_images=[second_frame]), "P"),
        "GIF transparent index": (encode(palette, "GIF", transparency=3), "P"),
        "GIF grey ramp": (encode(grey, "GIF"), "L"),
        "PNG grey": (encode(grey, "PNG"), "L"),
        "PNG RGBA": (encode(rgba, "PNG"), "RGBA"),
        "PNG RGBA 224x224": (encode(square_rgba, "PNG"), "RGBA"),
        "PNG LA": (encode(Image.merge("LA", (grey, alpha)), "PNG"), "LA"),
        "PNG palette": (encode(palette, "PNG"), "P"),
        "PNG palette + tRNS": (encode(palette, "PNG", transparency=3), "P"),
        "PNG 1-bit": (encode(rgb.convert("1"), "PNG"), "1"),
        "BMP 8-bit palette": (encode(palette, "BMP"), "P"),
        "BMP 32-bit BGRA bitfields": (bmp_bgra_bitfields(rgba), "RGBA"),
        "JPEG grey": (encode(grey, "JPEG"), "L"),
        "WebP": (encode(rgb, "WEBP"), "RGB"),
        "WebP RGBA lossless": (encode(rgba, "WEBP", lossless=True), "RGBA"),
    }
    for name, (data, mode) in cases.items():
        assert Image.open(io.BytesIO(data)).mode == mode, name
    encoded = [data for data, _ in cases.values()]
    ours = layers(224)(tf.constant(encoded)).numpy()
    for name, data, output in zip(cases, encoded, ours):
        reference = pil_pixels(data, 224).astype(np.int64)
        level_diff = np.abs(to_levels(output) - reference)
        assert level_diff.max() <= MAX_LEVEL_DIFF, f"{name}: max level diff {level_diff.max()}"
        assert np.abs(output - normalise(reference)).max() <= MAX_NORMALISED_DIFF, name


def test_decode_image_matches_pil_convert_rgb(photo):
    rgba = Image.merge("RGBA", (*photo.split(), photo.convert("L")))
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    files = [encode(photo, "JPEG"), encode(rgba, "PNG"), encode(palette, "GIF", transparency=0)]
    for data in files:
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(decode_image(tf.constant(data)).numpy(), expected)


def test_resize_and_center_crop_matches_pil_on_noise():
    # Random pixels make every output value depend on the exact kernel weights,
    # rounding and clipping; the 1000x700 case downscales 3.1x (support ~12 px).
    rng = np.random.default_rng(0)
    cases = [(37, 53, 64), (1000, 700, 224), (31, 300, 224), (225, 224, 224)]
    for height, width, image_size in cases:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = pil_pixels(Image.fromarray(pixels), image_size)
        np.testing.assert_array_equal(resize_and_center_crop(pixels, image_size).numpy(), expected)
        # PIL's NEAREST (what it uses for palette images) on the same pixels.
        expected = pil_pixels(Image.fromarray(pixels), image_size, Image.Resampling.NEAREST)
        ours = resize_and_center_crop(pixels, image_size, resample="nearest")
        np.testing.assert_array_equal(ours.numpy(), expected)


def test_pil_reference_matches_open_clip_transform(layers, flickr_bytes, photo):
    from tests.reference import import_open_clip

    open_clip = import_open_clip()  # a test dependency: fail, never skip, if it is missing
    transform = open_clip.image_transform(160, is_train=False)
    palette = photo.crop((0, 0, 224, 150)).convert("P", palette=Image.Palette.ADAPTIVE, colors=50)
    encoded = [flickr_bytes[1], encode(photo.crop((0, 0, 120, 224)), "PNG"), encode(palette, "PNG")]
    expected = np.stack(
        [transform(Image.open(io.BytesIO(b))).numpy().transpose(1, 2, 0) for b in encoded]
    )
    ours = layers(160)(tf.constant(encoded)).numpy()
    np.testing.assert_array_equal(ours, expected)
    reference = np.stack([normalise(pil_pixels(b, 160)) for b in encoded])
    np.testing.assert_array_equal(expected, reference)


# ---------------------------------------------------------------------------
# Inputs, errors
# ---------------------------------------------------------------------------


def test_uint8_pixels_give_the_same_output_as_encoded_bytes(layers, photo):
    crops = [photo.crop((i, 0, i + 150, 224)) for i in (0, 37, 74)]  # portrait 150x224
    encoded = [encode(c, "PNG") for c in crops]
    pixels = np.stack([np.asarray(c) for c in crops])  # (3, 224, 150, 3)
    layer = layers(224)
    from_bytes = layer(tf.constant(encoded)).numpy()
    np.testing.assert_array_equal(layer(pixels).numpy(), from_bytes)
    np.testing.assert_array_equal(layer(pixels[1]).numpy(), from_bytes[1])  # unbatched
    np.testing.assert_array_equal(layer(tf.constant(encoded[2])).numpy(), from_bytes[2])  # scalar


def test_float_pixels_are_rejected():
    with pytest.raises(ValueError, match="integer levels"):
        CLIPImagePreprocessor()(np.zeros((1, 8, 8, 3), np.float32))


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b"hello", "unrecognised file signature (5 bytes)"),
        (b"", "unrecognised file signature (0 bytes)"),
        ("truncated_jpeg", "truncated JPEG"),
        ("jpeg_without_eoi", "truncated JPEG"),
        ("truncated_png", "truncated PNG"),
    ],
)
def test_bad_bytes_raise_error_naming_batch_index_and_problem(
    layers, graph_call_224, flickr_bytes, photo, bad, reason
):
    jpeg = flickr_bytes[2]
    bad = {
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "jpeg_without_eoi": jpeg[:-2],  # PIL also rejects this ("image file is truncated")
        "truncated_png": encode(photo, "PNG")[:5000],
    }.get(bad, bad)
    batch = tf.constant(flickr_bytes[:2] + [bad] + flickr_bytes[3:4])
    expected = re.escape(
        f"image bytes at batch index 2 are not a decodable JPEG/PNG/GIF/BMP/WebP image: {reason}"
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
        layers(224)(batch)  # eager
    with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
        graph_call_224(batch)


def test_decode_image_error_names_the_problem():
    with pytest.raises(tf.errors.InvalidArgumentError, match="image bytes are not a decodable"):
        decode_image(tf.constant(b"GIF89a"))


# ---------------------------------------------------------------------------
# Graph, tf.data, SavedModel, config
# ---------------------------------------------------------------------------


def test_runs_in_tf_data_map_batched_and_per_element(layers, flickr_bytes):
    layer = layers(224)
    expected = layer(tf.constant(flickr_bytes[:6])).numpy()
    files = tf.data.Dataset.from_tensor_slices(flickr_bytes[:6])
    batched = np.concatenate(list(files.batch(4).map(layer).as_numpy_iterator()))
    per_element = np.concatenate(list(files.map(layer).batch(4).as_numpy_iterator()))
    np.testing.assert_array_equal(batched, expected)
    np.testing.assert_array_equal(per_element, expected)


def test_saved_model_round_trip_matches_in_memory_layer(layers, flickr_bytes, photo, tmp_path):
    layer = layers(160)
    archive = keras.export.ExportArchive()
    archive.track(layer)
    archive.add_endpoint("serve", layer.call, input_signature=[tf.TensorSpec([None], tf.string)])
    archive.write_out(str(tmp_path / "preprocessor"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "preprocessor"))
    mixed = tf.constant(flickr_bytes[:2] + [encode(photo.crop((0, 0, 100, 224)), "PNG")])
    np.testing.assert_array_equal(reloaded.serve(mixed).numpy(), layer(mixed).numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch index 1 are not a decodable"):
        reloaded.serve(tf.constant([flickr_bytes[0], b"nope"]))


def test_config_round_trip_keeps_every_argument(flickr_bytes):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    layer = CLIPImagePreprocessor(image_size=96, mean=mean, std=std, name="pre")
    config = layer.get_config()
    assert (config["image_size"], tuple(config["mean"]), tuple(config["std"])) == (96, mean, std)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, CLIPImagePreprocessor)
    restored_args = (restored.image_size, restored.mean, restored.std, restored.name)
    assert restored_args == (96, mean, std, "pre")
    ours = restored(tf.constant(flickr_bytes[:2])).numpy()
    expected = np.stack([normalise(pil_pixels(b, 96), mean, std) for b in flickr_bytes[:2]])
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 0}, "`image_size` must be a positive integer"),
        ({"mean": (0.5, 0.5)}, "`mean` must have 3 values"),
        ({"std": (0.5, 0.0, 0.5)}, "`std` must have 3 positive values"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CLIPImagePreprocessor(**kwargs)
