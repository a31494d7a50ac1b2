"""The trainer's five stages, each called on its own (`keras_clip.training.loop`).

Every stage takes the previous stages' values (built by hand here where that is
shorter) and returns its own; composing them by hand gives exactly `run()`'s
summary.
"""
import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_clip import CLIP, demo_data
from keras_clip.data import shards
from keras_clip.data.spec import DataSpec
from keras_clip.training import TrainConfig, loop
from keras_clip.training.checkpointing import fingerprint_differences
from tests import harness

TINY = dict(embed_dim=32, image_size=32, vision_architecture="vit", vision_num_layers=1,
            vision_hidden_dim=64, vision_num_heads=2, vision_patch_size=8, context_length=24,
            text_hidden_dim=64, text_num_layers=1, text_num_heads=2)
BATCH = 4


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages_preset")
    keras.utils.set_random_seed(0)
    CLIP(**TINY).save_to_preset(str(root / "tiny"))
    return str(root / "tiny")


@pytest.fixture(scope="module")
def train_files(tmp_path_factory):
    """18 records in 2 files."""
    folder = tmp_path_factory.mktemp("stages_data")
    shards.write_shards(list(demo_data.generate_demo_examples(18, image_size=32, seed=0)),
                        str(folder), prefix="train", examples_per_shard=9)
    return str(folder / "train-*.tfrecord")


def _config(preset, data, model_dir, **overrides):
    settings = dict(preset=preset, train_data=data, val_data="", model_dir=str(model_dir), steps=3,
                    global_batch_size=BATCH, checkpoint_every=2, shuffle_buffer=16,
                    learning_rate=1e-3, warmup_steps=1, jit_compile="false")
    settings.update(overrides)
    return TrainConfig(**settings)


def _context(config, train_spec, val_spec=None):
    return loop.RunContext(config, tf.distribute.get_strategy(), True, 0, train_spec, val_spec)


# 1. Set-up ---------------------------------------------------------------------------


def test_set_up_writes_the_demo_data_and_parses_both_specs(preset, tmp_path):
    config = _config(preset, "demo", tmp_path / "run", val_data="demo", demo_examples=24)

    context = loop.set_up(config)

    folder = os.path.join(str(tmp_path / "run"), "demo_data")
    assert context.train_spec == DataSpec("tfrecord", os.path.join(folder, "train-*.tfrecord"),
                                          text=os.path.join(folder, "train-*.tfrecord"))
    assert context.val_spec.path == os.path.join(folder, "val-*.tfrecord")
    assert (context.is_chief, context.worker_id) == (True, 0)
    assert context.train_spec.count_records().records == 24
    assert context.val_spec.count_records().records == 200  # max(24 // 10, 200)
    assert os.path.exists(os.path.join(folder, "_COMPLETE"))
    # A second set-up in the same folder reuses the finished demo data.
    written = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}
    again = loop.set_up(config)
    assert (again.train_spec, again.val_spec) == (context.train_spec, context.val_spec)
    assert {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)} == written


def test_set_up_validates_the_config_before_anything_is_written(preset, tmp_path):
    with pytest.raises(ValueError, match=r"^`log_every` must be an integer >= 1\. Received: log_every=0$"):
        loop.set_up(_config(preset, "demo", tmp_path / "run", log_every=0))
    assert not (tmp_path / "run").exists()


def test_set_up_keeps_image_root_with_a_table_spec(preset, tmp_path):
    context = loop.set_up(_config(preset, str(tmp_path / "pairs.tsv"), tmp_path / "run",
                                  image_root="/images", val_data=str(tmp_path / "val.csv")))
    assert (context.train_spec.kind, context.train_spec.image_root) == ("table", "/images")
    assert (context.val_spec.kind, context.val_spec.image_root) == ("table", "/images")


