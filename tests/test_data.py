"""Input pipeline: converters, readers, caption sampling, crops, bad records, sharding.

All on real Flickr8k files (40 images of the official train split), at
`image_size=32` to stay fast. Datasets are built once per module where tests can
share them: building one traces the tokenizer and the decoder (a few seconds).
"""
import csv
import io
import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from keras_clip.data import augment
from keras_clip.data import pipeline
from keras_clip.data import shards
from keras_clip.preprocessing.image_preprocessor import OPENAI_MEAN
from keras_clip.preprocessing.image_preprocessor import OPENAI_STD
from keras_clip.preprocessing.image_preprocessor import CLIPImagePreprocessor
from keras_clip.preprocessing.tokenizer import CLIPTokenizer
from tests import harness

NUM_IMAGES = 40
IMAGE_SIZE = 32
CONTEXT_LENGTH = 32
TSV_FIELDS = ["image", "caption_idx", "split", "caption"]


def _drain(dataset):
    """All batches of `dataset` concatenated, as numpy arrays by key."""
    batches = [{name: value.numpy() for name, value in batch.items()} for batch in dataset]
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def _read_records(paths):
    """Parsed `tf.train.Example`s of TFRecord files, as {feature: [bytes, ...]}."""
    records = []
    for serialized in tf.data.TFRecordDataset([str(p) for p in paths]).as_numpy_iterator():
        example = tf.train.Example.FromString(serialized)
        records.append({name: list(f.bytes_list.value) for name, f in example.features.feature.items()})
    return records


