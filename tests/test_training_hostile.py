"""Training on hostile data and after faults: empty streams, damaged input, resume.

Everything is generated here (demo images, hand-made TFRecords and CSVs); no
download and no shared data folder.
"""
import csv
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_clip import CLIP
from keras_clip import demo_data
from keras_clip.data import shards
from keras_clip.training import TrainConfig, run
from keras_clip.training import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, image_size=32, vision_architecture="vit", vision_num_layers=1,
            vision_hidden_dim=64, vision_num_heads=2, vision_patch_size=8, context_length=24,
            text_hidden_dim=64, text_num_layers=1, text_num_heads=2)
BATCH = 4
# Generous: the errors come 15-20 s after start-up on an idle 2-core machine
# (TensorFlow import and graph tracing included); 75 s was measured under heavy load.
EMPTY_STREAM_SECONDS = 240


def _good(count, seed=0):
    return list(demo_data.generate_demo_examples(count, image_size=32, seed=seed))


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    keras.utils.set_random_seed(0)
    CLIP(**TINY).save_to_preset(str(root / "tiny"))
    CLIP(**dict(TINY, vision_num_layers=2)).save_to_preset(str(root / "tiny_deeper"))
    return {"tiny": str(root / "tiny"), "deeper": str(root / "tiny_deeper")}


@pytest.fixture(scope="module")
def data_with_early_drops(tmp_path_factory):
    """48 records, every third one not an image: drops happen before any checkpoint."""
    folder = tmp_path_factory.mktemp("drops")
    examples = [(key, b"this is not an image" if i % 3 == 0 else image, captions)
                for i, (key, image, captions) in enumerate(_good(48))]
    shards.write_shards(examples, str(folder), prefix="train", examples_per_shard=16)
    return str(folder / "train-*.tfrecord")


def _config(preset, data, model_dir, **overrides):
    settings = dict(preset=preset, train_data=data, val_data="", model_dir=str(model_dir), steps=8,
                    global_batch_size=BATCH, checkpoint_every=2, shuffle_buffer=64, learning_rate=1e-3,
                    warmup_steps=2, jit_compile="false")
    settings.update(overrides)
    return TrainConfig(**settings)


class _Killed(Exception):
    pass


def _kill_after(step_to_die):
    """A step callback that ends the run in-process right after `step_to_die`."""
    def callback(step, logs):
        del logs
        if step == step_to_die:
            raise _Killed(step)
    return callback


@pytest.fixture(scope="module")
def reference_run(presets, data_with_early_drops, tmp_path_factory):
    """An uninterrupted 8-step run on the data with early drops."""
    model_dir = tmp_path_factory.mktemp("reference")
    return run(_config(presets["tiny"], data_with_early_drops, model_dir))


# ----------------------------------------------------------------------------------
# 10. Streams without a usable record end with an error, in bounded time
# ----------------------------------------------------------------------------------


def _empty_stream_cases(root):
    root.mkdir()
    not_images = root / "not_images"
    shards.write_shards([(f"k{i}", b"GIF? no: plain text", ["a caption"]) for i in range(6)],
                        str(not_images), prefix="train")
    empty = root / "empty.tfrecord"
    with tf.io.TFRecordWriter(str(empty)):
        pass
    header_only = root / "header_only.csv"
    header_only.write_text("image,caption\n")
    images = root / "text_files"
    images.mkdir()
    rows = []
    for i in range(5):
        (images / f"{i}.jpg").write_text("not a jpeg")
        rows.append({"image": f"{i}.jpg", "caption": f"caption {i}"})
    with open(root / "text_files.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return {
        "not_images": (str(not_images / "train-*.tfrecord"), "", [
            "`train_data` yields no usable example: No usable record in a whole pass over 1 TFRecord files",
            "6 records were read and all dropped", "not_images="]),
        "empty_tfrecord": (str(empty), "", ["`train_data` holds no records. Received: train_data="]),
        "header_only_csv": (str(header_only), "", ["`train_data` holds no records. Received: train_data="]),
        "csv_of_non_images": (str(root / "text_files.csv"), str(images), [
            "`train_data` yields no usable example: No usable record in a whole pass over 5 records of",
            "5 records were read and all dropped", "not_images="]),
    }


@pytest.mark.parametrize("case", ["not_images", "empty_tfrecord", "header_only_csv", "csv_of_non_images"])
def test_stream_without_usable_records_fails_fast_with_a_clear_error(presets, tmp_path, case):
    data, image_root, expected = _empty_stream_cases(tmp_path / "data")[case]
    command = [sys.executable, str(REPO / "training" / "run.py"), f"--preset={presets['tiny']}",
               f"--train_data={data}", f"--image_root={image_root}", "--val_data=",
               f"--model_dir={tmp_path / 'run'}", "--steps=3", f"--global_batch_size={BATCH}",
               "--jit_compile=false"]
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=EMPTY_STREAM_SECONDS,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case}: no error within {EMPTY_STREAM_SECONDS} s (the stream loops forever)")
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert elapsed < EMPTY_STREAM_SECONDS
    for text in expected:
        assert text in done.stderr, (text, done.stderr[-3000:])
    assert data in done.stderr


