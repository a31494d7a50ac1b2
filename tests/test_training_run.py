"""End-to-end training runs: loss falls on real data, resume after SIGKILL, checkpoint fallback."""
import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_clip import CLIP
from tests import harness
from keras_clip.training import TrainConfig, run
from keras_clip.training.checkpointing import CheckpointKeeper

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = harness.TINY_VIT_TRAIN


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("preset") / "tiny"
    CLIP(**TINY).save_to_preset(str(path))
    return str(path)


@pytest.fixture(scope="module")
def flickr_tsv(tmp_path_factory, flickr8k_dir):
    """The first 48 Flickr8k training images with their 5 captions each."""
    names = set((flickr8k_dir / "splits" / "train.txt").read_text().split()[:48])
    path = tmp_path_factory.mktemp("flickr") / "captions.tsv"
    with open(flickr8k_dir / "captions.tsv", newline="") as f, open(path, "w", newline="") as out:
        reader = csv.DictReader(f, delimiter="\t")
        writer = csv.DictWriter(out, reader.fieldnames, delimiter="\t", quoting=csv.QUOTE_NONE,
                                escapechar="\\")
        writer.writeheader()
        for row in reader:
            if row["image"] in names:
                writer.writerow(row)
    return str(path)


def test_short_training_run_on_flickr8k_lowers_the_loss(tiny_preset, flickr_tsv, flickr8k_dir, real_data,
                                                        tmp_path):
    config = TrainConfig(
        preset=tiny_preset, train_data=flickr_tsv, val_data=flickr_tsv,
        image_root=str(flickr8k_dir / "images"), global_batch_size=16, steps=36,
        learning_rate=2e-3, warmup_steps=3, model_dir=str(tmp_path / "run"), checkpoint_every=12,
        # On the real photos: the default reading, one record per image-caption pair. The
        # made-up Flickr8k's captions are drawn independently of its photos, so there the
        # loss can only fall by memorising pairs already seen: read per pair, no pair comes
        # twice in the first 15 steps and then only about 14 steps later, and 36 steps
        # stayed near chance (2.72, ln 16 = 2.77); read per image (captions drawn with
        # replacement), a quarter of the rows in steps 1-12 repeat a pair, so the loss
        # falls sooner (docs/bf16_training_quality.md, "The runs, in order").
        group_captions=None if real_data else True,
    )
    summary = run(config)
    losses = summary["loss_history"]
    assert summary["steps"] == 36 and len(losses) == 36
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.3, losses
    assert summary["skipped_records"]["empty_captions"] == 0
    # Outputs a user relies on.
    for name in ("summary.json", "train_config.json", "preset/config.json", "logs"):
        assert (tmp_path / "run" / name).exists(), name
    recall = summary["val_retrieval"]
    assert recall["num_images"] == 48 and recall["num_captions"] == 240
    assert 0 <= recall["image_to_text_R@1"] <= recall["image_to_text_R@5"] <= 100
    reloaded = CLIP.from_preset(str(tmp_path / "run" / "preset"))
    assert reloaded.get_config() == CLIP.from_preset(tiny_preset).get_config()


def _run_command(preset, data, model_dir, steps):
    return [sys.executable, str(REPO / "training" / "run.py"), f"--preset={preset}",
            f"--train_data={data}", "--val_data=", f"--model_dir={model_dir}", f"--steps={steps}",
            "--global_batch_size=8", "--checkpoint_every=3", "--shuffle_buffer=64",
            "--learning_rate=1e-3", "--warmup_steps=2"]


def test_killed_run_resumes_from_last_checkpoint_and_matches_uninterrupted_run(tiny_preset, tmp_path):
    from keras_clip import demo_data

    data_dir = tmp_path / "demo"
    demo_data.write_demo_dataset(str(data_dir), num_train=120, num_val=8, num_zero_shot=12,
                                 image_size=32, seed=0)
    data = str(data_dir / "train-*.tfrecord")
    steps = 24  # 15 steps per epoch: the resume lands mid-epoch and crosses an epoch
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    # Uninterrupted reference run, in this process with training/run.py's settings and
    # strategy (a third process would import TensorFlow and trace everything again).
    reference_dir = tmp_path / "reference"
    run(TrainConfig(preset=tiny_preset, train_data=data, val_data="", model_dir=str(reference_dir),
                    steps=steps, global_batch_size=8, checkpoint_every=3, shuffle_buffer=64,
                    learning_rate=1e-3, warmup_steps=2).validate(),
        strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))

    # Interrupted run: SIGKILL once checkpoint 9 exists, then rerun the same command.
    run_dir = tmp_path / "interrupted"
    command = _run_command(tiny_preset, data, run_dir, steps)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "ckpt-9.index").exists():
        assert proc.poll() is None, "training exited before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)

    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((reference_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    assert 9 <= summary["resumed_from_step"] < steps
    resumed = summary["resumed_from_step"]
    np.testing.assert_allclose(summary["loss_history"], reference["loss_history"][resumed:], rtol=1e-5)
    final = CLIP.from_preset(str(run_dir / "preset")).get_weights()
    expected = CLIP.from_preset(str(reference_dir / "preset")).get_weights()
    for a, b in zip(final, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    model = CLIP(**TINY)
    step = tf.Variable(0, dtype=tf.int64)
    keeper = CheckpointKeeper(tf.train.Checkpoint(model=model, step=step), str(tmp_path))
    saved = {}
    for number in (1, 2, 3):
        step.assign(number)
        model.logit_scale.log_scale.assign(float(number))
        keeper.save(number)
        saved[number] = model.get_weights()
    # Truncate the newest checkpoint's data file, as a crash during a write could.
    data_file = next(p for p in tmp_path.glob("ckpt-3.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:100])
    model.logit_scale.log_scale.assign(0.0)
    restored = keeper.restore_latest()
    assert restored.endswith("ckpt-2")
    assert int(step.numpy()) == 2
    assert float(model.logit_scale.log_scale) == 2.0
