"""`DataSpec`: parsing every form once, and record counts equal to what the pipeline reads.

For each source kind (demo, TFRecord, CSV/TSV, tfds:) the count is checked against
the pipeline's real output on one pass over synthetic data: its `records_read`
counter and the examples it yields.
"""
import csv
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_clip import demo_data
from keras_clip.data import pipeline, shards
from keras_clip.data.spec import DataSpec, RecordCount, count_file_records
from keras_clip.preprocessing.tokenizer import CLIPTokenizer
from tests import harness

IMAGE_SIZE, CONTEXT_LENGTH = 16, 8


def _one_pass(spec, batch_size=4):
    """Examples yielded by one evaluation pass over `spec`, and the pipeline's counters."""
    counters = pipeline.PipelineCounters()
    dataset = spec.dataset(batch_size=batch_size, image_size=IMAGE_SIZE,
                           context_length=CONTEXT_LENGTH, training=False, counters=counters)
    examples = sum(int(batch["images"].shape[0]) for batch in dataset)
    return examples, counters.as_dict()


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("text, kind, path, split", [
    ("demo", "demo", "", ""),
    ("/data/train-*.tfrecord", "tfrecord", "/data/train-*.tfrecord", ""),
    ("gs://bucket/shard-00000-of-00002.tfrecord", "tfrecord",
     "gs://bucket/shard-00000-of-00002.tfrecord", ""),
    ("/data/captions.csv", "table", "/data/captions.csv", ""),
    ("/data/captions.tsv", "table", "/data/captions.tsv", ""),
    ("tfds:coco_captions", "tfds", "coco_captions", "train"),
    ("tfds:coco_captions/validation[:10%]", "tfds", "coco_captions", "validation[:10%]"),
])
def test_parse_reads_each_form_once(text, kind, path, split):
    spec = DataSpec.parse(text, image_root="/images")
    assert (spec.kind, spec.path, spec.split, spec.image_root, spec.text) == \
        (kind, path, split, "/images", text)
    assert str(spec) == text
    assert DataSpec.parse(spec) is spec


def test_parse_uses_the_callers_default_tfds_split_and_rejects_empty_specs():
    assert DataSpec.parse("tfds:cifar10", default_split="test").split == "test"
    assert DataSpec.parse("tfds:cifar10/train", default_split="test").split == "train"
    with pytest.raises(ValueError, match=r"^`spec` must be `demo`, a TFRecord pattern, a "
                                         r"\.csv/\.tsv path or `tfds:NAME\[/SPLIT\]`\. Received: spec=''$"):
        DataSpec.parse("")
    with pytest.raises(ValueError, match=r"^`spec` must name a TFDS dataset after `tfds:`\. "
                                         r"Received: spec='tfds:/train'$"):
        DataSpec.parse("tfds:/train")


def test_demo_spec_names_the_split_files_and_has_no_count_of_its_own(tmp_path):
    demo = DataSpec.parse("demo")
    split = demo.demo_split(str(tmp_path), "val")
    assert (split.kind, split.path) == ("tfrecord", os.path.join(str(tmp_path), "val-*.tfrecord"))
    assert demo.demo_split("gs://bucket/run/demo_data/", "train").path == \
        "gs://bucket/run/demo_data/train-*.tfrecord"
    with pytest.raises(ValueError, match="no files until the demo data is written"):
        demo.count_records()


# --------------------------------------------------------------------------
# Counting = what the pipeline reads, per source kind
# --------------------------------------------------------------------------


def test_demo_count_matches_the_pipeline(tmp_path):
    demo_data.write_demo_dataset(str(tmp_path), num_train=22, num_val=6, num_zero_shot=4,
                                 image_size=24, seed=3, examples_per_shard=8)
    for split, expected in (("train", 22), ("val", 6)):
        spec = DataSpec.parse("demo").demo_split(str(tmp_path), split)
        examples, counters = _one_pass(spec)
        assert spec.count_records() == RecordCount(expected, {})
        assert examples == counters["records_read"] == expected