def _write_tsv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TSV_FIELDS, delimiter="\t", quoting=csv.QUOTE_NONE)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def flickr_subset(flickr8k_dir):
    """The first 40 images of splits/train.txt: (names in TSV order, TSV rows, {name: [5 captions]})."""
    with open(flickr8k_dir / "splits" / "train.txt") as f:
        names = [line.strip() for line in f][:NUM_IMAGES]
    wanted = set(names)
    with open(flickr8k_dir / "captions.tsv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r["image"] in wanted]
    names = list(dict.fromkeys(row["image"] for row in rows))  # in file order
    captions = {name: [] for name in names}
    for row in sorted(rows, key=lambda r: int(r["caption_idx"])):
        captions[row["image"]].append(row["caption"])
    return names, rows, captions


@pytest.fixture(scope="module")
def flickr_shards(tmp_path_factory, flickr8k_dir, flickr_subset):
    """The 40 images as 3 TFRecord shards (16 + 16 + 8 records)."""
    _, rows, _ = flickr_subset
    folder = tmp_path_factory.mktemp("flickr_shards")
    _write_tsv(folder / "captions.tsv", rows)
    counts = shards.convert_csv(
        str(folder / "captions.tsv"), str(flickr8k_dir / "images"), str(folder / "out"), examples_per_shard=16
    )
    assert counts["written"] == NUM_IMAGES and counts["shards"] == 3
    return sorted(str(p) for p in (folder / "out").glob("*.tfrecord"))


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer(context_length=CONTEXT_LENGTH)


@pytest.fixture(scope="module")
def caption_tokens(flickr_subset, tokenizer):
    """{image key: (5, T) token ids of its 5 captions}."""
    names, _, captions = flickr_subset
    flat = [c for name in names for c in captions[name]]
    tokens = tokenizer(tf.constant(flat)).numpy().reshape(len(names), 5, CONTEXT_LENGTH)
    return {os.path.splitext(name)[0].encode(): tokens[i] for i, name in enumerate(names)}


def _caption_indices(result, caption_tokens):
    """Index (0-4) of the caption behind each output row; asserts exactly one matches."""
    indices = []
    for key, row in zip(result["keys"], result["token_ids"]):
        matches = np.flatnonzero((caption_tokens[key] == row).all(axis=1))
        assert len(matches) >= 1, key
        indices.append(int(matches[0]))
    return indices


def _train_dataset(paths, **kwargs):
    kwargs = dict(dict(batch_size=4, image_size=IMAGE_SIZE, context_length=CONTEXT_LENGTH, return_keys=True), **kwargs)
    return pipeline.tfrecord_dataset(paths, **kwargs)


@pytest.fixture(scope="module")
def preprocess_batch():
    """`CLIPImagePreprocessor` on a batch of encoded images, traced once."""
    preprocessor = CLIPImagePreprocessor(image_size=IMAGE_SIZE)
    return tf.function(preprocessor, input_signature=[tf.TensorSpec([None], tf.string)])


@pytest.fixture(scope="module")
def seeded_epochs(flickr_shards):
    """Three iterations (epochs) of one training dataset with seed=0."""
    dataset = _train_dataset(flickr_shards, seed=0)
    return [_drain(dataset) for _ in range(3)]


def _take(dataset, batches):
    return _drain(dataset.take(batches))


# --------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------


def test_convert_csv_groups_five_captions_and_counts_bad_rows(tmp_path, flickr8k_dir, flickr_subset):
    names, rows, captions = flickr_subset
    bad_rows = [
        {"image": names[0], "caption_idx": "5", "split": "train", "caption": ""},
        {"image": names[1], "caption_idx": "5", "split": "train", "caption": "   "},
        {"image": "0000000000_missing.jpg", "caption_idx": "0", "split": "train", "caption": "A dog ."},
        {"image": names[2], "caption_idx": "5", "split": "dev", "caption": "Filtered out by split ."},
    ]
    _write_tsv(tmp_path / "captions.tsv", rows + bad_rows)

    counts = shards.convert_csv(
        str(tmp_path / "captions.tsv"), str(flickr8k_dir / "images"), str(tmp_path / "out"),
        split_column="split", split="train", examples_per_shard=16,
    )

    assert counts == {"rows": 203, "written": 40, "missing_images": 1, "empty_captions": 2, "shards": 3}
    paths = sorted((tmp_path / "out").glob("*.tfrecord"))
    assert [p.name for p in paths] == [f"shard-0000{i}-of-00003.tfrecord" for i in range(3)]
    records = _read_records(paths)
    assert len(records) == 40
    assert [r["key"][0].decode() for r in records] == [os.path.splitext(n)[0] for n in names]
    for record, name in zip(records, names):
        expected = [c.encode() for c in captions[name]]
        assert len(expected) == 5
        assert record["txts"] == expected
        assert record["txt"] == expected[:1]
        assert record["jpg"][0] == (flickr8k_dir / "images" / name).read_bytes()


def test_convert_csv_per_pair_writes_every_row_once_in_a_seeded_shuffled_order(tmp_path, flickr8k_dir,
                                                                              flickr_subset):
    _, rows, _ = flickr_subset
    _write_tsv(tmp_path / "captions.tsv", rows)

    def convert(folder, **kwargs):
        counts = shards.convert_csv(str(tmp_path / "captions.tsv"), str(flickr8k_dir / "images"),
                                    str(tmp_path / folder), group_by_image=False, examples_per_shard=64, **kwargs)
        assert counts == {"rows": 200, "written": 200, "missing_images": 0, "empty_captions": 0, "shards": 4}
        paths = sorted((tmp_path / folder).glob("*.tfrecord"))
        return [p.read_bytes() for p in paths], _read_records(paths)

    def neighbours_sharing_an_image(images):
        return sum(a == b for a, b in zip(images, images[1:]))

    def pairs_of(records):  # per-pair keys are `<image stem>/<caption index>`
        return [(r["key"][0].decode().split("/")[0], r["txt"][0]) for r in records]

    table_pairs = [(os.path.splitext(r["image"])[0], r["caption"].strip().encode()) for r in rows]
    table_neighbours = neighbours_sharing_an_image([image for image, _ in table_pairs])
    assert table_neighbours == 160  # the table is sorted by image: 40 runs of 5

    shuffled_bytes, shuffled = convert("shuffled")
    pairs = pairs_of(shuffled)
    assert sorted(pairs) == sorted(table_pairs)  # every row once
    assert all("txts" not in r for r in shuffled)  # one caption: read as `txt`, as img2dataset writes it
    # A uniformly random order of 5 x 40 rows has 199 * 4 / 199 = 4 neighbouring rows
    # sharing an image in expectation.
    assert neighbours_sharing_an_image([image for image, _ in pairs]) <= 12

    assert convert("again")[0] == shuffled_bytes  # the same seed writes the same shards
    assert convert("other_seed", seed=1)[0] != shuffled_bytes
    _, kept = convert("table_order", seed=None)
    assert pairs_of(kept) == table_pairs


def test_convert_webdataset_reads_jpg_jpeg_and_png_samples(tmp_path, flickr8k_dir, flickr_subset):
    names = flickr_subset[0]
    jpeg = (flickr8k_dir / "images" / names[0]).read_bytes()
    jpeg2 = (flickr8k_dir / "images" / names[1]).read_bytes()
    png = tf.io.encode_png(tf.io.decode_jpeg(jpeg)).numpy()
    members = [
        ("part/a.jpg", jpeg), ("part/a.txt", b"A child climbing stairs .\n"),
        ("part/b.png", png), ("part/b.txt", "Un caf\u00e9 .".encode()),
        ("part/c.txt", b"Two dogs ."), ("part/c.jpeg", jpeg2),
        ("part/d.txt", b"No image for this one ."),  # missing image
        ("part/e.jpg", jpeg), ("part/e.txt", b" \n"),  # blank caption
    ]
    tar_path = tmp_path / "000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    counts = shards.convert_webdataset([str(tar_path)], str(tmp_path / "out"))

    assert counts == {"samples": 5, "written": 3, "missing_images": 1, "empty_captions": 1, "shards": 1}
    records = _read_records(sorted((tmp_path / "out").glob("*.tfrecord")))
    assert [r["key"] for r in records] == [[b"part/a"], [b"part/b"], [b"part/c"]]
    assert [r["jpg"] for r in records] == [[jpeg], [png], [jpeg2]]
    assert [r["txt"] for r in records] == [[b"A child climbing stairs ."], ["Un caf\u00e9 .".encode()], [b"Two dogs ."]]
    assert all("txts" not in r for r in records)


# --------------------------------------------------------------------------
# Bad records
# --------------------------------------------------------------------------


@pytest.mark.parametrize("truncated_last", [False, True], ids=["truncated_mid_stream", "truncated_last"])
def test_bad_records_are_dropped_and_counted_exactly(tmp_path, flickr8k_dir, flickr_subset, truncated_last):
    names, _, captions = flickr_subset
    good = []
    for name in names[:5]:
        good.append((os.path.splitext(name)[0], (flickr8k_dir / "images" / name).read_bytes(), captions[name]))
    png = tf.io.encode_png(tf.io.decode_jpeg(good[0][1])).numpy()
    good.append(("png_image", png, ["A PNG copy ."]))
    real = (flickr8k_dir / "images" / names[5]).read_bytes()
    bad = [
        ("truncated_jpeg", real[: int(0.3 * len(real))], ["A truncated photo ."]),
        ("random_bytes", b"garbage" + np.random.default_rng(0).bytes(5000), ["Not an image ."]),
        ("empty_caption", real, [" \t "]),
    ]
    if truncated_last:
        # One shard, no shuffling: the truncated JPEG is the last record of the
        # stream, so no good image comes out of the decoder after it.
        examples = good[:2] + bad[1:] + good[2:] + bad[:1]
        paths = shards.write_shards(examples, str(tmp_path), examples_per_shard=len(examples))
        options = dict(shuffle_buffer=1)
    else:
        examples = good[:2] + bad[:1] + good[2:4] + bad[1:] + good[4:]
        paths = shards.write_shards(examples, str(tmp_path), examples_per_shard=4)
        options = {}
    counters = pipeline.PipelineCounters()

    result = _drain(_train_dataset(paths, batch_size=2, seed=3, counters=counters, **options))

    assert sorted(result["keys"]) == sorted(key.encode() for key, _, _ in good)
    if truncated_last:
        assert list(result["keys"]) == [key.encode() for key, _, _ in good]
    assert counters.as_dict() == {
        "records_read": 9, "empty_captions": 1, "not_images": 1, "too_large": 0, "decode_failures": 1,
        "examples_out": 6,
    }
    assert np.isfinite(result["images"]).all()


def test_abandoned_iterator_counts_no_decode_failures_for_images_in_flight(flickr_shards):
    # A training loop leaves an iterator after its last step: the parallel
    # decoder is then still working on later (clean) images.
    counters = pipeline.PipelineCounters()
    iterator = iter(_train_dataset(flickr_shards, seed=0, counters=counters))
    batch = next(iterator)
    del iterator

    assert batch["images"].shape[0] == 4
    assert counters.as_dict()["decode_failures"] == 0


def test_looks_like_image_accepts_only_known_signatures():
    samples = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\nrest", b"GIF89a..", b"BM....", b"RIFF\0\0\0\0WEBPVP8 ",
               b"RIFF\0\0\0\0WAVE", b"", b"\xff\xd8", b"<html>"]
    flags = [bool(pipeline.looks_like_image(tf.constant(s))) for s in samples]
    assert flags == [True, True, True, True, True, False, False, False, False]


