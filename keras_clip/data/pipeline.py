"""`tf.data` input pipelines for CLIP training and evaluation.

Every reader returns a `tf.data.Dataset` of dicts

    {"images": float32 (B, S, S, 3), normalised,
     "token_ids": int32 (B, T)}

(plus `"keys"`, tf.string (B,), with `return_keys=True`), built from the same
stages, with no Python in the per-example path:

    source records (per-worker shard)
      -> [training] zip with a per-element random seed, shuffle encoded records
      -> [repeat] a pass marker after every pass; repeat: every pass reshuffled
         and redrawn
      -> number this pipeline's records (its stream position, drops included),
         deal blocks out to the pipelines, drop positions < skip_records
      -> parse, pick a caption, drop blank captions and non-images  (in order)
      -> number the records consecutively, then one sentinel record
      -> read the header's size (too large: not decoded), decode + augment
         (training) or CLIPImagePreprocessor (eval)  (parallel, order-preserving)
      -> ignore_errors()  (drops images that fail to decode)
      -> count the gaps in the numbering as decode failures and the images
         too large to decode, drop both and the sentinel
      -> [repeat] raise if a whole pass (marker to marker) held no usable example
      -> batch -> tokenize (CLIPTokenizer, on the batch) -> prefetch

Randomness. With `seed` set, everything is reproducible: the file order, the
record order, the caption picked for each multi-caption image and the crop. The
per-element seed is drawn from `tf.data.Dataset.random` *before* the shuffle, so
it travels with its record: a run resumed with `skip_records` sees the same
remaining examples with the same captions and crops. Each new iteration over the
same dataset object (a Keras epoch) reshuffles and redraws, reproducibly; a new
dataset object starts again from the first stream. A trainer therefore builds one
`repeat=True` dataset for the whole run and resumes at step `n` with
`skip_records` = the records that `n` steps consumed: skipping happens before
parsing, over shuffled indices and seeds only, so it is cheap even many passes in.

Bad records never reach the model and never stop training; see
`PipelineCounters` for how they are counted.
"""

import dataclasses
import os
import struct
import zlib

import numpy as np
import tensorflow as tf
from absl import logging

from keras_clip.data import augment
from keras_clip.data import shards
from keras_clip.data.spec import TABLE, TFRECORD, DataSpec
from keras_clip.preprocessing.image_preprocessor import DEFAULT_MAX_PIXELS
from keras_clip.preprocessing.image_preprocessor import detect_format
from keras_clip.preprocessing.image_preprocessor import OPENAI_MEAN
from keras_clip.preprocessing.image_preprocessor import OPENAI_STD
from keras_clip.preprocessing.image_preprocessor import CLIPImagePreprocessor
from keras_clip.preprocessing.text_cleaning import blank_mask, is_blank
from keras_clip.preprocessing.tokenizer import traced_tokenizer

DEFAULT_SHUFFLE_BUFFER = 5000

# TFRecord features that may hold the image: img2dataset names the feature after
# its encode format. The first non-empty one is used.
_IMAGE_FEATURES = (shards.IMAGE_FEATURE, "jpeg", "png", "webp")

# Purposes of the seeds derived from `seed`.
_FILE_SHUFFLE, _RECORD_SHUFFLE, _ELEMENT_SEEDS = 0, 1, 2

# Interleaving this many files at once; fixed (not AUTOTUNE) so the record order
# for a given seed does not depend on the machine's core count.
_MAX_CYCLE_LENGTH = 16

_COUNTER_NAMES = (
    "records_read", "empty_captions", "not_images", "too_large", "decode_failures", "examples_out"
)


