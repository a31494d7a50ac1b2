"""`DataSpec`: the one parsed form of a training or validation data string.

A data spec is one of

    demo                  the generated demo set (`keras_clip.demo_data`), written
                          into the run's folder by the trainer
    <pattern>             TFRecord files in img2dataset's schema (a glob or a path)
    <path>.csv | .tsv     an image-caption table; image paths relative to `image_root`
    tfds:NAME[/SPLIT]     a prepared TFDS dataset (SPLIT defaults to `train`);
                          `image_root` is its `data_dir`

`DataSpec.parse` reads the string once; training (`dataset`), record counting
(`count_records`) and evaluation (`image_caption_pairs`) then take the parsed
spec, so they cannot read the same string differently.

`count_records` counts what the reader feeds into parsing on one pass: every
readable record of the TFRecord files (up to the damage of a damaged one); the
table's records after caption grouping, blank-caption removal and the missing
image rule of `csv_dataset`; a TFDS split's `num_examples` in its `data_dir`.
Records that the pipeline later drops (blank captions in TFRecords, bytes that are
no image, decode failures) are counted by `PipelineCounters` while it runs.
"""
import dataclasses
import os

DEMO, TFRECORD, TABLE, TFDS = "demo", "tfrecord", "table", "tfds"
KINDS = (DEMO, TFRECORD, TABLE, TFDS)
TABLE_SUFFIXES = (".csv", ".tsv")
TFDS_PREFIX = "tfds:"
DEFAULT_TFDS_SPLIT = "train"


