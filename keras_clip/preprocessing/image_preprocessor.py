"""CLIP image preprocessing as a Keras layer that reproduces OpenAI's PIL pipeline.

OpenAI's `clip._transform(n_px)` (and open_clip's `image_transform(n_px,
is_train=False)` for OpenAI models) is, on a PIL image:

    Resize(n_px, BICUBIC) -> CenterCrop(n_px) -> convert("RGB") -> ToTensor -> Normalize

This module does the same with TensorFlow core ops only (no `py_function`), so it
runs in `tf.function`, `tf.data` and SavedModels. It is built to agree with PIL
bit for bit rather than approximately:

* JPEGs are decoded with libjpeg's ISLOW IDCT (`dct_method="INTEGER_ACCURATE"`),
  the one PIL uses; TensorFlow's default IDCT differs by up to 4 levels.
* The resize is PIL's `ImagingResample` re-implemented: the same bicubic
  coefficients (Keys, a=-0.5, support scaled by the downscale factor), quantised
  to 22-bit fixed point, a horizontal pass rounded and clipped to uint8, then a
  vertical pass. The integer sums are computed exactly in float64.
  `tf.image.resize(method="bicubic", antialias=True)` uses the same kernel but
  keeps float precision between passes: on Flickr8k upscaled to 336, 23% of
  output values differ from PIL, nearly all by one level, up to 16 levels at
  high-contrast edges where PIL clips the intermediate pass.
* PIL picks the filter from the image mode, and OpenAI's pipeline resizes before
  `convert("RGB")`: palette ("P") and bilevel ("1") images are resized with
  NEAREST (PIL ignores the requested filter for them), and RGBA/LA images are
  resized on premultiplied alpha. The mode is read from the file header (PNG
  colour type, GIF palette, BMP depth, WebP alpha flag) and the matching path is
  used.

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

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2 as _attr_value_pb2

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

SUPPORTED_FORMATS = "JPEG/PNG/GIF/BMP/WebP"

# How PIL's `Image.resize` treats an image, decided by its PIL mode.
RESAMPLE_BICUBIC = 0  # "RGB", "L", "CMYK": two-pass 8-bit bicubic.
RESAMPLE_NEAREST = 1  # "P", "1": PIL forces NEAREST for palette/bilevel images.
RESAMPLE_PREMULTIPLIED = 2  # "RGBA", "LA": bicubic on premultiplied alpha.

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

# PIL Resample.c: 32 bits - 8 bits of pixel - 2 bits of headroom.
_PRECISION_BITS = 22

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
    rgba, _ = _decode_rgba(image_bytes, limits=_Limits(validate_max_pixels(max_pixels)))
    return rgba[..., :3]


# --------------------------------------------------------------------------
# PIL's resampling, exactly
# --------------------------------------------------------------------------


def _trunc(x):
    """C's `(int)` cast: rounds toward zero (values stay float64)."""
    return tf.cast(tf.cast(x, tf.int64), tf.float64)


def _bicubic_kernel(x):
    """PIL's `bicubic_filter` (Keys, a = -0.5), same operation order."""
    a = -0.5
    x = tf.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _bicubic_coefficients(in_size, out_size):
    """PIL's `precompute_coeffs` + `normalize_coeffs_8bpc`, as a sparse matrix.

    Output pixel `xx` reads input pixels `xmin .. xmax - 1` around its center, with
    weights normalised to sum to 1, then scaled by 2**22 and rounded half away
    from zero to integers, in PIL's operation order.

    Returns:
        `tf.sparse.SparseTensor` float64 `(out_size, in_size)` of those integers.
    """
    in_f = tf.cast(in_size, tf.float64)
    scale = in_f / tf.cast(out_size, tf.float64)
    filterscale = tf.maximum(scale, 1.0)
    support = 2.0 * filterscale  # bicubic support is 2 input pixels, widened to downscale
    ksize = 2 * tf.cast(tf.math.ceil(support), tf.int32) + 1
    inverse = 1.0 / filterscale
    center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale  # (out,)
    xmin = tf.maximum(_trunc(center - support + 0.5), 0.0)  # (out,)
    xmax = tf.minimum(_trunc(center + support + 0.5), in_f)
    x = xmin[:, None] + tf.range(ksize, dtype=tf.float64)[None, :]  # (out, ksize)
    valid = x < xmax[:, None]
    weights = _bicubic_kernel(((x - center[:, None]) + 0.5) * inverse)
    weights = tf.where(valid, weights, tf.zeros_like(weights))
    total = tf.reduce_sum(weights, axis=1, keepdims=True)
    weights = tf.where(tf.not_equal(total, 0.0), weights / total, weights)
    scaled = weights * float(1 << _PRECISION_BITS)
    fixed = tf.where(weights < 0.0, _trunc(scaled - 0.5), _trunc(scaled + 0.5))
    rows = tf.broadcast_to(tf.range(out_size, dtype=tf.int64)[:, None], tf.shape(x))
    cols = tf.cast(x, tf.int64)
    indices = tf.stack([tf.boolean_mask(rows, valid), tf.boolean_mask(cols, valid)], axis=1)
    dense_shape = tf.cast(tf.stack([out_size, in_size]), tf.int64)
    return tf.sparse.SparseTensor(indices, tf.boolean_mask(fixed, valid), dense_shape)