def test_pipeline_raises_on_a_whole_pass_of_bad_records_even_when_resumed_mid_pass(tmp_path):
    from keras_clip.data import pipeline

    bad = [(f"k{i}", b"not an image", ["a caption"]) for i in range(10)]
    shards.write_shards(bad, str(tmp_path), prefix="bad")
    counters = pipeline.PipelineCounters()
    dataset = pipeline.tfrecord_dataset(str(tmp_path / "bad-*.tfrecord"), batch_size=2, image_size=32,
                                        context_length=8, seed=0, repeat=True, skip_records=7,
                                        counters=counters)
    outcome = {}

    def consume():  # in a thread, so that a stream looping forever fails the test
        try:
            next(iter(dataset))
        except Exception as e:  # noqa: BLE001
            outcome["error"] = e

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(EMPTY_STREAM_SECONDS)
    assert "error" in outcome, f"no error within {EMPTY_STREAM_SECONDS} s (the stream loops forever)"
    assert isinstance(outcome["error"], tf.errors.InvalidArgumentError)
    assert re.search("No usable record in a whole pass over 1 TFRecord files .*: 10 records were read and "
                     "all dropped", outcome["error"].message)
    # Resumed 7 records into the first pass: that partial pass (3 records) is not
    # taken for a whole one; the error comes at the end of the next pass.
    assert counters.as_dict()["not_images"] >= 13


# ----------------------------------------------------------------------------------
# 11. Damaged input: the run completes and counts what it dropped
# ----------------------------------------------------------------------------------


