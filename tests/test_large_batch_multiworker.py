"""Training beyond one batch in memory under a 2-worker MultiWorkerMirroredStrategy.

Two worker processes on localhost (tests/scripts/multiworker_step.py, one TF_CONFIG
each) train one step on 4 pairs each; the reference is one process holding all 8
pairs with the plain step. Global negatives: each worker scores its 4 rows against
all 8 columns, and the summed update equals the reference's.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "multiworker_step.py"
REPO = pathlib.Path(__file__).resolve().parents[1]

_MODES = {
    "gradient_cache": {"compile": {"gradient_cache_chunks": 2}},
    "sigmoid": {"model": {"loss": "sigmoid"}},
    "sigmoid_gradient_cache_xla": {"model": {"loss": "sigmoid"},
                                   "compile": {"gradient_cache_chunks": 2, "jit_compile": True}},
    "locked_image": {"lock": {"image": True}},
    "patch_dropout_remat_gradient_cache": {"model": {"vision_patch_dropout": 0.5},
                                           "compile": {"gradient_cache_chunks": 2, "remat": True},
                                           "fixed_patches": True},
}


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """`{mode name: figures}` from the chief of a 2-worker run of every mode."""
    out = tmp_path_factory.mktemp("multiworker_step") / "result.json"
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO),
                   TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                         "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen(
            [sys.executable, str(SCRIPT), json.dumps(list(_MODES.values())), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=900) for p in processes]
    finally:
        for p in processes:  # never leave a worker behind
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    result = json.loads(out.read_text())
    assert result["num_replicas"] == 2
    return dict(zip(_MODES, result["modes"]))


def _assert_equal_to_one_process(mode):
    assert mode["loss"] == pytest.approx(mode["reference_loss"], rel=1e-5)
    assert mode["max_reference_update"] > 1e-2  # a real update, not a vanishing one
    assert mode["max_update_diff"] <= 1e-5
    # Global negatives: each worker's 4 rows against all 8 columns; the reference's 8 x 8.
    assert mode["reference_logits_shapes"] == [[8, 8]]


def test_gradient_cache_on_two_workers_equals_one_process_plain_step(two_workers):
    mode = two_workers["gradient_cache"]
    _assert_equal_to_one_process(mode)
    assert mode["logits_shapes"] == [[4, 8]]  # one loss over the whole batch, not per chunk


def test_sigmoid_loss_on_two_workers_equals_one_process(two_workers):
    mode = two_workers["sigmoid"]
    _assert_equal_to_one_process(mode)
    assert mode["logits_shapes"] == [[4, 8]]  # no worker holds the 8 x 8 matrix
    assert "logit_bias/bias" in mode["changed"]


def test_sigmoid_gradient_cache_with_xla_towers_on_two_workers(two_workers):
    mode = two_workers["sigmoid_gradient_cache_xla"]
    _assert_equal_to_one_process(mode)
    assert mode["logits_shapes"] == [[4, 8]]


def test_locked_image_tower_on_two_workers(two_workers):
    mode = two_workers["locked_image"]
    _assert_equal_to_one_process(mode)
    assert not [name for name in mode["trainable"] if name.startswith("visual/")]
    assert not [name for name in mode["changed"] if name.startswith("visual/")]
    assert [name for name in mode["changed"] if name.startswith("text/")]


def test_patch_dropout_with_remat_and_gradient_cache_on_two_workers(two_workers):
    # The same kept patches per pair in both runs (a fixed table instead of a draw).
    mode = two_workers["patch_dropout_remat_gradient_cache"]
    _assert_equal_to_one_process(mode)
    assert mode["logits_shapes"] == [[4, 8]]