def _encode_png(height, width):
    """A valid 8-bit RGB PNG of mid-grey pixels, built without an image library."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    rows = b"".join(b"\0" + b"\x80" * (3 * width) for _ in range(height))  # filter 0, then pixels
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# Decoded after the last real record of every stream so that the decode-failure
# count also sees failures at the very end; never batched.
_SENTINEL_PNG = _encode_png(8, 8)


# --------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------


class PipelineCounters:
    """Counts of what an input pipeline read, dropped and delivered.

    Holds int64 `tf.Variable`s that the dataset functions increment with
    `assign_add` while the pipeline runs. Counts accumulate over every iteration
    of every dataset given this object (a new object starts from zero); each
    worker of a multi-worker job has its own.

    * `records_read`: records that entered parsing, after `skip_records`.
    * `empty_captions`: records dropped because no caption is left after
      removing blank (empty or whitespace-only) ones.
    * `not_images`: records dropped because their bytes start with no JPEG,
      PNG, GIF, BMP or WebP signature.
    * `too_large`: images dropped because their header declares more pixels
      than `CLIPImagePreprocessor.max_pixels` (see
      `CLIPImagePreprocessor.is_too_large`); nothing of them is decoded.
    * `decode_failures`: records with a valid signature whose decoding or
      augmentation failed (e.g. a truncated JPEG; such elements are dropped by
      `Dataset.ignore_errors()`). Exact: the records reaching the decoder are
      numbered consecutively, the decoder keeps their order, and a failure is
      counted when a later record (or the sentinel that follows the last one)
      comes out of it, as the gap in the numbering. Elements still being
      decoded when an iterator is abandoned (mid-epoch, at a step limit) are
      therefore not counted, whatever their outcome.
    * `examples_out`: examples in the batches the pipeline produced.

    Once a dataset is drained, `records_read == empty_captions + not_images +
    too_large + decode_failures + examples_out + dropped`, where `dropped` is the remainder
    that `drop_remainder=True` leaves out of the last training batch (fewer
    than one batch).

    The same `ignore_errors()` also drops, uncounted, whatever fails before the
    signature check: a TFRecord entry that does not parse, an image file that
    disappeared since `csv_dataset` was built, and the rest of a truncated or
    corrupt TFRecord shard (reading stops at the damage; other shards go on).

    Create it outside any `tf.distribute.Strategy.scope()`: the counters are
    host-side bookkeeping, not model state.

    Example:

    >>> counters = PipelineCounters()
    >>> dataset = tfrecord_dataset("shards/*.tfrecord", batch_size=32, counters=counters)
    >>> for batch in dataset:
    ...     pass
    >>> counters.as_dict()["decode_failures"]
    0
    """

    def __init__(self):
        if tf.distribute.has_strategy():
            raise ValueError(
                "Create `PipelineCounters` outside `strategy.scope()`: its variables "
                "are updated by tf.data on the host and must not be mirrored."
            )
        with tf.init_scope(), tf.device("/cpu:0"):
            def counter(name):
                return tf.Variable(0, dtype=tf.int64, trainable=False, name=name)

            self.records_read = counter("records_read")
            self.empty_captions = counter("empty_captions")
            self.not_images = counter("not_images")
            self.too_large = counter("too_large")
            self.decode_failures = counter("decode_failures")
            self.examples_out = counter("examples_out")

    def as_dict(self):
        """The six counts as a dict of Python ints, in a fixed order."""
        return {name: int(getattr(self, name).numpy()) for name in _COUNTER_NAMES}

def _add(counters, name, amount):
    """`counters.<name> += amount` as an op; a no-op without counters."""
    if counters is None:
        return tf.no_op()
    return getattr(counters, name).assign_add(tf.cast(amount, tf.int64))


# --------------------------------------------------------------------------
# Per-element helpers
# --------------------------------------------------------------------------


def looks_like_image(image_bytes):
    """Whether scalar `tf.string` bytes start with a JPEG/PNG/GIF/BMP/WebP signature.

    Reads only the first bytes (`image_preprocessor.detect_format`, the decoder's
    own table), so it is cheap to run before decoding.

    Args:
        image_bytes: scalar `tf.string`.

    Returns:
        Scalar `tf.bool`.
    """
    return detect_format(image_bytes) >= 0


def _choose_caption(captions, seed, training):
    """One non-blank caption of `captions` (1-D): uniform (training) or the first.

    Returns:
        `(caption, found)`: scalar tf.string (empty when none) and tf.bool.
    """
    kept = tf.boolean_mask(captions, ~blank_mask(captions))  # (n,)
    count = tf.size(kept)
    if training:
        index = tf.random.stateless_uniform([], seed, 0, tf.maximum(count, 1), dtype=tf.int32)
    else:
        index = tf.constant(0)
    caption = tf.concat([kept, tf.constant([""])], axis=0)[index]
    return caption, count > 0


def _derive_seed(seed, purpose):
    """An independent 31-bit seed for one purpose; None without a seed."""
    if seed is None:
        return None
    state = np.random.SeedSequence([seed, purpose]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


# --------------------------------------------------------------------------
# The shared pipeline
# --------------------------------------------------------------------------


def _validate(batch_size, image_size, context_length, seed, shuffle_buffer, skip_records):
    for name, value, minimum in (
        ("batch_size", batch_size, 1),
        ("image_size", image_size, 1),
        ("context_length", context_length, 2),
        ("shuffle_buffer", shuffle_buffer, 1),
        ("skip_records", skip_records, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"`seed` must be None or a non-negative integer. Received: seed={seed!r}")


EMPTY_STREAM_ERROR = "No usable record in a whole pass"


def _placeholder(spec):
    """A value of structure `spec` (zeros, empty strings): the pass marker's record."""
    return tf.nest.map_structure(
        lambda s: tf.zeros([d if d is not None else 0 for d in s.shape], s.dtype), spec)


def _empty_pass_message(data_name, pass_records, counters):
    """The error of a stream in which a whole pass produced no usable example."""
    text = f"{EMPTY_STREAM_ERROR} over {data_name or 'the data'}: " + "{} records were read and all dropped"
    values = [pass_records]
    if counters is not None:
        text += " (counts so far: " + ", ".join(f"{name}={{}}" for name in _COUNTER_NAMES) + ")"
        values += [getattr(counters, name).read_value() for name in _COUNTER_NAMES]
    text += ". Check that the records hold images and captions in the expected format."
    return tf.strings.format(text, values)