def _resample_axis(images, out_size, axis):
    """One PIL 8-bit bicubic pass along `axis` of float64 (B, H, W, C) levels."""
    in_size = tf.shape(images)[axis]

    def resample():
        perm = [axis] + [d for d in range(4) if d != axis]
        moved = tf.transpose(images, perm)  # (in, ...)
        rest = tf.shape(moved)[1:]
        flat = tf.reshape(moved, [in_size, -1])  # (in, M)
        coefficients = _bicubic_coefficients(in_size, out_size)
        # Integer products below 2**31, sums far below 2**53: exact in float64.
        sums = tf.sparse.sparse_dense_matmul(coefficients, flat)  # (out, M)
        levels = tf.floor((sums + float(1 << (_PRECISION_BITS - 1))) / float(1 << _PRECISION_BITS))
        levels = tf.clip_by_value(levels, 0.0, 255.0)
        levels = tf.reshape(levels, tf.concat([[out_size], rest], 0))
        return tf.transpose(levels, tf.math.invert_permutation(perm))

    return tf.cond(tf.equal(in_size, out_size), lambda: images, resample)


def _resize_bicubic(images, height, width):
    """PIL `resize(BICUBIC)` of uint8-valued float64 (B, H, W, C): width first."""
    return _resample_axis(_resample_axis(images, width, axis=2), height, axis=1)


def _nearest_indices(in_size, out_size):
    """PIL `ImagingScaleAffine` source indices, by the same repeated addition."""
    step = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    first = step * 0.5
    steps = tf.zeros([out_size - 1], tf.float64)
    positions = tf.scan(lambda previous, _: previous + step, steps, initializer=first)
    positions = tf.concat([[first], positions], axis=0)  # (out,)
    indices = tf.cast(positions, tf.int32)  # COORD(): positions are >= 0
    return indices, indices < in_size


def _resize_nearest(images, height, width):
    """PIL `resize(NEAREST)` of (B, H, W, C); out-of-range samples are 0 as in PIL."""

    def resize():
        rows, row_ok = _nearest_indices(tf.shape(images)[1], height)
        cols, col_ok = _nearest_indices(tf.shape(images)[2], width)
        out = tf.gather(tf.gather(images, tf.minimum(rows, tf.shape(images)[1] - 1), axis=1),
                        tf.minimum(cols, tf.shape(images)[2] - 1), axis=2)
        valid = tf.cast(row_ok[:, None] & col_ok[None, :], images.dtype)[None, :, :, None]
        return out * valid

    same = tf.equal(tf.shape(images)[1], height) & tf.equal(tf.shape(images)[2], width)
    return tf.cond(same, lambda: images, resize)


def _premultiply(rgba):
    """PIL `RGBA -> RGBa`: MULDIV255 rounding, int32 (B, H, W, 4)."""
    alpha = rgba[..., 3:]
    product = rgba[..., :3] * alpha + 128
    rgb = tf.bitwise.right_shift(tf.bitwise.right_shift(product, 8) + product, 8)
    return tf.concat([rgb, alpha], axis=-1)


