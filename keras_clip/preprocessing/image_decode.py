"""Decoding encoded images in-graph, the way PIL opens them (TensorFlow core ops only).

Part of `CLIPImagePreprocessor` (`image_preprocessor.py`, which re-exports these
names); resizing is in `resampling.py`.

* JPEGs are decoded with libjpeg's ISLOW IDCT (`dct_method="INTEGER_ACCURATE"`),
  the one PIL uses; TensorFlow's default IDCT differs by up to 4 levels.
* PIL picks the resize filter from the image mode, and OpenAI's pipeline resizes
  before `convert("RGB")`: the mode is read from the file header (PNG colour
  type, GIF palette, BMP depth, WebP alpha flag) and returned with the pixels as
  a `resampling.RESAMPLE_*` value, so the matching resize path is used.
* The format is read from the file signature (`FORMAT_SIGNATURES`, the one table,
  also read by the input pipeline's `looks_like_image`).

Hostile input. The image size is read from the header (PNG IHDR, libjpeg's
header reader, GIF screen and first frame, BMP info header, first WebP chunk) and
checked against `max_pixels` before any decoding op runs, also after the
shortest-side resize (which would blow a 20000x1 image up to 20000 times 224
pixels per row of output). The in-graph header walks are bounded by segments
and blocks, not bytes: a JPEG's 0xFF fill is skipped a 64 KB window at a time
and at most `MAX_JPEG_SEGMENTS` segments are walked; a GIF's full data
sub-blocks are crossed 256 at a time and at most `MAX_GIF_STEPS` steps are
taken. GIFs are cut after their first frame, so TensorFlow's decoder neither
keeps every frame in memory nor sizes its canvas by the largest.
"""

import functools

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2 as _attr_value_pb2

from keras_clip.preprocessing.resampling import (
    RESAMPLE_BICUBIC,
    RESAMPLE_NEAREST,
    RESAMPLE_PREMULTIPLIED,
)

SUPPORTED_FORMATS = "JPEG/PNG/GIF/BMP/WebP"

# Format ids, in `tf.switch_case` branch order.
_JPEG, _PNG, _GIF, _BMP, _WEBP = 0, 1, 2, 3, 4
# The one table of file signatures: (format id, ((offset, bytes), ...)); a format
# matches when all its parts do. The decoder (`_detect_format`) and the
# pipeline's cheap pre-check (`keras_clip.data.pipeline.looks_like_image`) read it.
FORMAT_SIGNATURES = (
    (_JPEG, ((0, b"\xff\xd8\xff"),)),
    (_PNG, ((0, b"\x89PNG\r\n\x1a\n"),)),
    (_GIF, ((0, b"GIF87a"),)),
    (_GIF, ((0, b"GIF89a"),)),
    (_BMP, ((0, b"BM"),)),
    (_WEBP, ((0, b"RIFF"), (8, b"WEBP"))),
)
# Bytes a signature check reads: 12 (WebP's `WEBP` at offset 8).
SIGNATURE_LENGTH = max(offset + len(part) for _, parts in FORMAT_SIGNATURES for offset, part in parts)

# Default `max_pixels`: a 48-megapixel phone photo (8064x6048) passes; decoding
# plus PIL-exact resizing then peaks near 3 GB (measured in
# benchmarks/hostile_images.py). PIL warns from 89.5 million pixels.
DEFAULT_MAX_PIXELS = 50_000_000

# Header walks are bounded: marker segments of a JPEG before its first scan, and
# blocks / sub-blocks of a GIF up to the end of its first frame. Real files need
# tens (JPEG: up to ~260 with an ICC profile in 255 chunks; GIF: a few per
# extension block, plus one per 256 full 255-byte data sub-blocks, 64 KB).
MAX_JPEG_SEGMENTS = 1024
MAX_GIF_STEPS = 1024
# Bytes searched at once for the end of a run of 0xFF fill bytes in a JPEG.
_FILL_WINDOW = 65536
# Full (255-byte) GIF data sub-blocks checked at once.
_GIF_STRIDE = 256

# One single-byte string per byte value, to patch bytes inside a tf.string.
_BYTE_STRINGS = tuple(bytes([value]) for value in range(256))

# --------------------------------------------------------------------------
# Reading bytes in-graph
# --------------------------------------------------------------------------