def _sharding(input_context, batch_size):
    """`(num_pipelines, pipeline_id, per_replica_batch_size)`."""
    if input_context is None:
        return 1, 0, batch_size
    return (
        input_context.num_input_pipelines,
        input_context.input_pipeline_id,
        input_context.get_per_replica_batch_size(batch_size),
    )


# Every stage function (and what it calls: the readers' `extract`, the decoder) uses
# TensorFlow control flow explicitly, so AutoGraph's conversion is skipped: it cost
# about 2 s of every pipeline build.
_no_autograph = tf.autograph.experimental.do_not_convert


def _build_pipeline(source, extract, options, batch_size, element_shards=(1, 0), data_name=""):
    """Everything after the source; see the module docstring.

    Args:
        source: `tf.data.Dataset` of raw per-worker records.
        extract: function of one record -> `(image_bytes, captions, key)`: scalar
            tf.string, 1-D tf.string, scalar tf.string. May read files.
        batch_size: per-replica batch size.
        element_shards: `(num_pipelines, pipeline_id)` when sharding by element.
            Records are dealt out in blocks of `batch_size` *after* the per-element
            seeds and the shuffle, so with equal seeds every step's global batch
            holds exactly the examples (and crops, and captions) that one process
            reading everything with the global batch size would put in it.
        options: the `ReaderOptions`.
        data_name: what the records come from, for error messages.
    """
    training, seed, shuffle_buffer = options.training, options.seed, options.shuffle_buffer
    skip_records, repeat, counters = options.skip_records, options.repeat, options.counters
    image_size, scale = options.image_size, options.scale
    return_keys, return_positions = options.return_keys, options.return_positions
    if element_shards[0] > 1 and seed is None:
        # Every pipeline must shuffle identically before dealing out blocks.
        seed = 0
        logging.info("Sharding by element without a seed: using seed 0 on every pipeline.")
    deterministic = seed is not None or not training
    parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    # Counting decode failures as gaps in the numbering needs the order kept.
    in_order = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    preprocessor = CLIPImagePreprocessor(image_size=image_size, mean=options.mean, std=options.std,
                                         max_pixels=options.max_pixels, dtype="float32")
    tokenizer = traced_tokenizer(int(options.context_length))

    if training:
        element_seeds = tf.data.Dataset.random(
            seed=_derive_seed(seed, _ELEMENT_SEEDS), rerandomize_each_iteration=True
        )
        dataset = tf.data.Dataset.zip((source, element_seeds))
        dataset = dataset.shuffle(
            shuffle_buffer, seed=_derive_seed(seed, _RECORD_SHUFFLE), reshuffle_each_iteration=True
        )
    else:
        dataset = source.map(_no_autograph(lambda record: (record, tf.constant(0, tf.int64))))
    dataset = dataset.map(_no_autograph(lambda record, element_seed: (record, element_seed, tf.constant(False))))
    if repeat:
        # A pass marker ends every pass, so that a stream in which no record is
        # usable is detected (below) instead of being repeated forever. Each pass
        # re-iterates the shuffle and the seed stream, so it is reshuffled and
        # redrawn, reproducibly: the whole infinite stream is fixed by `seed`.
        marker = (_placeholder(source.element_spec), tf.constant(0, tf.int64), tf.constant(True))
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(marker)).repeat()
    num_shards, shard_id = element_shards

    def deal(state, element):
        # Numbers this pipeline's records (its position in the stream, drops
        # included) and deals blocks of `batch_size` records out to the
        # pipelines; markers go to every pipeline, carrying the pass's size.
        seen, position, in_pass = state
        record, element_seed, is_marker = element
        mine = is_marker | ((seen // batch_size) % num_shards == shard_id)
        counted = tf.cast(mine & ~is_marker, tf.int64)
        pass_records = tf.where(is_marker, in_pass, tf.constant(0, tf.int64))
        state = (seen + tf.cast(~is_marker, tf.int64), position + counted,
                 tf.where(is_marker, tf.constant(0, tf.int64), in_pass + counted))
        return state, (record, element_seed, is_marker, position, pass_records, mine)

    zero = tf.constant(0, tf.int64)
    dataset = dataset.scan((zero, zero, zero), _no_autograph(deal))
    # Skipping by position (rather than `skip()`) counts only this pipeline's
    # records, never the markers.
    dataset = dataset.filter(_no_autograph(lambda record, seed_, is_marker, position, pass_records, mine: (
        mine & (position >= skip_records))))

    def parse_marker():
        return {"image_bytes": tf.constant(_SENTINEL_PNG), "caption": tf.constant(""), "key": tf.constant(""),
                "seed": tf.zeros([2], tf.int64), "keep": tf.constant(True)}

    def parse(record, element_seed, is_marker, position, pass_records, mine):
        del mine
        example = tf.cond(is_marker, parse_marker, lambda: parse_record(record, element_seed))
        example.update(sentinel=is_marker, position=position, pass_records=pass_records)
        return example

    def parse_record(record, element_seed):
        caption_seed, crop_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.stack([element_seed, tf.constant(0, tf.int64)]), 2)
        )
        image_bytes, captions, key = extract(record)
        caption, has_caption = _choose_caption(tf.reshape(captions, [-1]), caption_seed, training)
        is_image = looks_like_image(image_bytes)
        updates = [
            _add(counters, "records_read", 1),
            _add(counters, "empty_captions", tf.cast(~has_caption, tf.int64)),
            _add(counters, "not_images", tf.cast(has_caption & ~is_image, tf.int64)),
        ]
        with tf.control_dependencies(updates):
            keep = tf.identity(has_caption & is_image)
        return {"image_bytes": image_bytes, "caption": caption, "key": key, "seed": crop_seed, "keep": keep}

    sentinel = tf.data.Dataset.from_tensors({
        "image_bytes": tf.constant(_SENTINEL_PNG), "caption": tf.constant(""), "key": tf.constant(""),
        "seed": tf.zeros([2], tf.int64), "keep": tf.constant(True), "sentinel": tf.constant(True),
        "position": tf.constant(-1, tf.int64), "pass_records": tf.constant(0, tf.int64),
    })

    def number(next_index, example):
        # A scan rather than `enumerate()`: an upstream error (a TFRecord entry
        # that does not parse, a vanished file) skips it, so takes no number.
        return next_index + 1, (next_index, example)

    def decode(index, example):
        image_bytes = example["image_bytes"]
        # The size check shares the decoder's stage: libjpeg's header reader is
        # several times cheaper than walking JPEG segments in-graph, and a header
        # it cannot read would fail decoding (a counted gap) anyway. Training
        # crops before resizing, so only the declared size matters there.
        too_large = preprocessor.is_too_large(
            image_bytes, check_resize=not training, jpeg_header_reader="libjpeg"
        )

        def transform():
            if training:
                return augment.train_transform(image_bytes, example["seed"], preprocessor, scale=scale)
            return preprocessor(image_bytes)

        image = tf.cond(too_large, lambda: tf.zeros([image_size, image_size, 3], tf.float32), transform)
        decoded = {"images": tf.ensure_shape(image, [image_size, image_size, 3]), "captions": example["caption"],
                   "keys": example["key"], "positions": example["position"]}
        return index, example["sentinel"], too_large, example["pass_records"], decoded

    def account(state, element):
        # One sequential pass over the decoder's output (a stage per concern
        # costs throughput): count the gaps in the numbering as decode failures
        # and the images too large to decode, and, with `repeat`, check passes.
        # Markers end passes: a whole pass without one usable example would
        # otherwise repeat forever without a batch. `complete`: the current pass
        # was seen from its start (a resumed stream starts mid-pass).
        last_index, usable, complete = state
        index, is_sentinel, too_large, pass_records, decoded = element
        # Numbers last_index + 1 .. index - 1 failed to decode.
        updates = [_add(counters, "decode_failures", index - last_index - 1),
                   _add(counters, "too_large", tf.cast(too_large, tf.int64))]
        if repeat:
            empty = is_sentinel & complete & tf.equal(usable, 0)
            updates.append(tf.debugging.Assert(~empty, [_empty_pass_message(data_name, pass_records, counters)]))
        with tf.control_dependencies(updates):
            drop = tf.identity(is_sentinel | too_large)
        usable = tf.where(is_sentinel, tf.constant(0, tf.int64), usable + tf.cast(~too_large, tf.int64))
        return (index, usable, complete | is_sentinel), (drop, decoded)

    def tokenize(drop, batch):
        del drop  # all False: dropped elements were filtered out
        token_ids = tokenizer(batch["captions"])  # (B, T)
        with tf.control_dependencies([_add(counters, "examples_out", tf.shape(token_ids)[0])]):
            outputs = {"images": tf.identity(batch["images"]), "token_ids": tf.identity(token_ids)}
        if return_keys:
            outputs["keys"] = batch["keys"]
        if return_positions:
            outputs["positions"] = batch["positions"]
        return outputs

    # In order: markers must stay behind the records of their pass.
    dataset = dataset.map(_no_autograph(parse), **in_order)
    dataset = dataset.filter(_no_autograph(lambda example: example["keep"]))
    dataset = dataset.concatenate(sentinel)
    dataset = dataset.scan(tf.constant(0, tf.int64), _no_autograph(number))
    dataset = dataset.map(_no_autograph(decode), **in_order)
    dataset = dataset.ignore_errors()
    dataset = dataset.scan((tf.constant(-1, tf.int64), zero, tf.constant(skip_records == 0)), _no_autograph(account))
    dataset = dataset.filter(_no_autograph(lambda drop, decoded: ~drop))
    dataset = dataset.batch(batch_size, drop_remainder=training, **parallel)
    dataset = dataset.map(_no_autograph(tokenize), **parallel)
    if repeat:
        # filter() and ignore_errors() hide that the stream never ends; a multi-worker
        # strategy would then fetch optionals and lose the static batch size.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    return dataset.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ReaderOptions:
    """What every reader (`tfrecord_dataset`, `csv_dataset`, `tfds_dataset`) takes
    besides its source; each reader accepts an instance and/or these fields as
    keyword arguments.

    Attributes:
        batch_size: int, the global batch size; with `input_context`, each
            pipeline batches `input_context.get_per_replica_batch_size(batch_size)`.
        image_size: int, side of the square output images.
        context_length: int, token sequence length.
        training: bool. True: shuffle records, pick a random caption per
            multi-caption image, RandomResizedCrop(scale) + normalise, and drop
            the last partial batch. False: keep the record order, take each
            image's first non-blank caption, preprocess exactly as
            `CLIPImagePreprocessor` (resize, center crop, normalise), keep the
            last partial batch.
        seed: optional non-negative int. With a seed, record order, captions and
            crops are reproducible and the parallel maps are deterministic.
        shuffle_buffer: int, records in the shuffle buffer (encoded, so memory
            is about `shuffle_buffer` times the mean file size). Tables
            (`csv_dataset`) shuffle indices, so they always use at least the
            whole table: every pass is a uniform permutation.
        input_context: optional `tf.distribute.InputContext`; the pipeline then
            reads its share (by file when there are at least
            `num_input_pipelines` files, else by element).
        skip_records: int, records to skip after shuffling and before parsing
            (so skipping is cheap), to resume mid-epoch: with the same `seed`,
            the first iteration is the rest of the first iteration of a dataset
            built without skipping; with `repeat`, the rest of the whole stream
            (passes included). These are records, not examples: records
            later dropped as bad count too (`return_positions` gives the exact
            count). Skipped records are not counted in `counters`. With
            `repeat`, a whole pass that yields no usable example (every record
            dropped, or no record at all) raises `tf.errors.InvalidArgumentError`
            starting with "No usable record in a whole pass" instead of looping
            forever (after one pass; after two when resuming mid-pass).
        repeat: bool. Loop over the records forever, each pass reshuffled with new
            captions and crops; with `seed` the whole stream is reproducible, and
            batches run on across passes (only an infinite stream drops nothing).
            One dataset object then serves a whole training run: building one
            (tracing the decoding and tokenizing graphs) takes seconds.
        counters: optional `PipelineCounters` to update.
        mean: 3 floats, normalisation mean (OpenAI's by default).
        std: 3 floats, normalisation standard deviation (OpenAI's by default).
        max_pixels: int, largest image (width x height) decoded; larger ones are
            dropped and counted as `too_large`.
        scale: `(low, high)` crop area range of the training RandomResizedCrop.
        return_keys: bool, also return `"keys"`, tf.string `(B,)`.
        return_positions: bool, also return `"positions"`, int64 `(B,)`: each
            example's position in this pipeline's record stream (counting every
            record, dropped ones too, from the start of the stream). A
            trainer resumes exactly with `skip_records` = the largest position
            consumed + 1.

    Example:

    >>> options = ReaderOptions.of(batch_size=32, preprocessing=model.preprocessor_config)
    >>> dataset = tfrecord_dataset("shards/*.tfrecord", options, seed=0)
    """

    batch_size: int = None
    image_size: int = 224
    context_length: int = 77
    training: bool = True
    seed: int = None
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    input_context: object = None
    skip_records: int = 0
    repeat: bool = False
    counters: object = None
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    max_pixels: int = DEFAULT_MAX_PIXELS
    scale: tuple = augment.DEFAULT_SCALE
    return_keys: bool = False
    return_positions: bool = False

    @classmethod
    def of(cls, options=None, preprocessing=None, **fields):
        """Validated options: `options` (or the defaults), then the sizes, statistics
        and pixel limit of `preprocessing` (a `PreprocessingConfig`), then `fields`.

        Raises:
            TypeError: a field that does not exist.
            ValueError: a value out of range.
        """
        unknown = sorted(set(fields) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"Unknown reader options: {unknown}")
        # Field by field: `dataclasses.asdict` would deep-copy the counters.
        values = {} if options is None else {f.name: getattr(options, f.name) for f in dataclasses.fields(cls)}
        if preprocessing is not None:
            values.update(image_size=preprocessing.image_size, context_length=preprocessing.context_length,
                          mean=preprocessing.mean, std=preprocessing.std,
                          max_pixels=preprocessing.max_image_pixels)
        values.update(fields)
        return cls(**values).validate()

    def validate(self):
        """Returns `self`; raises `ValueError` for a value out of range."""
        _validate(self.batch_size, self.image_size, self.context_length, self.seed, self.shuffle_buffer,
                  self.skip_records)
        return self

    def sharding(self):
        """`(num_pipelines, pipeline_id, per_replica_batch_size)`."""
        return _sharding(self.input_context, self.batch_size)