def _unpremultiply(rgba):
    """PIL `RGBa -> RGBA`: integer division, kept as is for alpha 0 and 255."""
    alpha = rgba[..., 3:]
    keep = tf.equal(alpha, 0) | tf.equal(alpha, 255)
    divided = tf.minimum((255 * rgba[..., :3]) // tf.maximum(alpha, 1), 255)
    return tf.concat([tf.where(keep, rgba[..., :3], divided), alpha], axis=-1)


def _shortest_side_size(height, width, image_size):
    """torchvision `_compute_resized_output_size(size=[image_size])`."""
    short = tf.minimum(height, width)
    long = tf.maximum(height, width)
    # Python's int(n * long / short): exact product, correctly rounded division,
    # truncation.
    new_long = tf.cast(
        tf.cast(image_size * long, tf.float64) / tf.cast(short, tf.float64), tf.int64
    )
    new_long = tf.cast(new_long, tf.int32)
    portrait = width <= height
    new_height = tf.where(portrait, new_long, image_size)
    new_width = tf.where(portrait, image_size, new_long)
    return new_height, new_width


def _center_crop(images, image_size):
    """torchvision `center_crop`: offsets int(round((size - crop) / 2.0)), half to even."""
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    top = tf.cast(tf.round(tf.cast(height - image_size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(width - image_size, tf.float64) / 2.0), tf.int32)
    return images[:, top : top + image_size, left : left + image_size, :]


def _resize_and_center_crop_batch(images, image_size, resample):
    """(B, H, W, C) integer levels -> (B, image_size, image_size, 3) uint8.

    `resample` is a Python or tensor `RESAMPLE_*` value.
    """
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    new_height, new_width = _shortest_side_size(height, width, image_size)
    channels = images.shape[-1]

    def bicubic():
        levels = tf.cast(images[..., :3], tf.float64)
        return tf.cast(_resize_bicubic(levels, new_height, new_width), tf.int32)

    def nearest():
        return _resize_nearest(tf.cast(images[..., :3], tf.int32), new_height, new_width)

    def premultiplied():
        if channels != 4:
            return bicubic()
        levels = tf.cast(_premultiply(tf.cast(images, tf.int32)), tf.float64)
        resized = tf.cast(_resize_bicubic(levels, new_height, new_width), tf.int32)
        return _unpremultiply(resized)[..., :3]

    branches = {
        RESAMPLE_BICUBIC: bicubic,
        RESAMPLE_NEAREST: nearest,
        RESAMPLE_PREMULTIPLIED: premultiplied,
    }
    if isinstance(resample, int):
        resize = branches[resample]
    else:
        resize = lambda: tf.switch_case(resample, [branches[i] for i in range(3)])  # noqa: E731
    # PIL returns a copy when the size is unchanged, before any premultiplication
    # (which is lossy for partial alpha).
    unchanged = tf.equal(new_height, height) & tf.equal(new_width, width)
    resized = tf.cond(unchanged, lambda: tf.cast(images[..., :3], tf.int32), resize)
    cropped = _center_crop(resized, image_size)
    cropped = tf.ensure_shape(cropped, [None, image_size, image_size, 3])
    return tf.cast(cropped, tf.uint8)


def resize_and_center_crop(image, image_size, resample="bicubic"):
    """OpenAI's `Resize(image_size, BICUBIC)` + `CenterCrop(image_size)`, as PIL does it.

    The shortest side becomes `image_size` and the long side
    `int(image_size * long / short)` (torchvision's arithmetic), with PIL's
    two-pass 8-bit bicubic resampling reproduced exactly; no resampling happens
    when the size is unchanged. The crop offsets are torchvision's
    `int(round((size - image_size) / 2.0))`.

    Args:
        image: integer pixels, `(H, W, C)` or `(B, H, W, C)` with `C` 3 (RGB) or
            4 (RGBA: resized on premultiplied alpha like PIL, alpha then dropped).
        image_size: int, output side.
        resample: `"bicubic"` (PIL modes RGB/L/RGBA) or `"nearest"` (what PIL does
            for palette and bilevel images whatever filter is asked for).

    Returns:
        `uint8` tensor `(image_size, image_size, 3)`, or `(B, image_size,
        image_size, 3)` for batched input.
    """
    image = tf.convert_to_tensor(image)
    if not image.dtype.is_integer:
        raise ValueError(
            "`image` must hold integer pixel levels in [0, 255] (uint8). "
            f"Received: dtype={image.dtype.name}"
        )
    if image.shape.rank not in (3, 4) or image.shape[-1] not in (3, 4):
        raise ValueError(
            "`image` must have shape (H, W, 3|4) or (B, H, W, 3|4). "
            f"Received: shape={image.shape}"
        )
    if resample not in ("bicubic", "nearest"):
        raise ValueError(
            f"`resample` must be 'bicubic' or 'nearest'. Received: resample={resample!r}"
        )
    unbatched = image.shape.rank == 3
    images = image[None] if unbatched else image
    images = tf.clip_by_value(tf.cast(images, tf.int32), 0, 255)
    if resample == "nearest":
        mode = RESAMPLE_NEAREST
    else:
        mode = RESAMPLE_PREMULTIPLIED if images.shape[-1] == 4 else RESAMPLE_BICUBIC
    out = _resize_and_center_crop_batch(images, int(image_size), mode)
    return out[0] if unbatched else out


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

    def _preprocess_bytes(self, image_bytes, index=None):
        """One encoded image -> (image_size, image_size, 3) uint8."""
        rgba, mode = _decode_rgba(image_bytes, index, _Limits(self.max_pixels, self.image_size))
        return _resize_and_center_crop_batch(rgba[None], self.image_size, mode)[0]

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
            return self._normalize(self._preprocess_bytes(inputs))
        indices = tf.range(tf.shape(inputs)[0])
        pixels = tf.map_fn(
            lambda args: self._preprocess_bytes(args[0], args[1]),
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