class _Bytes:
    """Bounds-safe random access to the bytes of one scalar tf.string.

    `at(i)` returns the byte as int32, or -1 when `i` is past the end, so header
    parsers never fail with an out-of-range gather on short or garbage input.
    """

    def __init__(self, image_bytes):
        raw = tf.cast(tf.io.decode_raw(image_bytes, tf.uint8), tf.int32)  # (N,)
        self.size = tf.size(raw)
        self._padded = tf.concat([raw, [-1]], axis=0)  # (N + 1,)
        self.values = raw

    def at(self, index):
        index = tf.cast(index, tf.int32)
        return tf.gather(self._padded, tf.clip_by_value(index, 0, self.size))

    def u16le(self, index):
        return self.at(index) + 256 * self.at(index + 1)

    def u16be(self, index):
        return 256 * self.at(index) + self.at(index + 1)

    def u24le(self, index):
        return self.u16le(index) + 65536 * self.at(index + 2)

    def u32be(self, index):
        value = 65536 * tf.cast(self.u16be(index), tf.int64)
        return value + tf.cast(self.u16be(index + 2), tf.int64)

    def u32le(self, index):
        value = tf.cast(self.u16le(index), tf.int64)
        return value + 65536 * tf.cast(self.u16le(index + 2), tf.int64)

    def i32le(self, index):
        value = self.u32le(index)
        return tf.where(value >= 2**31, value - 2**32, value)

    def matches(self, offset, signature):
        """Whether `signature` (Python bytes) occurs at `offset`."""
        checks = [tf.equal(self.at(offset + i), byte) for i, byte in enumerate(signature)]
        return tf.reduce_all(tf.stack(checks))

    def contains(self, pattern, start=0):
        """Whether `pattern` (Python bytes) occurs anywhere at or after `start`."""
        count = tf.maximum(self.size - len(pattern) + 1, 0)
        found = tf.ones([count], tf.bool)
        for i, byte in enumerate(pattern):
            found &= tf.equal(self.values[i : i + count], byte)
        found &= tf.range(count) >= start
        return tf.reduce_any(found)

    def slice(self, start, length):
        start = tf.clip_by_value(tf.cast(start, tf.int32), 0, self.size)
        length = tf.clip_by_value(tf.cast(length, tf.int32), 0, self.size - start)
        return self.values[start : start + length]


def _signature_table():
    """`FORMAT_SIGNATURES` as arrays: expected bytes, which positions count, and
    each row's format id (rows exclude each other)."""
    expected = np.zeros([len(FORMAT_SIGNATURES), SIGNATURE_LENGTH], np.int32)
    counted = np.zeros([len(FORMAT_SIGNATURES), SIGNATURE_LENGTH], bool)
    for row, (_, parts) in enumerate(FORMAT_SIGNATURES):
        for offset, part in parts:
            expected[row, offset : offset + len(part)] = list(part)
            counted[row, offset : offset + len(part)] = True
    return expected, counted, np.array([value for value, _ in FORMAT_SIGNATURES], np.int32)


_SIGNATURE_EXPECTED, _SIGNATURE_COUNTED, _SIGNATURE_FORMATS = _signature_table()


# The graph builders called from outside this module (`detect_format`,
# `_decode_rgba`, `declared_size`, `decode_image`) use TensorFlow control flow
# explicitly, so they are marked `do_not_convert`: inside a `tf.data` map or a
# `tf.function`, AutoGraph's conversion of this code only added tracing time (an
# export of the tests' tiny model: 29 s converted, 17-21 s not). Unconverted,
# Python control flow on a tensor fails at trace time, so nothing can silently
# depend on the conversion.