def test_tfrecord_count_is_the_records_the_pipeline_parses(tmp_path):
    # 30 records in 3 files; every fifth one is not an image: the reader parses all
    # 30 and drops those 6, so the count is `records_read`, not the examples out.
    examples = [(key, b"not an image" if i % 5 == 0 else image, captions)
                for i, (key, image, captions) in
                enumerate(demo_data.generate_demo_examples(30, image_size=24, seed=1))]
    shards.write_shards(examples, str(tmp_path), prefix="train", examples_per_shard=10)
    spec = DataSpec.parse(str(tmp_path / "train-*.tfrecord"))

    yielded, counters = _one_pass(spec)

    assert spec.count_records() == RecordCount(30, {})
    assert counters["records_read"] == 30
    assert counters["not_images"] == 6 and yielded == 24


def test_tfrecord_count_of_a_damaged_file_stops_at_the_damage_and_splits_across_shards(tmp_path):
    paths = shards.write_shards(list(demo_data.generate_demo_examples(24, image_size=24, seed=2)),
                                str(tmp_path), prefix="train", examples_per_shard=8)
    data = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:
        f.write(data[: len(data) // 2])  # cut inside a record
    readable = 0
    try:
        for _ in tf.data.TFRecordDataset(paths[1]):
            readable += 1
    except tf.errors.DataLossError:
        pass
    spec = DataSpec.parse(str(tmp_path / "train-*.tfrecord"))

    count = spec.count_records()

    assert 0 < readable < 8
    assert count == RecordCount(16 + readable, {"damaged_files": {paths[1]: readable}})
    # Counting split into shards (one per worker) covers every file exactly once.
    parts = [count_file_records(spec.files(), index, 2) for index in range(2)]
    assert sorted(p for readable_part, _ in parts for p in readable_part) == sorted(paths)
    assert sum(sum(r.values()) for r, _ in parts) == count.records
    assert [spec.count_records(index, 2).records for index in range(2)] == \
        [8 + 8, readable]  # files 0 and 2, then file 1


def test_table_count_applies_the_readers_grouping_and_missing_image_rule(tmp_path):
    root = harness.write_flickr8k(tmp_path / "flickr", splits={"train": 9, "dev": 3})
    images = sorted(os.listdir(root / "images"))
    os.remove(root / "images" / images[0])  # two rows' images are gone
    os.remove(root / "images" / images[5])
    spec = DataSpec.parse(str(root / "captions.tsv"), image_root=str(root / "images"))

    yielded, counters = _one_pass(spec)

    # 12 images x 5 captions = 60 rows, grouped into 12 records, 2 without their file.
    assert spec.count_records() == RecordCount(10, {})
    assert yielded == counters["records_read"] == 10
    pairs_images, pairs_captions = spec.image_caption_pairs()
    assert len(pairs_images) == 10 and [len(c) for c in pairs_captions] == [5] * 10


def test_ungrouped_table_trains_on_every_image_caption_pair_once_per_pass(tmp_path):
    """`group_by_image=False` (`--group_captions=false`): one record per row, as
    open_clip's CsvDataset reads a table; counted the same way; evaluation groups."""
    root = harness.write_flickr8k(tmp_path / "flickr", splits={"train": 4})
    table = str(root / "captions.tsv")
    with open(table, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    spec = DataSpec.parse(table, image_root=str(root / "images"), group_by_image=False)

    counters = pipeline.PipelineCounters()
    # A buffer of 1 would keep the table's order (sorted by image, so each batch one
    # image's captions): tables are shuffled whole, whatever the buffer.
    dataset = spec.dataset(batch_size=4, image_size=IMAGE_SIZE, context_length=CONTEXT_LENGTH,
                           training=True, seed=0, return_keys=True, counters=counters, shuffle_buffer=1)
    batches = [{name: value.numpy() for name, value in batch.items()} for batch in dataset]
    keys = [key.decode() for batch in batches for key in batch["keys"]]
    table_order = [f"{os.path.splitext(row['image'])[0]}/{row['caption_idx']}" for row in rows]
    assert keys != table_order
    tokens = np.concatenate([batch["token_ids"] for batch in batches])

    # 4 images x 5 captions: 20 records, each row exactly once, in shuffled order.
    assert spec.count_records() == RecordCount(20, {}) and counters.as_dict()["records_read"] == 20
    expected = {f"{os.path.splitext(row['image'])[0]}/{row['caption_idx']}": row["caption"] for row in rows}
    assert sorted(keys) == sorted(expected) and keys != sorted(keys)
    reference = CLIPTokenizer(context_length=CONTEXT_LENGTH)(tf.constant([expected[k] for k in keys]))
    np.testing.assert_array_equal(tokens, reference.numpy())
    grouped = DataSpec.parse(table, image_root=str(root / "images"))
    assert grouped.count_records().records == 4
    images, captions = spec.image_caption_pairs()
    assert len(images) == 4 and [len(c) for c in captions] == [5] * 4
    with pytest.raises(ValueError, match="needs a .csv/.tsv table"):
        DataSpec.parse("shards/train-*.tfrecord", group_by_image=False)


def test_table_count_reports_blank_captions_like_the_reader(tmp_path):
    root = harness.write_flickr8k(tmp_path / "flickr", splits={"train": 4})
    lines = (root / "captions.tsv").read_text(encoding="utf-8").splitlines()
    # Blank every caption of the first image (its five rows) and one of the second.
    blanked = [line.rsplit("\t", 1)[0] + "\t " if 1 <= i <= 6 else line
               for i, line in enumerate(lines)]
    (root / "captions.tsv").write_text("\n".join(blanked) + "\n", encoding="utf-8")
    spec = DataSpec.parse(str(root / "captions.tsv"), image_root=str(root / "images"))

    yielded, counters = _one_pass(spec)

    count = spec.count_records()
    assert count.records == yielded == counters["records_read"] == 3
    assert count.problems == {"empty_captions": 6}


def test_tfds_count_reads_the_split_in_image_root_as_the_pipeline_does(tmp_path):
    import tensorflow_datasets as tfds

    root = harness.write_flickr8k(tmp_path / "flickr", splits={"train": 10})
    names = sorted(os.listdir(root / "images"))
    captions = dict(zip(names, harness.captions(len(names), seed=4)))
    examples = [(name, {"image": str(root / "images" / name), "caption": captions[name]}) for name in names]
    harness.write_tiny_tfds(tmp_path / "tfds", {
        "image": tfds.features.Image(encoding_format="jpeg"), "caption": tfds.features.Text(),
    }, {"train": examples[:7], "validation": examples[7:]})

    for text, expected in (("tfds:tiny_captions", 7), ("tfds:tiny_captions/validation", 3),
                           ("tfds:tiny_captions/train[:4]", 4)):
        spec = DataSpec.parse(text, image_root=str(tmp_path / "tfds"))
        yielded, counters = _one_pass(spec)
        assert spec.count_records() == RecordCount(expected, {}), text
        assert yielded == counters["records_read"] == expected, text


def test_image_caption_pairs_of_a_spec_equal_the_pipeline_function(tmp_path):
    examples = list(demo_data.generate_demo_examples(6, image_size=24, seed=5))
    shards.write_shards(examples, str(tmp_path), prefix="val")
    pattern = str(tmp_path / "val-*.tfrecord")
    images, captions = DataSpec.parse(pattern).image_caption_pairs()
    expected_images, expected_captions = pipeline.load_image_caption_pairs(pattern)
    assert images == expected_images == [image for _, image, _ in examples]
    assert captions == expected_captions
    assert np.sum([len(c) for c in captions]) == np.sum([len(c) for _, _, c in examples])
    with pytest.raises(ValueError, match="Received: spec='tfds:x/train'"):
        DataSpec.parse("tfds:x/train").image_caption_pairs()