@dataclasses.dataclass(frozen=True)
class RecordCount:
    """What `DataSpec.count_records` found.

    Attributes:
        records: int, records the reader parses on one pass.
        problems: dict of what could not be read while counting: `damaged_files`
            (TFRecord path -> records readable before the damage),
            `empty_captions` and `invalid_utf8_rows` (tables); empty when all is well.
    """

    records: int
    problems: dict


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A parsed data spec (see the module docstring for the forms).

    Attributes:
        kind: one of `KINDS`.
        path: TFRecord pattern, table path, or TFDS dataset name ("" for demo).
        split: TFDS split ("" otherwise).
        image_root: folder of a table's image paths, or TFDS `data_dir` ("": default).
        text: the spec string as given.
        group_by_image: tables only: one record per image with all its captions
            (True), or one record per row, i.e. per image-caption pair (False).
            Training reads and counts records this way; evaluation always groups.
    """

    kind: str
    path: str = ""
    split: str = ""
    image_root: str = ""
    text: str = ""
    group_by_image: bool = True

    @classmethod
    def parse(cls, spec, image_root="", default_split=DEFAULT_TFDS_SPLIT, group_by_image=True):
        """The `DataSpec` of a data string (a `DataSpec` is returned unchanged).

        Args:
            spec: the data string (see the module docstring) or a `DataSpec`.
            image_root: folder of a table's image paths, or TFDS `data_dir`.
            default_split: TFDS split of `tfds:NAME` without one (evaluation
                reads `test`).
            group_by_image: see the attribute; False needs a table.

        Raises:
            ValueError: for an empty spec, `tfds:` without a dataset name, or
                `group_by_image=False` for data that is not a table.
        """
        if isinstance(spec, DataSpec):
            return spec
        text = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
        if not isinstance(text, str) or not text:
            raise ValueError("`spec` must be `demo`, a TFRecord pattern, a .csv/.tsv path or "
                             f"`tfds:NAME[/SPLIT]`. Received: spec={spec!r}")
        image_root = image_root or ""
        if not group_by_image and not text.endswith(TABLE_SUFFIXES):
            raise ValueError("`group_by_image=False` needs a .csv/.tsv table (other data is read "
                             f"as written). Received: spec={text!r}")
        if text == DEMO:
            return cls(DEMO, image_root=image_root, text=text)
        if text.startswith(TFDS_PREFIX):
            name, _, split = text[len(TFDS_PREFIX):].partition("/")
            if not name:
                raise ValueError(f"`spec` must name a TFDS dataset after `tfds:`. Received: spec={text!r}")
            return cls(TFDS, name, split or default_split, image_root, text)
        if text.endswith(TABLE_SUFFIXES):
            return cls(TABLE, text, image_root=image_root, text=text, group_by_image=bool(group_by_image))
        return cls(TFRECORD, text, image_root=image_root, text=text)

    def __str__(self):
        return self.text

    def demo_split(self, folder, split):
        """The TFRecord spec of one split of demo data written to `folder`."""
        if self.kind != DEMO:
            raise ValueError(f"`demo_split` needs the demo spec. Received: spec={self.text!r}")
        pattern = "/".join([folder.rstrip("/"), f"{split}-*.tfrecord"]) if "://" in folder \
            else os.path.join(folder, f"{split}-*.tfrecord")
        return DataSpec(TFRECORD, pattern, image_root=self.image_root, text=pattern)

    def _check_readable(self):
        if self.kind == DEMO:
            raise ValueError("The `demo` spec has no files until the demo data is written; "
                             "use `demo_split(folder, split)`.")

    # -- training input --------------------------------------------------------
    def dataset(self, **kwargs):
        """The reader's batched dataset (`keras_clip.data.pipeline`); `kwargs` are
        `ReaderOptions` fields (`batch_size`, `training`, ...), `options` (a
        `ReaderOptions`) and `preprocessing` (a `PreprocessingConfig`, e.g.
        `model.preprocessor_config`: image size, context length, mean/std, pixel limit)."""
        from keras_clip.data import pipeline

        self._check_readable()
        if self.kind == TFDS:
            return pipeline.tfds_dataset(self.path, split=self.split,
                                         data_dir=self.image_root or None, **kwargs)
        if self.kind == TABLE:
            return pipeline.csv_dataset(self.path, self.image_root, group_by_image=self.group_by_image,
                                        **kwargs)
        return pipeline.tfrecord_dataset(self.path, **kwargs)

    # -- counting -----------------------------------------------------------------
    def files(self):
        """The TFRecord files of the spec, sorted (the reader's order before shuffling).

        Raises:
            FileNotFoundError: no file matches.
        """
        import tensorflow as tf

        files = sorted(tf.io.gfile.glob(self.path))
        if not files:
            raise FileNotFoundError(f"No files match the data pattern {self.path!r}")
        return files

    def count_records(self, shard_index=0, num_shards=1):
        """Records the reader parses on one pass (see the module docstring).

        Args:
            shard_index, num_shards: TFRecord files only: count the files
                `files()[shard_index::num_shards]` (for splitting the counting
                across workers; `count_file_records` gives per-file figures).

        Returns:
            `RecordCount`.
        """
        self._check_readable()
        problems = {}
        if self.kind == TFDS:
            import tensorflow_datasets as tfds

            builder = tfds.builder(self.path, data_dir=self.image_root or None)
            return RecordCount(builder.info.splits[self.split].num_examples, problems)
        if self.kind == TABLE:
            from keras_clip.data import pipeline

            records, _, counts, _ = pipeline.read_table_records(
                self.path, self.image_root, group_by_image=self.group_by_image)
            for name in ("empty_captions", "invalid_utf8_rows"):
                if counts.get(name):
                    problems[name] = counts[name]
            return RecordCount(len(records), problems)
        readable, damaged = count_file_records(self.files(), shard_index, num_shards)
        return RecordCount(sum(readable.values()), _damage(readable, damaged))

    # -- evaluation ------------------------------------------------------------------
    def image_caption_pairs(self, max_images=None, problems=None):
        """`(images, captions)` for retrieval evaluation; see
        `keras_clip.data.pipeline.load_image_caption_pairs`."""
        from keras_clip.data import pipeline

        return pipeline.load_image_caption_pairs(self, max_images=max_images, problems=problems)


def count_file_records(files, shard_index=0, num_shards=1):
    """Per TFRecord file of `files[shard_index::num_shards]`: readable records, and
    whether it is damaged (read up to a `DataLossError`/`OutOfRangeError`).

    Returns:
        `(readable, damaged)`: dicts path -> int and path -> bool.
    """
    import tensorflow as tf
    from absl import logging

    readable, damaged = {}, {}
    for path in sorted(files)[shard_index::num_shards]:
        count = 0
        try:
            for _ in tf.data.TFRecordDataset(path):
                count += 1
            damaged[path] = False
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
            damaged[path] = True
            logging.warning("%s is damaged after %d records (%s); the rest of it is skipped.",
                            path, count, type(e).__name__)
        readable[path] = count
    return readable, damaged


def _damage(readable, damaged):
    truncated = {path: readable[path] for path in sorted(readable) if damaged[path]}
    return {"damaged_files": truncated} if truncated else {}
