"""Multi-worker faults: signals to the launcher, and a stop decided by one clock."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import keras
import pytest

from keras_clip import CLIP

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, image_size=32, vision_architecture="vit", vision_num_layers=1,
            vision_hidden_dim=64, vision_num_heads=2, vision_patch_size=8, context_length=24,
            text_hidden_dim=64, text_num_layers=1, text_num_heads=2)
NO_WORKER_LEFT_SECONDS = 20

# A stand-in worker: records its pid, then sleeps; worker 1 may ignore SIGTERM.
FAKE_WORKER = """
import json, os, signal, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
if index == 1 and os.environ.get("IGNORE_SIGTERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
with open(os.path.join(sys.argv[1], f"worker{index}.pid"), "w") as f:
    f.write(str(os.getpid()))
print("worker", index, "ready", flush=True)
time.sleep(600)
"""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum, ignore", [(signal.SIGTERM, True), (signal.SIGINT, False),
                                            (signal.SIGHUP, False)])
def test_signal_to_the_launcher_ends_every_worker(tmp_path, signum, ignore):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    if ignore:
        env["IGNORE_SIGTERM"] = "1"
    launcher = subprocess.Popen(
        [sys.executable, str(REPO / "training" / "launch.py"), "--num_workers=2", f"--script={script}",
         "--", str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = []
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2:
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "workers did not start"
            pids = [int(p.read_text()) for p in sorted(tmp_path.glob("worker*.pid")) if p.read_text()]
            time.sleep(0.1)
        time.sleep(0.5)  # the launcher is in its polling loop
        launcher.send_signal(signum)
        start = time.monotonic()
        while any(_alive(pid) for pid in pids) and time.monotonic() - start < NO_WORKER_LEFT_SECONDS:
            time.sleep(0.1)
        survivors = [pid for pid in pids if _alive(pid)]
        assert survivors == [], f"workers {survivors} still running {NO_WORKER_LEFT_SECONDS} s after signal {signum}"
        out, err = launcher.communicate(timeout=30)
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + signum
    assert f"received signal {int(signum)}; stopped all 2 workers" in out + err
    assert re.search(r"\[launcher\] 2 workers at 127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+", out)
    if ignore:
        assert f"worker 1 (pid {pids[1]}) ignored signal 15; sent SIGKILL" in out


# Makes worker 1's wall clock run 1000x fast, as a badly skewed or jumping clock would.
FAST_CLOCK = """
import json, os, time
if json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {}).get("index") == 1:
    _real, _origin = time.time, time.time()
    time.time = lambda: _origin + 1000.0 * (_real() - _origin)
"""


def test_workers_with_disagreeing_clocks_stop_at_the_chiefs_step(tmp_path):
    from keras_clip import demo_data

    keras.utils.set_random_seed(0)
    CLIP(**TINY).save_to_preset(str(tmp_path / "preset"))
    demo_data.write_demo_dataset(str(tmp_path / "data"), num_train=64, num_val=8, num_zero_shot=12,
                                 image_size=32, seed=0)
    (tmp_path / "clock").mkdir()
    (tmp_path / "clock" / "sitecustomize.py").write_text(FAST_CLOCK)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "clock"), os.environ.get("PYTHONPATH", "")]))
    env.pop("TF_CONFIG", None)
    model_dir = tmp_path / "job"
    command = [sys.executable, str(REPO / "training" / "launch.py"), "--num_workers=2", "--",
               f"--preset={tmp_path / 'preset'}", f"--train_data={tmp_path / 'data' / 'train-*.tfrecord'}",
               "--val_data=", f"--model_dir={model_dir}", "--steps=100000", "--global_batch_size=16",
               "--checkpoint_every=1000", "--shuffle_buffer=64", "--jit_compile=false",
               "--strategy=multiworker", "--max_train_seconds=20"]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400,
                              start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the job hung: {(e.stdout or b'')[-3000:]!r}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    ended = dict(re.findall(r"\[worker (\d)\].*Training ended at step (\d+)", done.stdout))
    assert set(ended) == {"0", "1"}, done.stdout[-4000:]
    assert ended["0"] == ended["1"]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["stopped_early"] is True
    assert summary["steps"] == int(ended["0"]) > 1  # worker 1's clock alone would have stopped at step 1
    assert (model_dir / "checkpoints" / f"ckpt-{summary['steps']}.index").exists()