@tf.autograph.experimental.do_not_convert
def detect_format(image_bytes):
    """Format id of one encoded image from its file signature (`FORMAT_SIGNATURES`):
    `_JPEG` .. `_WEBP`, or -1 when none matches.

    Reads only the first `SIGNATURE_LENGTH` bytes, with one vectorised comparison
    against the whole table (a handful of ops, cheap enough for every record of an
    input pipeline).

    Args:
        image_bytes: scalar `tf.string`.

    Returns:
        Scalar int32.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    head = tf.strings.substr(image_bytes, 0, SIGNATURE_LENGTH)
    padded = tf.strings.join([head, b"\0" * SIGNATURE_LENGTH])
    head = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, SIGNATURE_LENGTH), tf.uint8), tf.int32)
    # Positions past the end read -1, which no signature byte equals.
    head = tf.where(tf.range(SIGNATURE_LENGTH) < tf.strings.length(image_bytes), head, -1)  # (L,)
    matches = tf.reduce_all(
        tf.equal(head[None], _SIGNATURE_EXPECTED) | ~_SIGNATURE_COUNTED, axis=1
    )  # (rows,)
    return tf.reduce_max(tf.where(matches, _SIGNATURE_FORMATS, -1))


def _detect_format(image_bytes, data):
    del data  # the signature is read from the first bytes alone
    return detect_format(image_bytes)


def _unlowered(build):
    """Runs `build()` (which makes one `tf.cond` / `tf.switch_case`) and marks the
    resulting If/Case op to run as a function call instead of being lowered to
    Switch/Merge. Lowered, every op of every branch not taken still runs, passing
    "dead" values along: with the other formats' decoders and the JPEG segment
    walk in untaken branches, that cost several times the JPEG decode itself per
    image (benchmarks/training_faults.py). A function call runs the taken branch
    alone."""
    if tf.executing_eagerly():
        return build()
    graph = tf.compat.v1.get_default_graph()
    before = len(graph.get_operations())
    result = build()
    for op in graph.get_operations()[before:]:
        if op.type in ("If", "StatelessIf", "Case", "StatelessCase"):
            op._set_attr(  # pylint: disable=protected-access
                "_lower_using_switch_merge", _attr_value_pb2.AttrValue(b=False)
            )
    return result


def _check(condition, prefix, reason):
    """An assert whose message is `<prefix> are not a decodable ... image: <reason>`."""
    message = tf.strings.join(
        [prefix, f" are not a decodable {SUPPORTED_FORMATS} image: {reason}"]
    )
    return tf.debugging.Assert(condition, [message], name="check_image_bytes")


def _with_alpha(rgb):
    """(H, W, 3) uint8 -> (H, W, 4) with an opaque alpha channel."""
    alpha = tf.fill(tf.concat([tf.shape(rgb)[:2], [1]], 0), tf.constant(255, tf.uint8))
    return tf.concat([rgb, alpha], axis=-1)


# --------------------------------------------------------------------------
# Per-format decoding: (H, W, 4) uint8 RGBA plus the PIL resample mode
# --------------------------------------------------------------------------


# JPEG markers: SOF0-3, 5-7, 9-11, 13-15 (C4 is DHT, C8 JPG, CC DAC).
_JPEG_SOF_CODES = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_WALKING, _FOUND, _CONFUSED = 0, 1, 2


def _jpeg_walk(data):
    """Walks the marker segments of a JPEG from SOI to its first SOS.

    Segment lengths skip an EXIF thumbnail (a complete JPEG inside APP1), so the
    first SOF seen is the main image's, the one libjpeg reads. A run of 0xFF fill
    bytes is skipped in one step per `_FILL_WINDOW` bytes (a vectorised search
    for the next non-0xFF byte), so the number of iterations is bounded by
    marker segments, not bytes; at most `MAX_JPEG_SEGMENTS` segments are walked.

    Returns:
        dict of scalars: `state` (`_FOUND`: reached SOS; `_CONFUSED`: bytes that
        do not parse as segments, left to libjpeg; `_WALKING`: data ended or
        the segment limit was hit first), `sos` (position of the SOS marker),
        `segments` (segments walked), `has_sof`, `height`, `width` (int64, from
        the first SOF).
    """

    def cond(pos, state, segments, sos, has_sof, height, width):
        return tf.equal(state, _WALKING) & (pos + 3 < data.size) & (segments < MAX_JPEG_SEGMENTS)

    def body(pos, state, segments, sos, has_sof, height, width):
        b0, b1 = data.at(pos), data.at(pos + 1)

        def skip_fill():
            # pos and pos + 1 are 0xFF: move to the last 0xFF before the next
            # other byte, searching one window at a time.
            window = data.slice(pos + 1, _FILL_WINDOW)
            other = tf.not_equal(window, 0xFF)
            run = tf.where(
                tf.reduce_any(other),
                tf.argmax(tf.cast(other, tf.int32), output_type=tf.int32),
                tf.size(window),
            )
            return pos + run, state, segments, sos, has_sof, height, width

        def segment():
            is_sos = tf.equal(b0, 0xFF) & tf.equal(b1, 0xDA)
            standalone = tf.equal(b0, 0xFF) & (
                tf.equal(b1, 0x01) | ((b1 >= 0xD0) & (b1 <= 0xD8))
            )
            is_sof = tf.equal(b0, 0xFF) & tf.reduce_any(tf.equal(b1, _JPEG_SOF_CODES)) & ~has_sof
            length = data.u16be(pos + 2)
            # FF00 is no marker: libjpeg skips it as garbage, which this walk
            # leaves to libjpeg, like any byte that is not a marker.
            bad = tf.not_equal(b0, 0xFF) | tf.equal(b1, 0) | (~standalone & ~is_sos & (length < 2))
            next_pos = tf.where(standalone, pos + 2, pos + 2 + length)
            new_state = tf.where(is_sos, _FOUND, tf.where(bad, _CONFUSED, _WALKING))
            walking = tf.equal(new_state, _WALKING)
            return (
                tf.where(walking, next_pos, pos),
                new_state,
                segments + 1,
                tf.where(is_sos, pos, sos),
                has_sof | (is_sof & ~bad),
                tf.where(is_sof, tf.cast(data.u16be(pos + 5), tf.int64), height),
                tf.where(is_sof, tf.cast(data.u16be(pos + 7), tf.int64), width),
            )

        is_fill = tf.equal(b0, 0xFF) & tf.equal(b1, 0xFF)
        return tf.cond(is_fill, skip_fill, segment)

    zero = tf.constant(0, tf.int64)
    initial = (tf.constant(2), tf.constant(_WALKING), tf.constant(0), tf.constant(-1),
               tf.constant(False), zero, zero)
    _, state, segments, sos, has_sof, height, width = tf.while_loop(cond, body, initial)
    return {"state": state, "segments": segments, "sos": sos, "has_sof": has_sof,
            "height": height, "width": width}


def _decode_jpeg(image_bytes, prefix, limits):
    # PIL, like TensorFlow, rejects a JPEG without its end-of-image marker ("image
    # file is truncated"). A file ending in FFD9 is complete; otherwise an EOI
    # must follow the first SOS (entropy-coded data never contains FFD9). Bytes
    # that do not parse as segments are left to the decoder.
    length = tf.strings.length(image_bytes)
    ends_with_eoi = tf.equal(tf.strings.substr(image_bytes, tf.maximum(length - 2, 0), 2), b"\xff\xd9")

    def walk():
        data = _Bytes(image_bytes)
        result = _jpeg_walk(data)
        state = result["state"]
        too_many = tf.equal(state, _WALKING) & (result["segments"] >= MAX_JPEG_SEGMENTS)
        complete = tf.cond(
            tf.equal(state, _CONFUSED),
            lambda: tf.constant(True),
            lambda: tf.equal(state, _FOUND) & data.contains(b"\xff\xd9", start=result["sos"]),
        )
        return too_many, complete

    too_many, complete = _unlowered(lambda: tf.cond(
        ends_with_eoi, lambda: (tf.constant(False), tf.constant(True)), walk
    ))
    checks = [
        _check(
            ~too_many,
            prefix,
            f"JPEG with more than {MAX_JPEG_SEGMENTS} marker segments before the image data",
        ),
    ]
    with tf.control_dependencies(checks):
        checks.append(
            _check(complete, prefix, "truncated JPEG (no end-of-image marker after the image data)")
        )
    with tf.control_dependencies(checks):
        # libjpeg's own header reader: the size the decoder will allocate, read
        # without decoding (an invalid header fails here instead).
        shape = tf.cast(tf.io.extract_jpeg_shape(image_bytes), tf.int64)  # (3,)
    checks += limits.checks(prefix, shape[0], shape[1])
    with tf.control_dependencies(checks):
        rgb = tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE")
    return _with_alpha(rgb), tf.constant(RESAMPLE_BICUBIC)


def _png_size(data):
    """(height, width) from the IHDR chunk, int64."""
    return data.u32be(20), data.u32be(16)


def _decode_png(image_bytes, data, prefix, limits):
    has_header = data.matches(12, b"IHDR") & (data.size >= 33)
    complete = data.contains(b"IEND", start=33)
    checks = [_check(has_header, prefix, "PNG without an IHDR header")]
    with tf.control_dependencies(checks):
        checks += limits.checks(prefix, *_png_size(data))
    with tf.control_dependencies(checks):
        checks.append(_check(complete, prefix, "truncated PNG (no IEND chunk)"))
    bit_depth, color_type = data.at(24), data.at(25)
    # PIL modes: colour type 3 -> "P", grey at 1 bit -> "1" (both NEAREST);
    # 4 -> "LA", 6 -> "RGBA" (premultiplied); 0 and 2 -> "L"/"RGB" (bicubic). A tRNS
    # chunk on a grey/RGB/palette image does not change the mode, and convert("RGB")
    # ignores it.
    nearest = tf.equal(color_type, 3) | (tf.equal(color_type, 0) & tf.equal(bit_depth, 1))
    premultiplied = tf.equal(color_type, 4) | tf.equal(color_type, 6)
    mode = tf.where(premultiplied, RESAMPLE_PREMULTIPLIED, RESAMPLE_BICUBIC)
    mode = tf.where(nearest, RESAMPLE_NEAREST, mode)
    with tf.control_dependencies(checks):
        rgba = tf.io.decode_png(image_bytes, channels=4)
    return rgba, mode


def _gif_palette_is_identity(data, start, num_entries):
    """PIL's `_is_palette_needed` negated: entry i is (i, i, i) for every i."""
    entries = tf.reshape(data.slice(start, 3 * num_entries), [-1, 3])
    expected = tf.range(tf.shape(entries)[0])[:, None]
    return tf.reduce_all(tf.equal(entries, expected)) & tf.equal(tf.shape(entries)[0], num_entries)