def _read(source, extract, options, by_element, data_name):
    """The tail every reader shares: the pipeline after its per-worker `source`."""
    num_pipelines, pipeline_id, per_replica_batch = options.sharding()
    element_shards = (num_pipelines, pipeline_id) if by_element else (1, 0)
    return _build_pipeline(source, extract, options, per_replica_batch, element_shards, data_name)


def _split_kwargs(kwargs, cls):
    """`(fields of `cls`, the rest)` of keyword arguments."""
    names = {field.name for field in dataclasses.fields(cls)}
    return ({k: v for k, v in kwargs.items() if k in names},
            {k: v for k, v in kwargs.items() if k not in names})


def _resolve_files(file_pattern_or_list):
    patterns = [file_pattern_or_list] if isinstance(file_pattern_or_list, (str, os.PathLike)) else file_pattern_or_list
    files = []
    for pattern in patterns:
        files.extend(sorted(tf.io.gfile.glob(os.fspath(pattern))))
    files = list(dict.fromkeys(files))
    if not files:
        raise ValueError(f"No files match `file_pattern_or_list`. Received: {file_pattern_or_list!r}")
    return files


def _describe_files(files, limit=3):
    shown = ", ".join(files[:limit])
    return shown + (f", ... {len(files) - limit} more" if len(files) > limit else "")


