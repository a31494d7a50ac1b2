"""Multi-worker training over loopback: 2 workers equal 1 process with the global batch."""
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

from keras_clip import CLIP
from tests import harness

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = harness.TINY_VIT_TRAIN
PER_REPLICA_BATCH = 8
STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from keras_clip import demo_data

    root = tmp_path_factory.mktemp("multiworker")
    keras.utils.set_random_seed(0)
    CLIP(**TINY).save_to_preset(str(root / "preset"))
    demo_data.write_demo_dataset(str(root / "data"), num_train=STEPS * 2 * PER_REPLICA_BATCH,
                                 num_val=8, num_zero_shot=12, image_size=32, seed=0)
    return root


def _flags(root, model_dir, extra=()):
    return [f"--preset={root / 'preset'}", f"--train_data={root / 'data' / 'train-*.tfrecord'}",
            "--val_data=", f"--model_dir={model_dir}", f"--steps={STEPS}",
            f"--global_batch_size={2 * PER_REPLICA_BATCH}", "--checkpoint_every=2",
            "--shuffle_buffer=64", "--learning_rate=1e-3", "--warmup_steps=2",
            "--jit_compile=true", *extra]


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    return env


def test_two_workers_reproduce_one_process_with_the_global_batch(setup, tmp_path):
    single = subprocess.run(
        [sys.executable, str(REPO / "training" / "run.py"),
         *_flags(setup, tmp_path / "single", ["--strategy=one_device"])],
        env=_env(), capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    launched = subprocess.run(
        [sys.executable, str(REPO / "training" / "launch.py"), "--num_workers=2", "--",
         *_flags(setup, tmp_path / "multi", ["--strategy=multiworker"])],
        env=_env(), capture_output=True, text=True, timeout=900)
    assert launched.returncode == 0, launched.stdout[-5000:] + launched.stderr[-3000:]
    assert "[worker 1]" in launched.stdout and "all 2 workers finished" in launched.stdout

    one = json.loads((tmp_path / "single" / "summary.json").read_text())
    two = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert two["num_replicas"] == 2 and one["num_replicas"] == 1
    # Global negatives: each worker scores its 8 rows against all 16 columns.
    assert two["per_replica_logits_shape"] == [PER_REPLICA_BATCH, 2 * PER_REPLICA_BATCH]
    assert one["per_replica_logits_shape"] == [2 * PER_REPLICA_BATCH, 2 * PER_REPLICA_BATCH]
    assert len(two["loss_history"]) == STEPS
    np.testing.assert_allclose(two["loss_history"], one["loss_history"], rtol=1e-5)
    # The communication probe is a benchmark now (benchmarks/collectives.py), not part of a run.
    assert "collectives" not in one and "collectives" not in two
    final_two = CLIP.from_preset(str(tmp_path / "multi" / "preset")).get_weights()
    final_one = CLIP.from_preset(str(tmp_path / "single" / "preset")).get_weights()
    for a, b in zip(final_two, final_one):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Only the chief wrote checkpoints; no worker scratch folder is left behind.
    names = sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir())
    assert all(n.startswith(("ckpt-", "checkpoint")) for n in names), names