def test_training_tables_are_read_by_row_unless_group_captions_and_that_is_in_the_fingerprint(preset, tmp_path):
    root = harness.write_flickr8k(tmp_path / "flickr", splits={"train": 4})  # 4 images x 5 captions
    table, images = str(root / "captions.tsv"), str(root / "images")
    default_config = _config(preset, table, tmp_path / "run", image_root=images, val_data=table)
    grouped_config = dataclasses.replace(default_config, group_captions=True)
    rows_config = dataclasses.replace(default_config, group_captions=False)
    default, grouped, rows = (loop.set_up(c) for c in (default_config, grouped_config, rows_config))

    assert default_config.group_captions is None
    assert loop.plan_data(grouped) == loop.DataPlan(4, {}, 4 // BATCH, 3)
    assert loop.plan_data(rows) == loop.plan_data(default) == loop.DataPlan(20, {}, 20 // BATCH, 3)
    assert not default.train_spec.group_by_image and default.val_spec.group_by_image  # evaluation groups
    # A checkpoint of the grouped run does not resume the per-row run (positions differ);
    # a grouped checkpoint has no `group_captions` key (as those written before the key).
    model = CLIP.from_preset(preset)
    fingerprints = [loop.run_fingerprint(c, model, 1) for c in (grouped_config, rows_config, default_config)]
    assert "group_captions" not in fingerprints[0]
    differences = fingerprint_differences(fingerprints[0], fingerprints[1])
    assert [(name, current) for name, _, current in differences] == [("group_captions", False)]
    assert fingerprints[1] == fingerprints[2]
    # Other data is read as stored: unset and true are fine, false is an error.
    for value in (None, True):
        shards = _config(preset, "shards/train-*.tfrecord", tmp_path / "shards_run", group_captions=value)
        assert not shards.validate().reads_table_by_row()
        assert "group_captions" not in loop.run_fingerprint(shards, model, 1)
    with pytest.raises(ValueError, match=r"^`group_captions=False` reads a CSV/TSV table"):
        loop.set_up(_config(preset, "demo", tmp_path / "demo_run", group_captions=False))


# 2. Data ----------------------------------------------------------------------------


def test_plan_data_counts_once_and_derives_the_steps(preset, train_files, tmp_path):
    spec = DataSpec.parse(train_files)
    by_epochs = loop.plan_data(_context(_config(preset, train_files, tmp_path, steps=0, epochs=3), spec))
    by_steps = loop.plan_data(_context(_config(preset, train_files, tmp_path, steps=7), spec))
    assert by_epochs == loop.DataPlan(18, {}, 18 // BATCH, 3 * (18 // BATCH))
    assert by_steps == loop.DataPlan(18, {}, 4, 7)
    big_batch = loop.plan_data(_context(_config(preset, train_files, tmp_path, steps=0, epochs=2,
                                                global_batch_size=32), spec))
    assert (big_batch.steps_per_epoch, big_batch.total_steps) == (1, 2)


def test_plan_data_rejects_data_without_records(preset, tmp_path):
    empty = tmp_path / "empty.tfrecord"
    empty.write_bytes(b"")
    context = _context(_config(preset, str(empty), tmp_path), DataSpec.parse(str(empty)))
    with pytest.raises(ValueError, match="^`train_data` holds no records. Received: train_data="):
        loop.plan_data(context)


# 3. Model and restore -------------------------------------------------------------------


def test_build_and_restore_starts_fresh_then_resumes_from_the_checkpoint(preset, train_files, tmp_path):
    config = _config(preset, train_files, tmp_path / "run")
    context = _context(config, DataSpec.parse(train_files))
    plan = loop.DataPlan(18, {}, 4, 3)

    fresh = loop.build_and_restore(context, plan)

    assert (fresh.start_step, fresh.resume_positions) == (0, [0])
    assert fresh.model.get_config() == CLIP.from_preset(preset).get_config()
    np.testing.assert_array_equal(fresh.model.get_weights()[0], CLIP.from_preset(preset).get_weights()[0])
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved == dataclasses.asdict(config)
    fresh.global_step.assign(2)
    fresh.data_positions.assign([9])
    first_weight = fresh.model.trainable_variables[0]
    first_weight.assign(first_weight + 0.25)
    fresh.keeper.save(2)

    resumed = loop.build_and_restore(context, plan)

    assert (resumed.start_step, resumed.resume_positions) == (2, [9])
    np.testing.assert_array_equal(resumed.model.trainable_variables[0].numpy(), first_weight.numpy())


# 4. The loop and 5. finalize -------------------------------------------------------------


def test_stages_by_hand_give_run_s_summary(preset, train_files, tmp_path):
    config = _config(preset, train_files, tmp_path / "by_hand")
    seen = []

    context = loop.set_up(config)
    plan = loop.plan_data(context)
    state = loop.build_and_restore(context, plan)
    result = loop.train_loop(context, plan, state, step_callback=lambda step, logs: seen.append(step))

    assert (result.steps, len(result.loss_history), seen) == (3, 3, [1, 2, 3])
    assert result.final_logs["loss"] == result.loss_history[-1]
    assert set(result.final_logs) == {m.name for m in state.model.metrics}
    assert int(state.global_step.numpy()) == 3
    # Checkpoints every 2 steps and at the end.
    assert sorted(os.path.basename(p) for p in state.keeper.candidates()) == ["ckpt-2", "ckpt-3"]
    assert result.counters.as_dict()["examples_out"] >= 3 * BATCH

    summary = loop.finalize(context, plan, state, result)

    reference = loop.run(_config(preset, train_files, tmp_path / "run"))
    for name in ("steps", "resumed_from_step", "loss_history", "final_metrics", "records_consumed",
                 "data_problems", "per_replica_logits_shape", "stopped_early"):
        assert summary[name] == reference[name], name
    assert summary["per_replica_logits_shape"] == [BATCH, BATCH]
    assert json.loads((tmp_path / "by_hand" / "summary.json").read_text()) == summary
    reloaded = CLIP.from_preset(str(tmp_path / "by_hand" / "preset"))
    np.testing.assert_array_equal(reloaded.get_weights()[0], state.model.get_weights()[0])


def test_finalize_alone_records_a_failing_evaluation(preset, train_files, tmp_path, monkeypatch):
    config = _config(preset, train_files, tmp_path / "run", val_data=train_files)
    context = _context(config, DataSpec.parse(train_files), DataSpec.parse(train_files))
    plan = loop.DataPlan(18, {"damaged_files": {"x": 1}}, 4, 3)
    state = loop.build_and_restore(context, plan)
    result = loop.LoopResult(steps=0, loss_history=[], final_logs={}, first_step_seconds=0.0,
                             train_seconds=0.0, counters=_Counters(), stopped_early=False)

    def broken(*args, **kwargs):
        raise RuntimeError("no validation today")

    monkeypatch.setattr(loop, "evaluate_retrieval", broken)
    summary = loop.finalize(context, plan, state, result)

    assert summary["evaluation_errors"] == {"val_retrieval": "RuntimeError: no validation today"}
    assert summary["data_problems"] == {"damaged_files": {"x": 1}}
    assert (summary["steps"], summary["final_metrics"], summary["per_replica_logits_shape"]) == (0, {}, None)
    assert summary["skipped_records"] == {"records_read": 0}
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


class _Counters:
    def as_dict(self):
        return {"records_read": 0}