def _parse_tfrecord(serialized):
    features = {name: tf.io.FixedLenFeature([], tf.string, default_value="") for name in _IMAGE_FEATURES}
    features[shards.CAPTION_FEATURE] = tf.io.FixedLenFeature([], tf.string, default_value="")
    features[shards.KEY_FEATURE] = tf.io.FixedLenFeature([], tf.string, default_value="")
    features[shards.CAPTIONS_FEATURE] = tf.io.VarLenFeature(tf.string)
    parsed = tf.io.parse_single_example(serialized, features)
    image_bytes = parsed[_IMAGE_FEATURES[-1]]
    for name in reversed(_IMAGE_FEATURES[:-1]):
        image_bytes = tf.where(tf.strings.length(parsed[name]) > 0, parsed[name], image_bytes)
    captions = tf.sparse.to_dense(parsed[shards.CAPTIONS_FEATURE])  # (n,)
    captions = tf.cond(
        tf.size(captions) > 0,
        lambda: captions,
        lambda: tf.reshape(parsed[shards.CAPTION_FEATURE], [1]),
    )
    return image_bytes, captions, parsed[shards.KEY_FEATURE]


def tfrecord_dataset(file_pattern_or_list, options=None, **kwargs):
    """Image-caption batches from TFRecord shards in img2dataset's schema.

    Reads `jpg` (or img2dataset's `jpeg`/`png`/`webp`), `txt`, `key` and the
    optional `txts` list (see `keras_clip.data.shards`); with `txts`, one of the
    image's captions is drawn per image per epoch. In training the file order is
    shuffled too (except when sharding by element, where every worker must read
    the files in the same order).

    Args:
        file_pattern_or_list: a glob pattern, a path, or a list of either.
        options: a `ReaderOptions`.
        **kwargs: `ReaderOptions` fields, overriding `options`.

    Returns:
        `tf.data.Dataset` of `{"images": float32 (B, S, S, 3), "token_ids":
        int32 (B, T)}` (and `"keys"` with `return_keys`).

    Example:

    >>> dataset = tfrecord_dataset("/data/flickr8k_train/*.tfrecord",
    ...                            batch_size=128, seed=0)
    >>> batch = next(iter(dataset))
    >>> batch["images"].shape, batch["token_ids"].shape
    (TensorShape([128, 224, 224, 3]), TensorShape([128, 77]))
    """
    options = ReaderOptions.of(options, **kwargs)
    training, seed = options.training, options.seed
    files = _resolve_files(file_pattern_or_list)
    num_pipelines, pipeline_id, per_replica_batch = options.sharding()
    by_file = num_pipelines > 1 and len(files) >= num_pipelines
    by_element = num_pipelines > 1 and not by_file
    if by_file:
        files = files[pipeline_id::num_pipelines]
    logging.info(
        "tfrecord_dataset: %d files for pipeline %d/%d (sharded by %s), per-replica batch %d, training=%s, seed=%s",
        len(files), pipeline_id, num_pipelines, "element" if by_element else "file", per_replica_batch,
        training, seed,
    )
    source = tf.data.Dataset.from_tensor_slices(files)
    if training and not by_element and len(files) > 1:
        source = source.shuffle(
            len(files), seed=_derive_seed(seed, _FILE_SHUFFLE), reshuffle_each_iteration=True
        )
    source = source.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), _MAX_CYCLE_LENGTH),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=by_element or seed is not None or not training,
    )
    return _read(source, _parse_tfrecord, options, by_element,
                 f"{len(files)} TFRecord files ({_describe_files(files)})")


