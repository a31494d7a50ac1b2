"""Hostile images: decompression bombs and byte-by-byte header walks (issue 13, items 4-5).

Every file here is built in the test (struct, zlib, PIL). A file whose header
declares more than `max_pixels` pixels must be refused before anything is
decoded, with an InvalidArgumentError naming the declared size and the limit,
fast and without a large allocation; in training, such a record is dropped and
counted as `too_large`. Headers crafted to make the in-graph walks run once per
byte (0xFF fill in a JPEG, one-byte GIF sub-blocks) must be refused in bounded
time. Normal images still match PIL exactly.
"""
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_clip
from keras_clip.data import pipeline
from keras_clip.data import shards
from keras_clip.preprocessing.image_preprocessor import (
    DEFAULT_MAX_PIXELS,
    CLIPImagePreprocessor,
    declared_size,
    decode_image,
)
from tests.test_image_preprocessor import normalise, pil_pixels

# Generous bounds: the measured figures are in benchmarks/hostile_images.py.
MAX_REJECT_SECONDS = 2.0
MAX_RSS_GROWTH_MB = 300
LIMIT_MESSAGE = f"more than the limit of {DEFAULT_MAX_PIXELS} pixels (`max_pixels`)"


# ---------------------------------------------------------------------------
# Hostile files (also used by benchmarks/hostile_images.py)
# ---------------------------------------------------------------------------


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width=23000, height=23000, rows=None, block_bytes=8 << 20):
    """A solid black 8-bit RGB PNG: ~1.5 MB for 23000 x 23000 (1.6 GB of pixels).

    The zlib stream is complete and valid, built from one compressed block of
    rows repeated (after a full flush the compressor starts afresh, so equal
    input compresses to equal bytes) and the Adler-32 of all rows. With `rows`,
    only that many rows of data (fast; a size check reads the header only).
    """
    row = b"\0" * (1 + 3 * width)
    rows = height if rows is None else rows
    per_block = max(1, min(rows, block_bytes // len(row)))
    blocks, remainder = divmod(rows, per_block)
    block = row * per_block
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    last = compressor.compress(row * remainder) + compressor.flush()
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(row * remainder, adler)
    stream = first + repeated * (blocks - 1) + last[:-4] + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", stream)
            + _png_chunk(b"IEND", b""))


def jpeg_declaring(width, height):
    """A valid 16x16 baseline JPEG whose SOF0 is patched to declare width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_declaring(width=65535, height=65535):
    """A GIF whose logical screen and first frame declare width x height (GIF's maximum)."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + descriptor + b"\x02\x02\x4c\x01\x00" + b"\x3b"


def bmp_declaring(width=60000, height=60000):
    """A 24-bit BMP header declaring width x height, with 16 bytes of pixels."""
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + header + b"\0" * 16


def webp_declaring(width=16384, height=16384):
    """An extended (VP8X) WebP whose canvas is width x height."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + (
        height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + b"VP8 " + struct.pack("<I", 10) + b"\0" * 10
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg_fill(size=8 << 20):
    """`FF D8 FF` and 0xFF fill bytes (the issue's 8 MB request)."""
    return b"\xff\xd8\xff" + b"\xff" * (size - 3)


def jpeg_header_then_fill(size=8 << 20):
    """A real JPEG's header, then 0xFF fill before its SOS, and no EOI: the walk must cross the fill."""
    data = photo_bytes("JPEG", 32, 24)
    sos = data.index(b"\xff\xda")
    return data[:sos] + b"\xff" * (size - len(data)) + data[sos:-2]


def jpeg_marker_flood(size=8 << 20):
    """SOI and then standalone markers (FF 01) only: one walk step per 2 bytes."""
    return b"\xff\xd8" + b"\xff\x01" * ((size - 2) // 2)


def gif_sub_block_flood(size=8 << 20):
    """A comment extension made of one-byte sub-blocks: one walk step per 2 bytes."""
    screen = struct.pack("<HHBBB", 1, 1, 0, 0, 0)
    return b"GIF89a" + screen + b"\x21\xfe" + b"\x01a" * ((size - 20) // 2) + b"\x00\x3b"


def photo_bytes(fmt, width, height, seed=0, **save_kwargs):
    """A smooth random photo-like image, encoded."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    if fmt in ("GIF", "P"):
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, "PNG" if fmt == "P" else fmt, **save_kwargs)
    return buffer.getvalue()


def expected_message(width, height, index=0):
    return (f"image bytes at batch index {index} declare a {width}x{height} image "
            f"({width * height} pixels), {LIMIT_MESSAGE}")


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer(good_images):
    """The layer, traced already (tracing takes seconds): tests time the run only."""
    layer = CLIPImagePreprocessor(image_size=64)
    layer(tf.constant([good_images["jpeg"]]))
    return layer


@pytest.fixture(scope="module")
def good_images():
    """One normal image per format and mode, 80x60 (resized to 64 by the layer)."""
    return {
        "jpeg": photo_bytes("JPEG", 80, 60, quality=90),
        "jpeg_progressive_exif": photo_bytes("JPEG", 80, 60, progressive=True, exif=b"Exif\0\0" + b"\0" * 64),
        "png": photo_bytes("PNG", 80, 60),
        "png_palette": photo_bytes("P", 80, 60),
        "gif": photo_bytes("GIF", 80, 60),
        "gif_animated_with_comment": _animated_gif(),
        "bmp": photo_bytes("BMP", 80, 60),
        "webp": photo_bytes("WEBP", 80, 60, lossless=True),
    }


def _animated_gif():
    frames = [Image.open(io.BytesIO(photo_bytes("GIF", 80, 60, seed=s))) for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], comment=b"x" * 600, loop=0)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Decompression bombs: refused before decoding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, data, width, height",
    [
        ("png", png_bomb(rows=64), 23000, 23000),
        ("jpeg", jpeg_declaring(60000, 60000), 60000, 60000),
        ("gif", gif_declaring(), 65535, 65535),
        ("bmp", bmp_declaring(), 60000, 60000),
        ("webp", webp_declaring(), 16384, 16384),
    ],
)
def test_oversized_header_is_refused_naming_size_and_limit(layer, good_images, name, data, width, height):
    batch = tf.constant([good_images["jpeg"], good_images["png"], data])
    start = time.perf_counter()
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(expected_message(width, height, 2))):
        layer(batch)
    assert time.perf_counter() - start < MAX_REJECT_SECONDS
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(
        f"image bytes declare a {width}x{height} image ({width * height} pixels), {LIMIT_MESSAGE}"
    )):
        decode_image(tf.constant(data))


def test_declared_size_reads_every_header(good_images):
    for name, data in good_images.items():
        height, width, known = declared_size(tf.constant(data))
        assert (int(width), int(height), bool(known)) == (80, 60, True), name
    for data, size in [(png_bomb(rows=1), (23000, 23000)), (jpeg_declaring(60000, 50000), (60000, 50000)),
                       (gif_declaring(), (65535, 65535)), (bmp_declaring(), (60000, 60000)),
                       (webp_declaring(), (16384, 16384))]:
        height, width, known = declared_size(tf.constant(data))
        assert (int(width), int(height), bool(known)) == (*size, True)
    height, width, known = declared_size(tf.constant(b"not an image"))
    assert (int(width), int(height), bool(known)) == (0, 0, False)


def test_thin_image_is_refused_by_its_size_after_the_resize(layer):
    # 20000 x 1 is 20000 pixels, but the shortest side to 64 makes it 1280000 x 64.
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(
        "image bytes at batch index 0 declare a 20000x1 image, which resizing to a shortest side "
        f"of 64 makes 1280000x64 (81920000 pixels), {LIMIT_MESSAGE}"
    )):
        layer(tf.constant([png_bomb(width=20000, height=1)]))


_RSS_SCRIPT = r"""
import json, resource, sys, time
import tensorflow as tf
from tests.test_image_hostile import png_bomb, photo_bytes
from keras_clip.preprocessing.image_preprocessor import CLIPImagePreprocessor

layer = CLIPImagePreprocessor(image_size=64)
layer(tf.constant([photo_bytes("PNG", 80, 60)]))  # trace and warm up
bomb = tf.constant([png_bomb()])
# A safety net for the run before the fix: allocations past 4 GB more fail.
_, hard = resource.getrlimit(resource.RLIMIT_DATA)
with open("/proc/self/status") as f:
    data_kb = [int(line.split()[1]) for line in f if line.startswith("VmData")][0]
resource.setrlimit(resource.RLIMIT_DATA, (data_kb * 1024 + (4 << 30), hard))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    layer(bomb)
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {getattr(e, 'message', str(e))}"
seconds = time.perf_counter() - start
growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"error": error, "seconds": seconds, "rss_growth_mb": growth_mb}))
"""


def test_png_bomb_costs_no_memory_in_a_fresh_process():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"].startswith("InvalidArgumentError"), report
    assert expected_message(23000, 23000) in report["error"]
    assert report["seconds"] < MAX_REJECT_SECONDS, report
    assert report["rss_growth_mb"] < MAX_RSS_GROWTH_MB, report


# ---------------------------------------------------------------------------
# Byte-by-byte walks: bounded by segments and blocks
# ---------------------------------------------------------------------------

_WALK_CASES = [
    ("jpeg_fill", jpeg_fill, "truncated JPEG (no end-of-image marker after the image data)"),
    ("jpeg_header_then_fill", jpeg_header_then_fill,
     "truncated JPEG (no end-of-image marker after the image data)"),
    ("jpeg_marker_flood", jpeg_marker_flood, "JPEG with more than 1024 marker segments before the image data"),
    ("gif_sub_block_flood", gif_sub_block_flood,
     "GIF with more than 1024 blocks and sub-blocks before the end of its first frame"),
]


@pytest.mark.parametrize("name, make, reason", _WALK_CASES, ids=[c[0] for c in _WALK_CASES])
def test_8mb_walk_bomb_is_refused_quickly(layer, good_images, name, make, reason):
    data = make()
    assert len(data) >= (8 << 20) - 32
    start = time.perf_counter()
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(
        f"image bytes at batch index 0 are not a decodable JPEG/PNG/GIF/BMP/WebP image: {reason}"
    )):
        layer(tf.constant([data]))
    assert time.perf_counter() - start < MAX_REJECT_SECONDS


def test_fill_bytes_between_jpeg_segments_still_decode(layer):
    # Fill bytes before a marker are legal; libjpeg and PIL skip them.
    data = photo_bytes("JPEG", 80, 60)
    dqt = data.index(b"\xff\xdb")
    filled = data[:dqt] + b"\xff" * 100_000 + data[dqt:-2]  # and no EOI: the walk runs
    ours = layer(tf.constant([filled + b"\xff\xd9"])).numpy()
    np.testing.assert_array_equal(ours[0], normalise(pil_pixels(data, 64)))


# ---------------------------------------------------------------------------
# Normal images: unchanged
# ---------------------------------------------------------------------------


def test_normal_images_still_match_pil_exactly(layer, good_images):
    names = sorted(good_images)
    ours = layer(tf.constant([good_images[n] for n in names])).numpy()
    for name, image in zip(names, ours):
        np.testing.assert_array_equal(image, normalise(pil_pixels(good_images[name], 64)), err_msg=name)


# ---------------------------------------------------------------------------
# The limit: configurable, serialised, in presets and exports
# ---------------------------------------------------------------------------


def test_limit_is_configurable(good_images):
    layer = CLIPImagePreprocessor(image_size=32, max_pixels=80 * 60 - 1)
    smaller = photo_bytes("PNG", 60, 45)
    expected = normalise(pil_pixels(smaller, 32))
    np.testing.assert_array_equal(layer(tf.constant([smaller])).numpy()[0], expected)
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(
        "image bytes at batch index 1 declare a 80x60 image (4800 pixels), "
        "more than the limit of 4799 pixels (`max_pixels`)"
    )):
        layer(tf.constant([smaller, good_images["png"]]))


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "10"])
def test_invalid_limit_is_rejected(value):
    with pytest.raises(ValueError, match=re.escape(
        f"`max_pixels` must be a positive integer. Received: max_pixels={value!r}"
    )):
        CLIPImagePreprocessor(max_pixels=value)


def test_limit_below_the_output_size_is_rejected():
    with pytest.raises(ValueError, match=re.escape(
        "`max_pixels` must be at least image_size ** 2 = 50176. Received: max_pixels=50175"
    )):
        CLIPImagePreprocessor(image_size=224, max_pixels=50175)


def test_limit_round_trips_through_get_config():
    layer = CLIPImagePreprocessor(image_size=32, max_pixels=4799, name="pre")
    assert layer.get_config()["max_pixels"] == 4799
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert (restored.image_size, restored.max_pixels, restored.name) == (32, 4799, "pre")


def _tiny_clip(**kwargs):
    keras.utils.set_random_seed(0)
    return keras_clip.CLIP(
        embed_dim=32, image_size=32, vision_num_layers=1, vision_hidden_dim=32, vision_num_heads=2,
        vision_patch_size=16, context_length=16, text_hidden_dim=32, text_num_layers=1,
        text_num_heads=2, **kwargs,
    )


def test_limit_round_trips_through_preset(tmp_path):
    model = _tiny_clip(max_image_pixels=123_456)
    assert model.image_preprocessor().max_pixels == 123_456
    model.save_to_preset(str(tmp_path / "preset"))
    with open(tmp_path / "preset" / "config.json") as f:
        config = json.load(f)
    assert config["config"]["max_image_pixels"] == 123_456
    assert config["preprocessing"]["max_image_pixels"] == 123_456
    restored = keras_clip.CLIP.from_preset(str(tmp_path / "preset"))
    assert restored.max_image_pixels == 123_456
    assert restored.image_preprocessor().max_pixels == 123_456
    assert keras_clip.CLIP.from_preset(str(tmp_path / "preset"), max_image_pixels=5000).max_image_pixels == 5000
    assert _tiny_clip().image_preprocessor().max_pixels == DEFAULT_MAX_PIXELS
    with pytest.raises(ValueError, match=re.escape(
        "`max_image_pixels` must be a positive integer. Received: max_image_pixels=0"
    )):
        _tiny_clip(max_image_pixels=0)


def test_export_refuses_bomb_and_then_serves_the_same_embedding(tmp_path, good_images):
    from keras_clip.export import saved_model as export_lib

    model = _tiny_clip(max_image_pixels=1_000_000)
    version_dir = export_lib.export_saved_model(model, str(tmp_path / "clip"), 1, class_names=["cat", "dog"])
    loaded = tf.saved_model.load(version_dir)
    encode = loaded.signatures["encode_image"]
    good = tf.constant([good_images["jpeg"], good_images["png"]])
    before = encode(image_bytes=good)["image_embeddings"].numpy()
    assert int(loaded.max_image_pixels.numpy()) == 1_000_000
    start = time.perf_counter()
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(
        "image bytes at batch index 1 declare a 23000x23000 image (529000000 pixels), "
        "more than the limit of 1000000 pixels (`max_pixels`)"
    )):
        encode(image_bytes=tf.constant([good_images["jpeg"], png_bomb(rows=64)]))
    assert time.perf_counter() - start < MAX_REJECT_SECONDS
    after = encode(image_bytes=good)["image_embeddings"].numpy()
    np.testing.assert_array_equal(after, before)
    expected = model.encode_image(model.image_preprocessor()(good)).numpy()
    np.testing.assert_allclose(after, expected, atol=1e-5)


# ---------------------------------------------------------------------------
# Training: dropped and counted
# ---------------------------------------------------------------------------


def test_training_drops_and_counts_an_oversized_png(tmp_path):
    good = [(f"good{i}", photo_bytes("JPEG", 80, 60, seed=i), [f"photo number {i} ."]) for i in range(5)]
    examples = good[:2] + [("bomb", png_bomb(rows=64), ["a huge black square ."])] + good[2:]
    paths = shards.write_shards(examples, str(tmp_path), examples_per_shard=3)
    counters = pipeline.PipelineCounters()
    dataset = pipeline.tfrecord_dataset(paths, batch_size=1, image_size=32, context_length=16, seed=0,
                                        counters=counters, return_keys=True)
    keys = sorted(key for batch in dataset for key in batch["keys"].numpy())
    assert keys == sorted(key.encode() for key, _, _ in good)
    assert counters.as_dict() == {
        "records_read": 6, "empty_captions": 0, "not_images": 0, "too_large": 1, "decode_failures": 0,
        "examples_out": 5,
    }