def _gif_walk(data):
    """Walks a GIF's blocks from the header to the end of its first frame.

    Extension blocks (0x21) before the first image descriptor (0x2C) are skipped
    with their data sub-blocks, the first Graphic Control Extension is
    remembered, and the first frame's data sub-blocks are skipped to its
    terminator. A run of full (255-byte) sub-blocks, what encoders write, is
    crossed `_GIF_STRIDE` blocks per iteration; every shorter sub-block, block
    header and terminator takes one; at most `MAX_GIF_STEPS` iterations.

    Returns:
        dict of int32 scalars: `descriptor` (position of the first image
        descriptor, -1 when none), `gce` (position of the first GCE's packed
        byte before it, -1 when none), `end` (position after the first frame's
        terminator, -1 when the data ended or did not parse first) and `steps`.
    """
    flags = data.at(10)
    has_global = tf.not_equal(tf.bitwise.bitwise_and(flags, 0x80), 0)
    global_entries = tf.bitwise.left_shift(1, tf.bitwise.bitwise_and(flags, 7) + 1)
    first_block = 13 + tf.where(has_global, 3 * global_entries, 0)
    in_blocks, in_sub_blocks, done, failed = 0, 1, 2, 3
    strides = 256 * tf.range(_GIF_STRIDE)  # (S,)

    def cond(pos, mode, descriptor, gce, steps):
        return (mode < done) & (steps < MAX_GIF_STEPS)

    def body(pos, mode, descriptor, gce, steps):
        byte = data.at(pos)
        # A block: an extension (label, then sub-blocks) or the first image
        # descriptor (10 bytes, optional local colour table, LZW code size byte,
        # then sub-blocks); anything else ends the walk.
        is_extension = tf.equal(byte, 0x21)
        is_descriptor = tf.equal(byte, 0x2C)
        local_flags = data.at(pos + 9)
        has_local = tf.not_equal(tf.bitwise.bitwise_and(local_flags, 0x80), 0)
        local_size = 3 * tf.bitwise.left_shift(1, tf.bitwise.bitwise_and(local_flags, 7) + 1)
        data_start = pos + 11 + tf.where(has_local, local_size, 0)
        is_gce = is_extension & tf.equal(data.at(pos + 1), 0xF9) & (gce < 0)
        block_pos = tf.where(is_extension, pos + 2, data_start)
        block_mode = tf.where(is_extension | is_descriptor, in_sub_blocks, failed)

        # Sub-blocks: a run of full ones at once, else one (or the terminator).
        full = tf.equal(tf.gather(data._padded, tf.clip_by_value(pos + strides, 0, data.size)), 255)
        run = tf.where(tf.reduce_all(full), _GIF_STRIDE, tf.argmin(tf.cast(full, tf.int32), output_type=tf.int32))
        terminator = tf.equal(byte, 0)
        sub_pos = tf.where(run > 0, pos + 256 * run, pos + byte + 1)
        sub_mode = tf.where(
            terminator, tf.where(descriptor >= 0, done, in_blocks), in_sub_blocks
        )
        sub_mode = tf.where(byte < 0, failed, sub_mode)  # past the end: truncated

        blocks = tf.equal(mode, in_blocks)
        return (
            tf.where(blocks, block_pos, sub_pos),
            tf.where(blocks, block_mode, sub_mode),
            tf.where(blocks & is_descriptor, pos, descriptor),
            tf.where(blocks & is_gce, pos + 3, gce),
            steps + 1,
        )

    minus_one = tf.constant(-1)
    initial = (first_block, tf.constant(in_blocks), minus_one, minus_one, tf.constant(0))
    pos, mode, descriptor, gce, steps = tf.while_loop(cond, body, initial)
    return {
        "descriptor": descriptor,
        "gce": gce,
        "end": tf.where(tf.equal(mode, done), pos, -1),
        "steps": tf.where(mode < done, steps, 0),  # > 0: stopped by the limit
    }