def csv_dataset(csv_path, image_root, options=None, table=None, **kwargs):
    """Image-caption batches read straight from a CSV/TSV and an image folder.

    The table is read once, in Python, when the dataset is built (same rules as
    `shards.convert_csv`: caption grouping, blank captions removed); image
    files that do not exist are left out then and logged. The per-record
    captions and paths become graph constants, so this reader suits small sets
    (up to some hundred thousand rows); convert larger ones to TFRecords.
    Records are shuffled as indices, so files are only read after the shuffle
    and `skip_records`, and the shuffle buffer is at least the whole table (each
    training pass a uniform permutation, whatever `shuffle_buffer` says: a table
    sorted by image and read one row per record would otherwise fill batches with
    captions of the same images). Sharding with `input_context` is always by
    element.

    Args:
        csv_path: path of a `.csv` or `.tsv` file with a header row.
        image_root: folder the image column is relative to.
        image_column: column holding the image file name.
        caption_column: column holding the caption.
        delimiter: field delimiter; `None`: tab for `.tsv`, comma otherwise.
        group_by_image: one record per image with all its captions (one drawn
            per epoch in training) rather than one record per row.
        split_column: optional column to filter rows on (Flickr8k: `"split"`).
        split: value of `split_column` to keep.
        options: a `ReaderOptions`.
        table: a `shards.TableOptions` (the six arguments above; they override it).
        **kwargs: `ReaderOptions` fields (overriding `options`) and the
            `TableOptions` fields above.

    Returns:
        `tf.data.Dataset` of `{"images": float32 (B, S, S, 3), "token_ids":
        int32 (B, T)}` (and `"keys"` with `return_keys`).
    """
    table_fields, kwargs = _split_kwargs(kwargs, shards.TableOptions)
    options = ReaderOptions.of(options, **kwargs)
    table = shards.TableOptions.of(table, **table_fields)
    training, seed = options.training, options.seed
    records, paths, counts, missing = read_table_records(csv_path, image_root, table)
    if not records:
        raise ValueError(f"No usable records in {csv_path} (counts: {counts}, missing images: {missing}).")
    num_pipelines, pipeline_id, per_replica_batch = options.sharding()
    logging.info(
        "csv_dataset: %d records (%s) for pipeline %d/%d, per-replica batch %d, training=%s, seed=%s",
        len(records), counts, pipeline_id, num_pipelines, per_replica_batch, training, seed,
    )
    keys = tf.constant([key for key, _, _ in records])
    path_table = tf.constant(paths)
    flat_captions = tf.constant([caption for _, _, captions in records for caption in captions])
    row_splits = tf.constant(np.cumsum([0] + [len(captions) for _, _, captions in records]), tf.int64)

    def extract(index):
        captions = flat_captions[row_splits[index] : row_splits[index + 1]]
        return tf.io.read_file(path_table[index]), captions, keys[index]

    source = tf.data.Dataset.range(len(records))
    # An index and its element seed are 16 bytes: the whole table fits in the buffer.
    options = ReaderOptions.of(options, shuffle_buffer=max(options.shuffle_buffer, len(records)))
    return _read(source, extract, options, True, f"{len(records)} records of {csv_path}")