# --------------------------------------------------------------------------
# Caption sampling, reproducibility, resuming
# --------------------------------------------------------------------------


def test_each_epoch_draws_one_of_the_five_captions_per_image(seeded_epochs, caption_tokens):
    indices = []
    for epoch in seeded_epochs:
        assert sorted(epoch["keys"]) == sorted(caption_tokens)  # every image once per epoch
        indices.append(dict(zip(epoch["keys"], _caption_indices(epoch, caption_tokens))))
    varied = sum(len({epoch[key] for epoch in indices}) > 1 for key in caption_tokens)
    # Uniform draws: an image keeps one caption over 3 epochs with probability 1/25.
    assert varied >= 34
    counts = np.bincount([i for epoch in indices for i in epoch.values()], minlength=5)
    assert counts.sum() == 120 and counts.min() >= 10
    assert [list(e["keys"]) for e in seeded_epochs[:1]] != [list(e["keys"]) for e in seeded_epochs[1:2]]


def test_same_seed_with_skip_records_resumes_the_same_stream(flickr_shards, seeded_epochs):
    # A fresh dataset with the same seed, resumed after 12 records, yields the
    # rest of the first epoch: same order, same sampled captions, same crops.
    resumed = _drain(_train_dataset(flickr_shards, seed=0, skip_records=12))
    first = seeded_epochs[0]
    assert len(resumed["keys"]) == 28
    for name in ("keys", "token_ids", "images"):
        np.testing.assert_array_equal(resumed[name], first[name][12:])