def _gif_size(data, walk):
    """(height, width), int64: the logical screen, or the first frame if larger.

    TensorFlow's decoder sizes its canvas by the frames, PIL by the screen.
    """
    descriptor = walk["descriptor"]
    found = descriptor >= 0
    frame_width = tf.where(found, data.u16le(descriptor + 5), 0)
    frame_height = tf.where(found, data.u16le(descriptor + 7), 0)
    height = tf.maximum(data.u16le(8), frame_height)
    width = tf.maximum(data.u16le(6), frame_width)
    return tf.cast(height, tf.int64), tf.cast(width, tf.int64)


def _decode_gif(image_bytes, data, prefix, limits):
    # Header: 6-byte signature, logical screen (7 bytes), optional global table.
    flags = data.at(10)
    has_global = tf.not_equal(tf.bitwise.bitwise_and(flags, 0x80), 0)
    global_entries = tf.bitwise.left_shift(1, tf.bitwise.bitwise_and(flags, 7) + 1)
    global_identity = _gif_palette_is_identity(data, 13, global_entries)

    walk = _gif_walk(data)
    descriptor, gce = walk["descriptor"], walk["gce"]
    has_descriptor = descriptor >= 0
    local_flags = data.at(descriptor + 9)
    has_local = has_descriptor & tf.not_equal(tf.bitwise.bitwise_and(local_flags, 0x80), 0)
    local_entries = tf.bitwise.left_shift(1, tf.bitwise.bitwise_and(local_flags, 7) + 1)
    local_identity = _gif_palette_is_identity(data, descriptor + 10, local_entries)
    # PIL loads the first frame as "L" when its palette (local, else global) is
    # missing or the identity grey ramp, and as "P" otherwise.
    grey = tf.where(has_local, local_identity, ~has_global | global_identity)
    mode = tf.where(grey, RESAMPLE_BICUBIC, RESAMPLE_NEAREST)

    # Only the first frame is used, but TensorFlow's decoder keeps every frame in
    # memory (giflib's DGifSlurp) and sizes its canvas by the largest: cut the
    # file after the first frame and end it with the trailer (0x3B).
    end = walk["end"]
    image_bytes = tf.cond(
        end > 0,
        lambda: tf.strings.join([tf.strings.substr(image_bytes, 0, end), b"\x3b"]),
        lambda: image_bytes,
    )

    # PIL's convert("RGB") shows a transparent index as its palette colour, while
    # TensorFlow leaves it black: clear the transparency flag before decoding.
    def clear_transparency():
        packed = data.at(gce)
        patched = tf.gather(_BYTE_STRINGS, tf.bitwise.bitwise_and(packed, 0xFE))
        head = tf.strings.substr(image_bytes, 0, gce)
        tail = tf.strings.substr(image_bytes, gce + 1, tf.strings.length(image_bytes) - gce - 1)
        return tf.strings.join([head, patched, tail])

    has_transparency = (gce >= 0) & tf.not_equal(tf.bitwise.bitwise_and(data.at(gce), 1), 0)
    image_bytes = tf.cond(has_transparency, clear_transparency, lambda: image_bytes)
    checks = [
        _check(
            tf.equal(walk["steps"], 0),
            prefix,
            f"GIF with more than {MAX_GIF_STEPS} blocks and sub-blocks before the end of its first frame",
        ),
    ]
    with tf.control_dependencies(checks):
        checks.append(
            _check(has_descriptor, prefix, "GIF without an image descriptor (truncated or empty)")
        )
    checks += limits.checks(prefix, *_gif_size(data, walk))
    with tf.control_dependencies(checks):
        rgb = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    rgb = tf.ensure_shape(rgb, [None, None, 3])
    return _with_alpha(rgb), mode