def read_table_records(csv_path, image_root, table=None, **table_fields):
    """The records `csv_dataset` reads from a table: `shards.read_caption_table`'s
    records (caption grouping, blank captions removed) whose image file exists.

    Args:
        csv_path: path of the `.csv`/`.tsv` table.
        image_root: folder the image column is relative to.
        table: a `shards.TableOptions`.
        **table_fields: `TableOptions` fields, overriding `table`.

    Returns:
        `(records, paths, counts, missing)`: the kept `(key, image_name, captions)`
        records, their image paths, the table's counts and the number of records
        left out because their image file does not exist.
    """
    records, counts = shards.read_caption_table(os.fspath(csv_path), table, **table_fields)
    paths = [os.path.join(image_root, name) for _, name, _ in records]
    exists = [tf.io.gfile.exists(path) for path in paths]
    missing = exists.count(False)
    if missing:
        logging.warning("csv_dataset: %d of %d image files not found; they are skipped.", missing, len(paths))
    records = [record for record, found in zip(records, exists) if found]
    paths = [path for path, found in zip(paths, exists) if found]
    return records, paths, counts, missing


def _default_caption_key(name, features):
    if name.split("/")[0].split(":")[0] == "coco_captions":
        return "captions/text"
    for candidate in ("caption", "text"):
        if candidate in features:
            return candidate
    raise ValueError(
        f"Cannot tell the caption feature of TFDS dataset {name!r}; pass `caption_key`. "
        f"Available features: {sorted(features)}"
    )


def _get_nested(element, path):
    for part in path.split("/"):
        element = element[part]
    return element