def test_repeat_streams_the_reshuffled_epochs_and_skip_resumes_across_them(flickr_shards, seeded_epochs):
    # One repeating dataset (what the training loop builds once per run) yields
    # exactly the epochs of re-iterating a dataset: reshuffled, captions and crops
    # redrawn; a fresh one skipping 50 records (1.25 passes) continues that stream.
    epochs = {name: np.concatenate([e[name] for e in seeded_epochs]) for name in seeded_epochs[0]}
    repeated = _train_dataset(flickr_shards, seed=0, repeat=True)
    assert repeated.cardinality() == tf.data.INFINITE_CARDINALITY
    assert repeated.element_spec["images"].shape[0] == 4  # static: what distribution needs
    stream = _take(repeated, 30)  # 3 passes of 10 batches
    resumed = _take(_train_dataset(flickr_shards, seed=0, repeat=True, skip_records=52), 17)
    for name in ("keys", "token_ids", "images"):
        np.testing.assert_array_equal(stream[name], epochs[name])
        np.testing.assert_array_equal(resumed[name], epochs[name][52:])


# --------------------------------------------------------------------------
# Outputs and preprocessing
# --------------------------------------------------------------------------


def _normalised_bounds():
    mean, std = np.array(OPENAI_MEAN, "float32"), np.array(OPENAI_STD, "float32")
    return (0.0 - mean) / std, (1.0 - mean) / std


