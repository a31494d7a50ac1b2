"""Writing image-caption TFRecord shards, and converting CSV/TSV and WebDataset sets.

Record format: img2dataset's tfrecord schema, one `tf.train.Example` per image:

* `jpg`: bytes, the encoded image file exactly as read (any format the decoder
  accepts -- JPEG, PNG, GIF, BMP, WebP -- despite the feature name, which
  img2dataset also keeps for its default encode format);
* `txt`: bytes, a caption (UTF-8), the first one of the image;
* `key`: bytes, an identifier of the example.

Extension for multi-caption images: `txts`, a bytes list of all captions of the
image, written when an image has more than one. Readers
(`keras_clip.data.pipeline.tfrecord_dataset`) then sample one caption per image
per epoch.

Shards are named `<prefix>-<index>-of-<count>.tfrecord` (five digits each).
Converters never decode images: they copy bytes, so they run at disk speed; the
training pipeline checks signatures and drops undecodable files.
"""

import csv
import dataclasses
import io
import os
import random
import tarfile

import tensorflow as tf
from absl import logging

from keras_clip.preprocessing.text_cleaning import is_blank

IMAGE_FEATURE = "jpg"
CAPTION_FEATURE = "txt"
CAPTIONS_FEATURE = "txts"
KEY_FEATURE = "key"