def tfds_dataset(name, split, data_dir=None, options=None, *, image_key="image", caption_key=None, **kwargs):
    """Image-caption batches from an already prepared TFDS dataset.

    The image feature is read undecoded (`tfds.decode.SkipDecoding`) and goes
    through the same decode/augment path as the other readers; the TFDS example
    id (`tfds_id`) serves as the key. Nothing is downloaded or prepared: the
    dataset must already be in `data_dir`.

    Args:
        name: TFDS name, e.g. `"coco_captions"` or `"my_set:1.0.0"`.
        split: split name or TFDS split expression (`"train[:10%]"`).
        data_dir: TFDS data folder (`None`: TFDS's default).
        image_key: feature holding the image (`tfds.features.Image`).
        caption_key: feature holding the caption(s), `/` for nested features;
            a scalar or a sequence of strings. `None`: `"captions/text"` for
            coco_captions, else `"caption"` or `"text"`, whichever exists.
        options: a `ReaderOptions`.
        **kwargs: `ReaderOptions` fields, overriding `options`.

    Returns:
        `tf.data.Dataset` of `{"images": float32 (B, S, S, 3), "token_ids":
        int32 (B, T)}` (and `"keys"` with `return_keys`).
    """
    import tensorflow_datasets as tfds

    options = ReaderOptions.of(options, **kwargs)
    training, seed = options.training, options.seed
    builder = tfds.builder(name, data_dir=data_dir)
    features = builder.info.features
    if caption_key is None:
        caption_key = _default_caption_key(name, features.keys())
    if image_key not in features:
        raise ValueError(f"`image_key` {image_key!r} is not a feature of {name}. Available: {sorted(features)}")
    num_pipelines, pipeline_id, per_replica_batch = options.sharding()
    num_files = builder.info.splits[split].num_shards
    by_file = num_pipelines > 1 and num_files >= num_pipelines
    by_element = num_pipelines > 1 and not by_file
    logging.info(
        "tfds_dataset(%s, %s): %d files, pipeline %d/%d (sharded by %s), per-replica batch %d, "
        "image_key=%s, caption_key=%s, training=%s, seed=%s",
        name, split, num_files, pipeline_id, num_pipelines, "element" if by_element else "file",
        per_replica_batch, image_key, caption_key, training, seed,
    )
    read_config = tfds.ReadConfig(
        shuffle_seed=_derive_seed(seed, _FILE_SHUFFLE),
        input_context=options.input_context if by_file else None,
        add_tfds_id=True,
        try_autocache=False,
    )
    source = builder.as_dataset(
        split=split,
        decoders={image_key: tfds.decode.SkipDecoding()},
        shuffle_files=training and not by_element,
        read_config=read_config,
    )
    def extract(element):
        captions = tf.reshape(_get_nested(element, caption_key), [-1])
        return element[image_key], captions, element["tfds_id"]

    return _read(source, extract, options, by_element, f"TFDS {name} split {split}")


# --------------------------------------------------------------------------
# Evaluation sets held in memory
# --------------------------------------------------------------------------


def load_image_caption_pairs(spec, image_root="", max_images=None, problems=None):
    """Encoded images with *all* their captions, for retrieval evaluation.

    Damaged input does not raise: a TFRecord file is read up to its damage,
    captions with invalid UTF-8 are decoded with U+FFFD replacement characters,
    and what happened is counted in `problems`.

    Args:
        spec: a `DataSpec` or data string: TFRecord pattern/list (img2dataset
            schema, `txts` for several captions per image) or a CSV/TSV path (rows
            grouped by image; with `image_root`).
        image_root: folder of the CSV's image files (for a data string).
        max_images: keep the first this many images (None: all).
        problems: optional dict, updated with counts of what was damaged:
            `damaged_files` (TFRecord files read up to an error),
            `invalid_utf8_captions` (captions repaired), `invalid_utf8_rows`
            (CSV rows repaired).

    Returns:
        `(images, captions)`: list of encoded image bytes and, per image, the list of
        its non-blank captions. Records without an image or a caption are left out.
    """
    problems = {} if problems is None else problems
    images, captions = [], []
    if not isinstance(spec, (str, os.PathLike, DataSpec)):  # a list of TFRecord files
        files = _resolve_files(spec)
    else:
        spec = DataSpec.parse(spec, image_root)
        if spec.kind not in (TABLE, TFRECORD):
            raise ValueError("Image-caption pairs are read from TFRecord files or a CSV/TSV "
                             f"table. Received: spec={spec.text!r}")
        image_root = spec.image_root
        files = None if spec.kind == TABLE else _resolve_files(spec.path)
    if files is None:
        records, counts = shards.read_caption_table(spec.path)
        if counts.get("invalid_utf8_rows"):
            problems["invalid_utf8_rows"] = counts["invalid_utf8_rows"]
        for _, name, texts in records:
            path = os.path.join(image_root, name)
            if tf.io.gfile.exists(path) and texts:
                images.append(tf.io.gfile.GFile(path, "rb").read())
                captions.append(list(texts))
            if max_images and len(images) >= max_images:
                break
        return images, captions
    invalid = 0
    for path in files:
        try:
            for record in tf.data.TFRecordDataset(path):
                image_bytes, raw_texts, _ = _parse_tfrecord(record)
                texts = []
                for raw in raw_texts.numpy():
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        invalid += 1
                        text = raw.decode("utf-8", errors="replace")
                    if not is_blank(text):
                        texts.append(text)
                if texts and looks_like_image(image_bytes):
                    images.append(image_bytes.numpy())
                    captions.append(texts)
                if max_images and len(images) >= max_images:
                    break
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
            problems["damaged_files"] = problems.get("damaged_files", 0) + 1
            logging.warning("%s is damaged (%s); read up to the damage.", path, type(e).__name__)
        if max_images and len(images) >= max_images:
            break
    if invalid:
        problems["invalid_utf8_captions"] = invalid
    return images, captions