def test_truncated_shard_and_non_utf8_captions_do_not_stop_the_run(presets, tmp_path):
    train, val = tmp_path / "train", tmp_path / "val"
    examples = _good(36)
    # Six training records carry Latin-1 captions (invalid UTF-8).
    examples = [(k, image, [b"une \xe9toile rouge"] if i % 6 == 0 else captions)
                for i, (k, image, captions) in enumerate(examples)]
    paths = shards.write_shards(examples, str(train), prefix="train", examples_per_shard=12)
    damaged = paths[-1]
    with open(damaged, "rb") as f:
        data = f.read()
    with open(damaged, "wb") as f:
        f.write(data[: len(data) // 2 + 7])  # cut inside a record
    readable = sum(1 for _ in _records_until_damage(damaged))
    val_examples = [(k, image, [b"caf\xe9 " + c.encode() for c in captions[:2]] + captions[2:3])
                    for k, image, captions in _good(6, seed=1)]
    shards.write_shards(val_examples, str(val), prefix="val")

    summary = run(_config(presets["tiny"], str(train / "train-*.tfrecord"), tmp_path / "run", steps=6,
                          val_data=str(val / "val-*.tfrecord")))

    assert summary["steps"] == 6
    assert summary["data_problems"] == {"damaged_files": {damaged: readable}}
    assert 0 < readable < 12
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["data_problems"] == summary["data_problems"]
    assert on_disk["val_retrieval"]["num_images"] == 6
    assert on_disk["val_retrieval"]["num_captions"] == 18
    assert on_disk["val_retrieval"]["invalid_utf8_captions"] == 12
    assert "evaluation_errors" not in on_disk


def _records_until_damage(path):
    try:
        yield from tf.data.TFRecordDataset(path)
    except tf.errors.DataLossError:
        return


def test_latin1_csv_trains_and_validates_with_the_rows_counted(presets, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image", "caption"])
    for i, (key, image, captions) in enumerate(_good(16)):
        (images / f"{key}.jpg").write_bytes(image)
        writer.writerow([f"{key}.jpg", captions[0] + (" \u00e9t\u00e9" if i % 4 == 0 else "")])
    table = tmp_path / "captions.csv"
    table.write_bytes(text.getvalue().encode("latin-1"))  # not UTF-8

    summary = run(_config(presets["tiny"], str(table), tmp_path / "run", steps=4, image_root=str(images),
                          val_data=str(table)))

    assert summary["steps"] == 4
    assert summary["data_problems"] == {"invalid_utf8_rows": 4}
    assert summary["val_retrieval"]["num_images"] == 16
    assert summary["val_retrieval"]["invalid_utf8_rows"] == 4
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


def test_failing_evaluation_is_recorded_after_the_preset_is_saved(presets, data_with_early_drops, tmp_path,
                                                                  monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("validation set exploded")

    monkeypatch.setattr(loop, "evaluate_retrieval", broken)
    summary = run(_config(presets["tiny"], data_with_early_drops, tmp_path / "run", steps=2,
                          val_data=data_with_early_drops))
    assert summary["evaluation_errors"] == {"val_retrieval": "RuntimeError: validation set exploded"}
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["evaluation_errors"] == summary["evaluation_errors"]
    assert CLIP.from_preset(str(tmp_path / "run" / "preset")).get_config() == \
        CLIP.from_preset(presets["tiny"]).get_config()


# ----------------------------------------------------------------------------------
# 12. Resume is trustworthy
# ----------------------------------------------------------------------------------


def _checkpoint_files(model_dir):
    folder = pathlib.Path(model_dir) / "checkpoints"
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def four_step_run(presets, data_with_early_drops, tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4), copied by each test that resumes it."""
    model_dir = tmp_path_factory.mktemp("four_steps")
    run(_config(presets["tiny"], data_with_early_drops, model_dir, steps=4))
    return model_dir


@pytest.mark.parametrize("change, expected", [
    (dict(preset="deeper"), "model.vision_num_layers: checkpoint 1 != this run 2"),
    (dict(precision="mixed_bfloat16"), 'precision: checkpoint "float32" != this run "mixed_bfloat16"'),
    (dict(global_batch_size=8), "global_batch_size: checkpoint 4 != this run 8"),
])
def test_checkpoint_of_another_run_stops_with_the_differences_and_is_kept(
        presets, data_with_early_drops, four_step_run, tmp_path, change, expected):
    import shutil

    from keras_clip.training.checkpointing import CheckpointMismatchError

    model_dir = tmp_path / "run"
    shutil.copytree(four_step_run, model_dir)
    before = _checkpoint_files(model_dir)
    assert {"ckpt-2.index", "ckpt-4.index"} <= set(before)
    change = dict(change)
    preset = presets[change.pop("preset", "tiny")]
    with pytest.raises(CheckpointMismatchError) as raised:
        run(_config(preset, data_with_early_drops, model_dir, steps=12, **change))
    message = str(raised.value)
    assert expected in message, message
    assert "ckpt-4 was written by a run with other settings" in message
    assert "nothing was deleted" in message
    assert _checkpoint_files(model_dir) == before  # nothing deleted, nothing rewritten


def _checkpoint_positions(prefix):
    return tf.train.load_checkpoint(prefix).get_tensor("data_positions/.ATTRIBUTES/VARIABLE_VALUE").tolist()


def test_resume_after_drops_from_the_checkpoint_before_a_truncated_one_matches_uninterrupted_run(
        presets, data_with_early_drops, reference_run, tmp_path):
    config = _config(presets["tiny"], data_with_early_drops, tmp_path)
    with pytest.raises(_Killed):
        run(config, step_callback=_kill_after(5))  # checkpoints 2 and 4 exist
    # Records were dropped before checkpoint 2: more records than examples consumed.
    assert _checkpoint_positions(str(tmp_path / "checkpoints" / "ckpt-2"))[0] > 2 * BATCH
    # The newest checkpoint is damaged: the resume falls back to checkpoint 2.
    data_file = next((tmp_path / "checkpoints").glob("ckpt-4.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:200])

    summary = run(config)

    assert summary["resumed_from_step"] == 2 and summary["steps"] == 8
    np.testing.assert_allclose(summary["loss_history"], reference_run["loss_history"][2:], rtol=1e-5)
    assert summary["records_consumed"] == reference_run["records_consumed"]


# ----------------------------------------------------------------------------------
# 13. A model_dir on a non-local TensorFlow filesystem resumes
# ----------------------------------------------------------------------------------


def test_ram_filesystem_model_dir_resumes_after_an_interruption(presets, data_with_early_drops, reference_run,
                                                                 tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would appear here
    model_dir = "ram://keras_clip_test/run"
    if tf.io.gfile.exists(model_dir):
        tf.io.gfile.rmtree(model_dir)
    config = _config(presets["tiny"], data_with_early_drops, model_dir)
    with pytest.raises(_Killed):
        run(config, step_callback=_kill_after(5))
    assert tf.io.gfile.exists(f"{model_dir}/checkpoints/ckpt-4.index")
    assert not tf.io.gfile.exists(f"{model_dir}/summary.json")

    summary = run(config)

    assert summary["resumed_from_step"] == 4 and summary["steps"] == 8
    np.testing.assert_allclose(summary["loss_history"], reference_run["loss_history"][4:], rtol=1e-5)
    with tf.io.gfile.GFile(f"{model_dir}/summary.json") as f:
        assert json.loads(f.read())["steps"] == 8
    for name in ("train_config.json", "preset/config.json", "preset/model.weights.h5",
                 "preset/assets/bpe_simple_vocab_16e6.txt.gz"):
        assert tf.io.gfile.exists(f"{model_dir}/{name}"), name
    assert list(tmp_path.iterdir()) == []