def _bmp_size(data):
    """(height, width) from the BMP info header, int64 (height < 0: top-down)."""
    return tf.abs(data.i32le(22)), tf.abs(data.i32le(18))


def _decode_bmp(image_bytes, data, prefix, limits):
    size_checks = limits.checks(prefix, *_bmp_size(data))
    data_offset = data.u32le(10)
    header_size = data.u32le(14)
    width = data.i32le(18)
    height = data.i32le(22)
    bits = data.u16le(28)
    compression = data.u32le(30)
    is_info_header = header_size >= 40
    # 32-bit BITFIELDS with the standard BGR masks: alpha mask 0 -> "RGB",
    # 0xFF000000 -> "RGBA" (PIL). Other layouts TensorFlow would decode wrongly.
    standard_masks = (
        (header_size >= 56)
        & tf.equal(data.u32le(54), 0xFF0000)
        & tf.equal(data.u32le(58), 0xFF00)
        & tf.equal(data.u32le(62), 0xFF)
    )
    alpha_mask = data.u32le(66)
    bitfields_ok = (
        tf.equal(compression, 3) & tf.equal(bits, 32) & standard_masks
        & (tf.equal(alpha_mask, 0) | tf.equal(alpha_mask, 0xFF000000))
    )
    premultiplied = tf.equal(compression, 3) & tf.equal(alpha_mask, 0xFF000000)
    supported = is_info_header & (
        (tf.equal(compression, 0) & (tf.equal(bits, 8) | tf.equal(bits, 24) | tf.equal(bits, 32)))
        | bitfields_ok
    )
    row_size = (tf.cast(bits, tf.int64) * tf.abs(width) + 31) // 32 * 4
    complete = tf.cast(data.size, tf.int64) >= data_offset + row_size * tf.abs(height)
    with tf.control_dependencies(size_checks):
        checks = size_checks + [
            _check(
                supported,
                prefix,
                "unsupported BMP layout (only uncompressed 8-, 24- and 32-bit BMPs are supported)",
            ),
            _check(complete, prefix, "truncated BMP (less pixel data than the header declares)"),
        ]

    # 8-bit: TensorFlow returns palette indices; look the colours up as PIL does.
    # PIL reads the image as "L" (bicubic) when entry i is (i, i, i) for all of
    # its `colors` entries, else as "P" (NEAREST).
    declared_colors = data.u32le(46)
    colors = tf.where(tf.equal(declared_colors, 0), tf.constant(256, tf.int64), declared_colors)
    colors = tf.cast(tf.clip_by_value(colors, 1, 256), tf.int32)
    palette_start = tf.cast(tf.minimum(14 + header_size, tf.cast(data.size, tf.int64)), tf.int32)
    available = tf.minimum(colors, (data.size - palette_start) // 4)
    palette = tf.reshape(data.slice(palette_start, 4 * available), [-1, 4])[:, 2::-1]  # BGRX -> RGB
    palette = tf.pad(palette, [[0, 256 - tf.shape(palette)[0]], [0, 0]])  # (256, 3)
    grey = tf.reduce_all(tf.equal(palette[:colors], tf.range(colors)[:, None]))

    with tf.control_dependencies(checks):
        decoded = tf.io.decode_bmp(image_bytes, channels=4)  # (H, W, 4)

    def from_palette():
        indices = tf.cast(decoded[..., 0], tf.int32)
        return _with_alpha(tf.cast(tf.gather(palette, indices), tf.uint8))

    def direct():
        alpha = tf.where(premultiplied, decoded[..., 3:], tf.constant(255, tf.uint8))
        return tf.concat([decoded[..., :3], alpha], axis=-1)

    is_palette = tf.equal(bits, 8)
    rgba = tf.cond(is_palette, from_palette, direct)
    mode = tf.where(
        is_palette,
        tf.where(grey, RESAMPLE_BICUBIC, RESAMPLE_NEAREST),
        tf.where(premultiplied, RESAMPLE_PREMULTIPLIED, RESAMPLE_BICUBIC),
    )
    return rgba, mode


def _webp_size(data):
    """(height, width), int64, from the first chunk: VP8X canvas, VP8L or VP8 frame.

    0 x 0 for any other chunk (libwebp then rejects the file).
    """
    lossy = data.matches(12, b"VP8 ")
    lossless = data.matches(12, b"VP8L")
    extended = data.matches(12, b"VP8X")
    bits = data.u32le(21)  # VP8L: 14 bits width - 1, 14 bits height - 1
    width = tf.where(
        extended,
        tf.cast(data.u24le(24), tf.int64) + 1,
        tf.where(
            lossless,
            tf.bitwise.bitwise_and(bits, 0x3FFF) + 1,
            tf.where(lossy, tf.cast(tf.bitwise.bitwise_and(data.u16le(26), 0x3FFF), tf.int64), 0),
        ),
    )
    height = tf.where(
        extended,
        tf.cast(data.u24le(27), tf.int64) + 1,
        tf.where(
            lossless,
            tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 14), 0x3FFF) + 1,
            tf.where(lossy, tf.cast(tf.bitwise.bitwise_and(data.u16le(28), 0x3FFF), tf.int64), 0),
        ),
    )
    return height, width