def test_killed_worker_stops_the_job_with_a_message_and_rerun_resumes(setup, tmp_path):
    model_dir = tmp_path / "job"
    command = [sys.executable, str(REPO / "training" / "launch.py"), "--num_workers=2", "--",
               # XLA towers are covered above; without them each of the four worker
               # processes here starts its steps without compiling.
               *_flags(setup, model_dir, ["--strategy=multiworker", "--steps=400",
                                          "--jit_compile=false"])]
    launcher = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _kill_worker_and_check(launcher, model_dir)
    finally:  # never leave workers running if an assertion fails
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for proc_dir in pathlib.Path("/proc").iterdir():
            try:
                if str(model_dir).encode() in (proc_dir / "cmdline").read_bytes():
                    os.kill(int(proc_dir.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue
    checkpoints = sorted(int(p.name.split("-")[1].split(".")[0])
                         for p in (model_dir / "checkpoints").glob("ckpt-*.index"))
    assert checkpoints, "the chief wrote no checkpoint"

    # Rerun a shorter job in the same model_dir: it resumes from the last checkpoint.
    rerun = [a if not a.startswith("--steps=") else f"--steps={checkpoints[-1] + 2}" for a in command]
    done = subprocess.run(rerun, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] in checkpoints
    assert summary["steps"] == checkpoints[-1] + 2


def _kill_worker_and_check(launcher, model_dir):
    deadline = time.time() + 600
    while not (model_dir / "checkpoints" / "ckpt-4.index").exists():
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    # Find worker 1: the run.py process whose TF_CONFIG has task index 1.
    victim, workers = None, []
    for proc_dir in pathlib.Path("/proc").iterdir():
        try:
            cmdline = (proc_dir / "cmdline").read_bytes()
            if b"run.py" not in cmdline or str(model_dir).encode() not in cmdline:
                continue
            workers.append(int(proc_dir.name))
            if b'"index": 1' in (proc_dir / "environ").read_bytes():
                victim = int(proc_dir.name)
        except (OSError, ValueError):
            continue
    assert victim is not None, workers
    os.kill(victim, signal.SIGKILL)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    assert f"worker 1 (pid {victim}) killed by signal 9" in err


def test_collectives_benchmark_over_two_workers_times_the_step_sizes(setup, tmp_path):
    """benchmarks/collectives.py, launched on 2 workers, runs the step's collectives at
    the step's sizes (what `--time_collectives_steps` of the trainer did before)."""
    output = tmp_path / "collectives.json"
    launched = subprocess.run(
        [sys.executable, str(REPO / "training" / "launch.py"), "--num_workers=2",
         f"--script={REPO / 'benchmarks' / 'collectives.py'}", "--",
         f"--preset={setup / 'preset'}", f"--global_batch_size={2 * PER_REPLICA_BATCH}", "--steps=3",
         "--warmup=1", f"--output={output}"],
        env=_env(), capture_output=True, text=True, timeout=900)
    assert launched.returncode == 0, launched.stdout[-5000:] + launched.stderr[-3000:]
    collectives = json.loads(output.read_text())
    params = CLIP(**TINY).count_params()
    assert (collectives["num_replicas"], collectives["steps"]) == (2, 3)
    assert collectives["gathered_bytes"] == 2 * (2 * PER_REPLICA_BATCH) * TINY["embed_dim"] * 4
    # Dense gradients for every variable but the token table, whose gradient is one
    # row per token of the local batch (as tf.IndexedSlices).
    vocabulary_rows, width = CLIP(**TINY).text.token_embedding.embeddings.shape
    rows = PER_REPLICA_BATCH * TINY["context_length"]
    assert collectives["sparse_gradient_rows"] == rows
    assert collectives["all_reduced_bytes"] == 4 * (params - vocabulary_rows * width + rows * width)
    assert min(collectives[k] for k in ("empty_ms", "all_gather_ms", "gradient_all_reduce_ms")) >= 0


def test_collective_probe_in_one_process_reports_sizes_and_no_communication():
    import tensorflow as tf

    from benchmarks.collectives import time_collectives

    model = CLIP(**TINY)
    result = time_collectives(model, tf.distribute.OneDeviceStrategy("/cpu:0"), global_batch_size=6,
                              steps=2, warmup=1)
    vocabulary_rows, width = model.text.token_embedding.embeddings.shape
    assert result["num_replicas"] == 1
    assert result["gathered_bytes"] == 2 * 6 * TINY["embed_dim"] * 4
    assert result["sparse_gradient_rows"] == 6 * TINY["context_length"]
    assert result["all_reduced_bytes"] == 4 * (model.count_params() - vocabulary_rows * width
                                               + 6 * TINY["context_length"] * width)