def test_training_batches_have_documented_shapes_dtypes_and_range(seeded_epochs):
    result = seeded_epochs[0]
    assert result["images"].shape == (40, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert result["images"].dtype == np.float32
    assert result["token_ids"].shape == (40, CONTEXT_LENGTH)
    assert result["token_ids"].dtype == np.int32
    low, high = _normalised_bounds()
    per_channel_min = result["images"].min(axis=(0, 1, 2))
    per_channel_max = result["images"].max(axis=(0, 1, 2))
    assert np.all(per_channel_min >= low - 1e-6) and np.all(per_channel_max <= high + 1e-6)
    # Natural photos span (almost) the full range in every channel.
    assert np.all(per_channel_min < low + 0.2) and np.all(per_channel_max > high - 0.2)
    assert np.all(result["token_ids"][:, 0] == 49406)


def test_eval_path_equals_clip_image_preprocessor_exactly(
    flickr8k_dir, flickr_shards, flickr_subset, caption_tokens, preprocess_batch
):
    names = flickr_subset[0]
    result = _drain(_train_dataset(flickr_shards, training=False, batch_size=16))

    assert result["images"].shape == (40, IMAGE_SIZE, IMAGE_SIZE, 3)  # last batch of 8 kept
    by_key = {os.path.splitext(n)[0].encode(): (flickr8k_dir / "images" / n).read_bytes() for n in names}
    expected = preprocess_batch(tf.constant([by_key[k] for k in result["keys"]])).numpy()
    np.testing.assert_array_equal(result["images"], expected)
    # Evaluation takes each image's first caption.
    assert _caption_indices(result, caption_tokens) == [0] * 40


def test_random_resized_crop_boxes_cover_90_to_100_percent():
    sample = tf.function(augment.sample_crop_box)
    for height, width in [(180, 240), (240, 180), (200, 200)]:
        for i in range(40):
            top, left, h, w = sample(height, width, tf.constant([i, 7])).numpy()
            area = h * w / (height * width)
            assert 0.9 * (1 - 1 / min(height, width)) ** 2 <= area <= 1.0, (height, width, i)
            assert 0 <= top <= height - h and 0 <= left <= width - w
            assert 0.75 - 1 / min(h, w) <= w / h <= 4 / 3 + 1 / min(h, w)
    # Too elongated for any box: torchvision's central crop at the widest ratio.
    np.testing.assert_array_equal(sample(50, 400, tf.constant([1, 2])).numpy(), [0, 166, 50, 67])


def test_random_resized_crop_output_shows_the_cropped_region():
    height, width = 240, 200
    rows = np.broadcast_to(np.arange(height)[:, None], (height, width))
    cols = np.broadcast_to(np.arange(width)[None, :], (height, width))
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype("uint8")  # pixel = its coordinates
    crop = tf.function(augment.random_resized_crop)
    size = IMAGE_SIZE
    for i in range(10):
        seed = tf.constant([i, 11])
        out = crop(image, size, seed).numpy().astype("float64")
        assert out.shape == (size, size, 3)
        top, left, h, w = augment.sample_crop_box(height, width, seed).numpy()
        # A linear ramp stays a ramp: output pixel centres sample the crop box.
        np.testing.assert_allclose(out[size // 2, :, 1], left + (np.arange(size) + 0.5) * w / size - 0.5, atol=1.5)
        np.testing.assert_allclose(out[:, size // 2, 0], top + (np.arange(size) + 0.5) * h / size - 0.5, atol=1.5)
        covered = (out[-1, 0, 0] - out[0, 0, 0]) * (out[0, -1, 1] - out[0, 0, 1]) * (size / (size - 1)) ** 2
        assert 0.88 <= covered / (height * width) <= 1.0


# --------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------


def _worker_results(make_dataset):
    """What pipelines 0 and 1 of 2 yield (global batch 8: 4 per replica)."""
    results = []
    for pipeline_id in (0, 1):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=2
        )
        batches = list(make_dataset(context))
        assert {tuple(batch["images"].shape) for batch in batches} == {(4, IMAGE_SIZE, IMAGE_SIZE, 3)}
        results.append({name: np.concatenate([b[name].numpy() for b in batches]) for name in batches[0]})
    return results


def test_input_context_shards_tfrecords_by_file_disjointly(flickr_shards):
    results = _worker_results(lambda context: _train_dataset(flickr_shards, batch_size=8, input_context=context))
    keys = [list(result["keys"]) for result in results]
    # Pipeline 0 reads files 0 and 2 (16 + 8 records), pipeline 1 file 1 (16).
    assert (len(keys[0]), len(keys[1])) == (24, 16)
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 40


def test_csv_reader_shards_by_element_and_samples_grouped_captions(
    tmp_path, flickr8k_dir, flickr_subset, caption_tokens
):
    _, rows, _ = flickr_subset
    _write_tsv(tmp_path / "captions.tsv", rows + [
        {"image": "0000000000_missing.jpg", "caption_idx": "0", "split": "train", "caption": "A dog ."},
    ])

    def make_dataset(context):
        return pipeline.csv_dataset(
            str(tmp_path / "captions.tsv"), str(flickr8k_dir / "images"), batch_size=8, input_context=context,
            image_size=IMAGE_SIZE, context_length=CONTEXT_LENGTH, return_keys=True,
        )

    results = _worker_results(make_dataset)
    keys = [list(result["keys"]) for result in results]
    # 40 records (the missing file is left out), every other one per pipeline.
    assert (len(keys[0]), len(keys[1])) == (20, 20)
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) == set(caption_tokens)
    # One caption per image, drawn from its five (not always the first).
    indices = _caption_indices(results[0], caption_tokens) + _caption_indices(results[1], caption_tokens)
    assert len(set(indices)) >= 3


# --------------------------------------------------------------------------
# TFDS
# --------------------------------------------------------------------------


def test_tfds_reader_reads_a_prepared_coco_like_dataset(
    tmp_path, flickr8k_dir, flickr_subset, tokenizer, preprocess_batch
):
    import tensorflow_datasets as tfds

    names, _, captions = flickr_subset
    names = names[:10]
    image_dir = flickr8k_dir / "images"

    harness.write_tiny_tfds(tmp_path, {
        "image": tfds.features.Image(encoding_format="jpeg"),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
    }, {"train": [(name, {"image": str(image_dir / name), "captions": [{"text": c} for c in captions[name]]})
                  for name in names]})

    result = _drain(pipeline.tfds_dataset(
        "tiny_captions", "train", data_dir=str(tmp_path), caption_key="captions/text", batch_size=4,
        image_size=IMAGE_SIZE, context_length=CONTEXT_LENGTH, training=False, return_keys=True,
    ))

    assert result["images"].shape == (10, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert len(set(result["keys"])) == 10
    first_captions = tokenizer(tf.constant([captions[n][0] for n in names])).numpy()
    expected_images = preprocess_batch(tf.constant([(image_dir / n).read_bytes() for n in names])).numpy()
    for tokens, image in zip(result["token_ids"], result["images"]):
        (match,) = np.flatnonzero((first_captions == tokens).all(axis=1))
        np.testing.assert_array_equal(image, expected_images[match])


def test_pipelines_of_a_process_share_one_tokenizer_trace(tmp_path, monkeypatch):
    # Each pipeline used to trace its own CLIPTokenizer into its map function: about
    # 9 s per pipeline on a 2-core 2.0 GHz Xeon, paid again by every rebuild (a
    # validation reader, each resumed stream, each test). They now call one traced
    # function per (context length, fix_text) and process.
    from keras_clip import demo_data
    from keras_clip.preprocessing import tokenizer as tokenizer_lib

    demo_data.write_demo_dataset(str(tmp_path), num_train=12, num_val=4, num_zero_shot=2, image_size=32)
    traces = []

    def counting_call(self, texts):
        traces.append(self.context_length)
        return original_call(self, texts)

    original_call = tokenizer_lib.CLIPTokenizer.call
    tokenizer_lib.traced_tokenizer.cache_clear()
    monkeypatch.setattr(tokenizer_lib.CLIPTokenizer, "call", counting_call)
    try:
        outputs = [_drain(pipeline.tfrecord_dataset(str(tmp_path / "train-*.tfrecord"), batch_size=4,
                                                    image_size=IMAGE_SIZE, context_length=CONTEXT_LENGTH,
                                                    training=False, return_keys=True))
                   for _ in range(2)]
    finally:
        tokenizer_lib.traced_tokenizer.cache_clear()
    assert traces == [CONTEXT_LENGTH]
    records = {r["key"][0]: r["txt"][0] for r in _read_records(sorted(tmp_path.glob("train-*.tfrecord")))}
    captions = [records[key] for key in outputs[0]["keys"]]
    monkeypatch.undo()
    expected = CLIPTokenizer(context_length=CONTEXT_LENGTH)(tf.constant(captions)).numpy()
    for output in outputs:
        assert len(output["keys"]) == 12
        np.testing.assert_array_equal(output["token_ids"], expected)