def _decode_webp(image_bytes, data, prefix, limits):
    # libwebp reports whether the file has alpha (VP8X flag or VP8L header bit);
    # TensorFlow then returns 4 channels and PIL opens the file as "RGBA".
    checks = [_check(data.size >= 30, prefix, "truncated WebP")]
    with tf.control_dependencies(checks):
        checks += limits.checks(prefix, *_webp_size(data))
    with tf.control_dependencies(checks):
        decoded = tf.io.decode_image(image_bytes, channels=0, expand_animations=False)
    has_alpha = tf.equal(tf.shape(decoded)[-1], 4)
    rgba = tf.cond(
        has_alpha,
        lambda: tf.ensure_shape(decoded, [None, None, 4]),
        lambda: _with_alpha(tf.ensure_shape(decoded, [None, None, 3])),
    )
    return rgba, tf.where(has_alpha, RESAMPLE_PREMULTIPLIED, RESAMPLE_BICUBIC)


def _bytes_prefix(index):
    if index is None:
        return tf.constant("image bytes")
    return tf.strings.format("image bytes at batch index {}", [index])


def validate_max_pixels(value, name="max_pixels", image_size=None):
    """`value` as an int; a ValueError naming argument `name` unless it is a
    positive integer (at least `image_size ** 2`: every output passes through a
    resize to at least that many pixels)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    if image_size is not None and value < image_size**2:
        raise ValueError(
            f"`{name}` must be at least image_size ** 2 = {image_size**2}. Received: {name}={value!r}"
        )
    return int(value)


def _resized_size(height, width, image_size):
    """`_shortest_side_size` in int64, for declared sizes (a zero side counts as 1)."""
    short = tf.maximum(tf.minimum(height, width), 1)
    long = tf.minimum(tf.maximum(height, width), 2**31)
    new_long = tf.cast(
        tf.cast(image_size * long, tf.float64) / tf.cast(short, tf.float64), tf.int64
    )
    portrait = width <= height
    image_size = tf.constant(image_size, tf.int64)
    return tf.where(portrait, new_long, image_size), tf.where(portrait, image_size, new_long)


class _Limits:
    """The size limits one decode enforces, before any decoding op runs.

    Args:
        max_pixels: int, most pixels (width x height) an image may declare.
        image_size: optional int. When given, the image resized to this
            shortest side (before the center crop) must also hold at most
            `max_pixels` pixels, which bounds very thin images.
    """

    def __init__(self, max_pixels, image_size=None):
        self.max_pixels = max_pixels
        self.image_size = image_size

    @staticmethod
    def _pixels(height, width):
        # Sides are clamped so that the product cannot overflow int64.
        return tf.minimum(height, 2**31) * tf.minimum(width, 2**31)

    def exceeded(self, height, width):
        """Scalar bool: whether a declared (height, width), int64, is over a limit."""
        over = self._pixels(height, width) > self.max_pixels
        if self.image_size is not None:
            new_height, new_width = _resized_size(height, width, self.image_size)
            over |= new_height * new_width > self.max_pixels
        return over

    def checks(self, prefix, height, width):
        """Assert ops with messages naming the declared size and the limit.

        The messages are only built when a check fails (inside a `tf.cond`), so
        the normal path pays for two comparisons, not for string formatting.
        """
        limit = f"more than the limit of {self.max_pixels} pixels (`max_pixels`)"

        def check(ok, message, name):
            def fail():
                with tf.control_dependencies([tf.debugging.Assert(False, [message()], name=name)]):
                    return tf.constant(False)

            return tf.cond(ok, lambda: tf.constant(True), fail)

        def size():
            return [tf.strings.as_string(width), "x", tf.strings.as_string(height)]

        pixels = self._pixels(height, width)
        checks = [check(
            pixels <= self.max_pixels,
            lambda: tf.strings.join([prefix, " declare a ", *size(), " image (",
                                     tf.strings.as_string(pixels), f" pixels), {limit}"]),
            "check_image_pixels",
        )]
        if self.image_size is not None:
            new_height, new_width = _resized_size(height, width, self.image_size)
            with tf.control_dependencies(checks):
                checks.append(check(
                    new_height * new_width <= self.max_pixels,
                    lambda: tf.strings.join(
                        [prefix, " declare a ", *size(), " image, which resizing to a shortest "
                         f"side of {self.image_size} makes ", tf.strings.as_string(new_width),
                         "x", tf.strings.as_string(new_height), " (",
                         tf.strings.as_string(new_height * new_width), f" pixels), {limit}"]
                    ),
                    "check_resized_pixels",
                ))
        return checks


@tf.autograph.experimental.do_not_convert
def _decode_rgba(image_bytes, index=None, limits=None):
    """Decodes one image to (H, W, 4) uint8 RGBA plus its PIL resample mode.

    The size the header declares is checked against `limits` (a `_Limits`;
    default: `DEFAULT_MAX_PIXELS`) before any decoding op runs.
    """
    limits = limits or _Limits(DEFAULT_MAX_PIXELS)
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    prefix = _bytes_prefix(index)
    format_id = detect_format(image_bytes)
    length = tf.strings.as_string(tf.strings.length(image_bytes))
    reason = tf.strings.join(["unrecognised file signature (", length, " bytes)"])
    message = tf.strings.join([prefix, f" are not a decodable {SUPPORTED_FORMATS} image: ", reason])
    check = tf.debugging.Assert(format_id >= 0, [message], name="check_image_signature")
    with tf.control_dependencies([check]):
        format_id = tf.identity(format_id)
    # Each branch reads the bytes it needs itself: the common JPEG path never
    # copies the whole file into a byte tensor.
    branches = [
        lambda: _decode_jpeg(image_bytes, prefix, limits),
        lambda: _decode_png(image_bytes, _Bytes(image_bytes), prefix, limits),
        lambda: _decode_gif(image_bytes, _Bytes(image_bytes), prefix, limits),
        lambda: _decode_bmp(image_bytes, _Bytes(image_bytes), prefix, limits),
        lambda: _decode_webp(image_bytes, _Bytes(image_bytes), prefix, limits),
    ]
    rgba, mode = _unlowered(lambda: tf.switch_case(format_id, branches))
    return tf.ensure_shape(rgba, [None, None, 4]), mode


@tf.autograph.experimental.do_not_convert
def declared_size(image_bytes):
    """The image size an encoded file's header declares, without decoding it.

    Reads PNG IHDR, the first JPEG SOF (walking the marker segments), the GIF
    logical screen and first image descriptor, the BMP info header and the first
    WebP chunk. Never raises: bytes whose size cannot be read give `known=False`.

    Args:
        image_bytes: scalar `tf.string`.

    Returns:
        `(height, width, known)`: int64, int64 and bool scalars (0, 0 when not
        known).
    """
    return _declared_size_function()(tf.convert_to_tensor(image_bytes, tf.string))


@functools.lru_cache(maxsize=None)
def _declared_size_function():
    # One trace per process, called by every graph that reads a header.
    return tf.function(_declared_size, autograph=False,
                       input_signature=[tf.TensorSpec([], tf.string)])


def _declared_size(image_bytes):
    """`declared_size`, traced once per process by `_declared_size_function`."""
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    data = _Bytes(image_bytes)
    format_id = _detect_format(image_bytes, data)
    zero = tf.constant(0, tf.int64)

    def jpeg():
        walk = _jpeg_walk(data)
        return walk["height"], walk["width"], walk["has_sof"]

    def png():
        return (*_png_size(data), data.matches(12, b"IHDR") & (data.size >= 24))

    def gif():
        return (*_gif_size(data, _gif_walk(data)), data.size >= 10)

    def bmp():
        return (*_bmp_size(data), data.size >= 26)

    def webp():
        height, width = _webp_size(data)
        return height, width, width > 0

    def unknown():
        return zero, zero, tf.constant(False)

    height, width, known = _unlowered(lambda: tf.switch_case(
        tf.where(format_id >= 0, format_id, 5), [jpeg, png, gif, bmp, webp, unknown]
    ))
    return tf.where(known, height, 0), tf.where(known, width, 0), known


@tf.autograph.experimental.do_not_convert
def decode_image(image_bytes, max_pixels=DEFAULT_MAX_PIXELS):
    """Decodes one encoded image to RGB pixels, in-graph, like PIL's `convert("RGB")`.

    JPEGs use libjpeg's ISLOW IDCT (as PIL does); PNG, GIF (first frame), BMP and
    WebP use TensorFlow's decoders. Grey, palette and alpha images become RGB the
    way PIL's `convert("RGB")` does (alpha dropped, palette looked up, a GIF's
    transparent index shown as its palette colour).

    Args:
        image_bytes: scalar `tf.string`, the encoded file.
        max_pixels: int, most pixels (width x height) the header may declare;
            checked before anything is decoded.

    Returns:
        `uint8` tensor of shape `(height, width, 3)`.

    Raises:
        tf.errors.InvalidArgumentError: when the bytes are not a decodable
            JPEG/PNG/GIF/BMP/WebP image; the message says
            `image bytes are not a decodable ... image: <reason>`; or when the
            header declares more than `max_pixels` pixels: `image bytes declare
            a <W>x<H> image (<N> pixels), more than the limit of <max_pixels>
            pixels (`max_pixels`)`.
    """
    function = _decode_rgb_function(validate_max_pixels(max_pixels))
    return function(tf.convert_to_tensor(image_bytes, tf.string))


@functools.lru_cache(maxsize=None)
def _decode_rgb_function(max_pixels):
    # One trace per process and limit, called by every graph that decodes (the
    # training pipeline's maps, eager calls).
    limits = _Limits(max_pixels)
    return tf.function(lambda image_bytes: _decode_rgba(image_bytes, limits=limits)[0][..., :3],
                       autograph=False, input_signature=[tf.TensorSpec([], tf.string)])