# WebDataset member extensions holding the image, in order of preference.
WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _bytes(value):
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def serialize_example(key, image_bytes, captions):
    """One image and its captions as a serialised `tf.train.Example`.

    Args:
        key: str or bytes, the example's identifier.
        image_bytes: bytes, the encoded image file.
        captions: non-empty list of str or bytes; the first becomes `txt`, and
            all of them `txts` when there are several.

    Returns:
        bytes, the serialised example.
    """
    if not captions:
        raise ValueError(f"`captions` must hold at least one caption. Received: captions={captions!r} for key={key!r}")
    captions = [_bytes(caption) for caption in captions]

    def feature(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

    features = {
        IMAGE_FEATURE: feature([bytes(image_bytes)]),
        CAPTION_FEATURE: feature([captions[0]]),
        KEY_FEATURE: feature([_bytes(key)]),
    }
    if len(captions) > 1:
        features[CAPTIONS_FEATURE] = feature(captions)
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def write_shards(examples, output_dir, prefix="shard", examples_per_shard=1000):
    """Writes `(key, image_bytes, captions)` examples to TFRecord shards.

    Shards are first written as `<prefix>-<index>.tfrecord.tmp` and renamed to
    `<prefix>-<index>-of-<count>.tfrecord` once the iterable is exhausted, so an
    interrupted run leaves no file that a reader's glob picks up.

    Args:
        examples: iterable of `(key, image_bytes, captions)`, where `captions` is
            a non-empty list of str or bytes.
        output_dir: folder to write to (created if missing).
        prefix: str, file name prefix of the shards.
        examples_per_shard: positive int, records per shard (the last one may
            hold fewer).

    Returns:
        List of the shard paths written, in order.
    """
    if isinstance(examples_per_shard, bool) or not isinstance(examples_per_shard, int) or examples_per_shard <= 0:
        raise ValueError(
            f"`examples_per_shard` must be a positive integer. Received: examples_per_shard={examples_per_shard}"
        )
    tf.io.gfile.makedirs(output_dir)
    temporary_paths = []
    writer = None
    in_shard = 0
    try:
        for key, image_bytes, captions in examples:
            if writer is None or in_shard == examples_per_shard:
                if writer is not None:
                    writer.close()
                path = os.path.join(output_dir, f"{prefix}-{len(temporary_paths):05d}.tfrecord.tmp")
                temporary_paths.append(path)
                writer = tf.io.TFRecordWriter(path)
                in_shard = 0
            writer.write(serialize_example(key, image_bytes, captions))
            in_shard += 1
    finally:
        if writer is not None:
            writer.close()
    count = len(temporary_paths)
    paths = []
    for index, temporary in enumerate(temporary_paths):
        path = os.path.join(output_dir, f"{prefix}-{index:05d}-of-{count:05d}.tfrecord")
        tf.io.gfile.rename(temporary, path, overwrite=True)
        paths.append(path)
    logging.info("Wrote %d shards to %s.", count, output_dir)
    return paths


def _read_rows(path, delimiter):
    """Rows of a CSV/TSV file as dicts; TSV is read unquoted (Flickr8k style)."""
    if delimiter is None:
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    # Invalid UTF-8 (a Latin-1 export, a damaged file) must not stop a run: such
    # bytes become U+FFFD and the rows holding them are counted.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    rows = list(reader)
    columns = reader.fieldnames or []
    invalid = 0
    for row in rows:
        if any(_has_invalid(value) for value in row.values()):
            invalid += 1
            for name, value in row.items():
                row[name] = _repair(value)
    return rows, columns, invalid


def _has_invalid(value):
    if isinstance(value, list):  # extra fields of a ragged row
        return any(_has_invalid(v) for v in value)
    return isinstance(value, str) and any("\udc80" <= c <= "\udcff" for c in value)


def _repair(value):
    if isinstance(value, list):
        return [_repair(v) for v in value]
    if not isinstance(value, str):
        return value
    return value.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class TableOptions:
    """How an image-caption table is read; shared by `read_caption_table`,
    `convert_csv`, `keras_clip.data.pipeline.csv_dataset` and record counting.

    Attributes:
        image_column: column holding the image file name, relative to an image
            root.
        caption_column: column holding the caption.
        delimiter: field delimiter; `None` picks a tab for `.tsv` files and a
            comma otherwise. Tab-separated files are read without quote handling
            (captions may contain `"`, as Flickr8k's do).
        group_by_image: whether all rows of an image become one record (captions
            in file order; one drawn per epoch in training); otherwise every row
            is its own record.
        split_column: optional column to filter rows on (Flickr8k: `"split"`).
        split: the value of `split_column` to keep; required with `split_column`.
    """

    image_column: str = "image"
    caption_column: str = "caption"
    delimiter: str = None
    group_by_image: bool = True
    split_column: str = None
    split: str = None

    @classmethod
    def of(cls, options=None, **fields):
        """Validated options: `options` (or the defaults) with `fields` replaced."""
        options = cls() if options is None else options
        return dataclasses.replace(options, **fields).validate()

    def validate(self):
        """Returns `self`; raises `ValueError` for `split_column` without `split` or
        the reverse."""
        if (self.split_column is None) != (self.split is None):
            raise ValueError(
                "`split_column` and `split` must be given together. "
                f"Received: split_column={self.split_column!r}, split={self.split!r}"
            )
        return self


def read_caption_table(csv_path, options=None, **fields):
    """Reads a CSV/TSV of (image file, caption) rows into per-record caption lists.

    Args:
        csv_path: path of a `.csv` or `.tsv` file with a header row.
        options: a `TableOptions`.
        **fields: `TableOptions` fields, overriding `options`.

    Returns:
        `(records, counts)`: `records` is a list of `(key, image_name, captions)`
        with blank captions removed and records left without captions dropped;
        `counts` is a dict with `rows` (rows kept by the split filter),
        `empty_captions` (blank captions skipped), `records` and
        `invalid_utf8_rows` (rows whose invalid UTF-8 bytes were replaced by
        U+FFFD; they are kept).
    """
    options = TableOptions.of(options, **fields)
    image_column, caption_column = options.image_column, options.caption_column
    split_column, split, group_by_image = options.split_column, options.split, options.group_by_image
    rows, columns, invalid_utf8_rows = _read_rows(csv_path, options.delimiter)
    for name in [image_column, caption_column] + ([split_column] if split_column else []):
        if name not in columns:
            raise ValueError(f"Column {name!r} not found in {csv_path}. Available columns: {columns}")
    if split_column is not None:
        rows = [row for row in rows if row[split_column] == split]

    empty_captions = 0
    groups = {}  # image name -> captions, in first-seen order (dicts keep it).
    records = []
    for row in rows:
        image_name = row[image_column]
        caption = (row[caption_column] or "").strip()
        if is_blank(caption):
            empty_captions += 1
            continue
        if group_by_image:
            groups.setdefault(image_name, []).append(caption)
        else:
            records.append((image_name, caption))
    if group_by_image:
        records = [
            (os.path.splitext(name)[0], name, captions) for name, captions in groups.items() if captions
        ]
    else:
        seen = {}
        keyed = []
        for image_name, caption in records:
            index = seen.get(image_name, 0)
            seen[image_name] = index + 1
            keyed.append((f"{os.path.splitext(image_name)[0]}/{index}", image_name, [caption]))
        records = keyed
    counts = {"rows": len(rows), "empty_captions": empty_captions, "records": len(records),
              "invalid_utf8_rows": invalid_utf8_rows}
    return records, counts


def convert_csv(csv_path, image_root, output_dir, options=None, examples_per_shard=1000, prefix="shard",
                seed=0, **fields):
    """Converts a CSV/TSV of image files and captions to TFRecord shards.

    Flickr8k's `captions.tsv` (columns `image`, `caption_idx`, `split`,
    `caption`) is one such table: with `group_by_image=True` its five captions
    per image become one record with `txts`; with `group_by_image=False` every
    row is a record, and the records are written in an order shuffled with
    `seed`. In a table sorted by image the captions of an image are neighbours,
    and neither the reader's shuffle buffer nor its interleaving of shards
    separates them: read by the training reader (batch 128, shuffle buffer
    2,000), shards of 6,000 images x 5 captions in table order put 8.0 rows of
    every batch with an image already in that batch, shuffled ones 1.06 (a
    uniform order: 1.08; `benchmarks/pair_shard_order.py`).

    Args:
        csv_path: path of a `.csv` or `.tsv` file with a header row.
        image_root: folder that the image column is relative to.
        output_dir: folder to write the shards to.
        options: a `TableOptions` (columns, delimiter, grouping, split).
        examples_per_shard: records per shard.
        prefix: shard file name prefix.
        seed: with `group_by_image=False`, the seed of the order the records
            are written in; `None` keeps the table's order. Grouped records keep
            the table's order.
        **fields: `TableOptions` fields, overriding `options`.

    Returns:
        Dict of counts: `rows` (after the split filter), `written` (records
        written), `missing_images` (records whose image file does not exist),
        `empty_captions` (blank captions skipped; a record with no caption left
        is not written), `shards`.
    """
    options = TableOptions.of(options, **fields)
    records, counts = read_caption_table(csv_path, options)
    if not options.group_by_image and seed is not None:
        random.Random(seed).shuffle(records)
    missing = []

    def examples():
        for key, image_name, captions in records:
            path = os.path.join(image_root, image_name)
            if not tf.io.gfile.exists(path):
                missing.append(path)
                continue
            with tf.io.gfile.GFile(path, "rb") as f:
                image_bytes = f.read()
            yield key, image_bytes, captions

    paths = write_shards(examples(), output_dir, prefix=prefix, examples_per_shard=examples_per_shard)
    result = {
        "rows": counts["rows"],
        "written": counts["records"] - len(missing),
        "missing_images": len(missing),
        "empty_captions": counts["empty_captions"],
        "shards": len(paths),
    }
    if missing:
        logging.warning("%d image files not found, e.g. %s", len(missing), missing[0])
    logging.info("convert_csv(%s): %s", csv_path, result)
    return result


def _split_member_name(name):
    """WebDataset's key/extension split: at the first dot of the base name."""
    directory, base = os.path.split(name)
    stem, dot, extension = base.partition(".")
    return os.path.join(directory, stem) if directory else stem, extension.lower() if dot else ""


def _webdataset_samples(tar_path):
    """Yields `(key, {extension: bytes})` for consecutive members sharing a key."""
    key, members = None, {}
    with tf.io.gfile.GFile(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, extension = _split_member_name(member.name)
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            members[extension] = tar.extractfile(member).read()
    if key is not None:
        yield key, members


def convert_webdataset(tar_paths, output_dir, examples_per_shard=1000, prefix="shard"):
    """Converts WebDataset `.tar` shards to TFRecord shards.

    A sample is the run of consecutive members sharing a key (the member path up
    to the first dot of its base name), as WebDataset groups them. Its image is
    the `jpg`, `jpeg`, `png` or `webp` member (first found in that order), its
    caption the UTF-8 `txt` member, stripped. Members are read with Python's
    `tarfile` in streaming mode; images are copied, never decoded.

    Args:
        tar_paths: a path or list of paths of `.tar` files (any compression
            `tarfile` reads).
        output_dir: folder to write the shards to.
        examples_per_shard: records per shard.
        prefix: shard file name prefix.

    Returns:
        Dict of counts: `samples` (keys seen), `written`, `missing_images`
        (samples without an image member), `empty_captions` (samples whose
        caption is missing or blank), `shards`.
    """
    if isinstance(tar_paths, (str, os.PathLike)):
        tar_paths = [tar_paths]
    counts = {"samples": 0, "written": 0, "missing_images": 0, "empty_captions": 0}

    def examples():
        for tar_path in tar_paths:
            for key, members in _webdataset_samples(os.fspath(tar_path)):
                counts["samples"] += 1
                caption = members.get("txt", b"").decode("utf-8", errors="replace").strip()
                if is_blank(caption):
                    counts["empty_captions"] += 1
                    continue
                image_bytes = next(
                    (members[ext] for ext in WEBDATASET_IMAGE_EXTENSIONS if ext in members), None
                )
                if image_bytes is None:
                    counts["missing_images"] += 1
                    continue
                counts["written"] += 1
                yield key, image_bytes, [caption]

    paths = write_shards(examples(), output_dir, prefix=prefix, examples_per_shard=examples_per_shard)
    counts["shards"] = len(paths)
    logging.info("convert_webdataset(%d tar files): %s", len(tar_paths), counts)
    return counts
