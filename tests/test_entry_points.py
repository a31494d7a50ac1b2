"""The README's commands, run as a user runs them: each entry point as a subprocess.

One chain, as in the README: `training/run.py` on the demo data (shortened by flags)
prints its summary -> `export/export.py` exports the trained preset ->
`serving/local_server.py` serves it -> `serving/cli.py` queries it; and
`python -m keras_clip.evaluate` on a classification folder. Each result is checked
against the same computation done in this process with the library.
"""
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_clip import CLIP
from keras_clip.zero_shot import ZeroShotClassifier
from tests import harness
from tests.conftest import REPO_ROOT

LABELS = ["red circle", "blue square", "green triangle"]
TIMEOUT = 600


def _python(args, cwd, **kwargs):
    """Runs `python args...` with this interpreter; returns the completed process."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, *args], cwd=str(cwd), env=env, capture_output=True,
                            text=True, timeout=TIMEOUT, **kwargs)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`python training/run.py` on the demo data: 12 steps of a tiny preset."""
    root = tmp_path_factory.mktemp("main_job")
    harness.tiny_clip(**harness.TINY_VIT_TRAIN).save_to_preset(str(root / "start"))
    model_dir = root / "run"
    result = _python([str(REPO_ROOT / "training" / "run.py"), f"--preset={root / 'start'}",
                      f"--model_dir={model_dir}", "--demo_examples=384", "--steps=12",
                      "--global_batch_size=32", "--checkpoint_every=6", "--log_every=3"],
                     cwd=root)
    return {"root": root, "model_dir": model_dir, "stdout": result.stdout}


def test_main_job_prints_the_summary_it_wrote(trained):
    summary = json.loads((trained["model_dir"] / "summary.json").read_text())
    assert summary["steps"] == 12
    zero_shot = summary["demo_zero_shot"]
    lines = [line for line in trained["stdout"].splitlines()
             if line.startswith(("Demo zero-shot", "Validation retrieval", "Summary written"))]
    assert len(lines) == 3, trained["stdout"][-3000:]
    assert lines[-3] == (f"Demo zero-shot top-1 on {zero_shot['num_classes']} held-out classes: "
                         f"{100 * zero_shot['top1']:.1f}% (chance {100 * zero_shot['chance']:.1f}%)")
    assert zero_shot["num_classes"] == 12 and zero_shot["chance"] == pytest.approx(1 / 12)
    printed = dict(re.findall(r"(\w+_R@\d+) ([\d.]+)", lines[-2]))
    assert printed == {k: f"{v:.1f}" for k, v in summary["val_retrieval"].items() if "R@" in k}
    assert len(printed) == 6
    assert lines[-1] == f"Summary written to {trained['model_dir'] / 'summary.json'}"
    # The saved preset is the trained model, not the starting one.
    start = CLIP.from_preset(str(trained["root"] / "start"))
    final = CLIP.from_preset(str(trained["model_dir"] / "preset"))
    assert start.get_config() == final.get_config()
    assert not np.allclose(start.get_weights()[0], final.get_weights()[0])


@pytest.fixture(scope="module")
def exported(trained):
    root = trained["root"]
    (root / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    _python([str(REPO_ROOT / "export" / "export.py"), f"--preset={trained['model_dir'] / 'preset'}",
             f"--export_dir={root / 'exports'}", "--version=3", f"--labels={root / 'labels.txt'}",
             "--templates=imagenet_simple", "--top_k=2"], cwd=root)
    model = CLIP.from_preset(str(trained["model_dir"] / "preset"))
    return {"root": root, "base": root / "exports", "model": model}


def test_export_command_writes_signatures_equal_to_the_model(exported):
    import tensorflow_text  # noqa: F401 - the tokenizer's ops

    model, base = exported["model"], exported["base"]
    assert (base / "models.config").is_file() and (base / "3" / "saved_model.pb").is_file()
    loaded = tf.saved_model.load(str(base / "3"))
    texts = ["a photo of a red circle.", "a blue square"]
    served = loaded.signatures["encode_text"](texts=tf.constant(texts))["text_embeddings"].numpy()
    expected = model.encode_text(harness_tokens(model, texts)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


def harness_tokens(model, texts):
    from keras_clip.preprocessing.tokenizer import CLIPTokenizer

    return CLIPTokenizer(context_length=model.context_length, fix_text=True)(tf.constant(texts))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_cli_against_the_local_server_matches_the_model(exported):
    root, model = exported["root"], exported["model"]
    images = [harness.encode(photo, "PNG") for photo in harness.photo_crops(2, size=(48, 40), seed=3)]
    paths = []
    for i, data in enumerate(images):
        paths.append(root / f"photo{i}.png")
        paths[-1].write_bytes(data)
    port = _free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "serving" / "local_server.py"), "--model_name=clip",
         f"--model_base_path={exported['base']}", f"--port={port}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(root))
    cli = [str(REPO_ROOT / "serving" / "cli.py"), f"--server=127.0.0.1:{port}", "--timeout=60"]
    try:
        # Wait in this process (a CLI process per poll would import TensorFlow each
        # time, competing with the loading server for the CPU), then ask the CLI.
        from keras_clip.serving.client import CLIPClient

        with CLIPClient(f"127.0.0.1:{port}", timeout=10, max_attempts=1) as client:
            harness.wait_until_serving(client, server, root / "server.log")
        status = json.loads(_python([*cli, "status"], cwd=root).stdout)
        assert [entry["state"] for entry in status] == ["AVAILABLE"], status
        classified = json.loads(_python([*cli, "classify", *map(str, paths)], cwd=root).stdout)
        embeddings = np.array(json.loads(_python([*cli, "encode_image", *map(str, paths)], cwd=root).stdout))
        failed = subprocess.run([sys.executable, *cli, "--model_name=nope", "status"],
                                capture_output=True, text=True, cwd=str(root), timeout=TIMEOUT)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    from keras_clip.zero_shot_data import load_dataset_prompts

    expected = model.encode_image(model.image_preprocessor()(tf.constant(images))).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    classifier = ZeroShotClassifier(model, LABELS, templates=load_dataset_prompts("imagenet_simple")[1])
    scores = classifier(tf.constant(images)).numpy()
    for row, result in zip(scores, classified):
        order = np.argsort(-row)[:2]
        assert result["top_labels"] == [LABELS[i] for i in order]
        np.testing.assert_allclose(result["top_scores"], row[order], atol=1e-5)
    assert failed.returncode == 1
    assert json.loads(failed.stderr.strip().splitlines()[-1])["error"] == "NOT_FOUND"


def test_evaluate_module_writes_metrics_that_agree_with_its_confusion_matrix(tmp_path, cifar10_dir):
    harness.tiny_clip(seed=2).save_to_preset(str(tmp_path / "preset"))
    _python(["-m", "keras_clip.evaluate", f"--preset={tmp_path / 'preset'}", "--task=zero_shot",
             f"--dataset={cifar10_dir}", "--templates=cifar10", "--max_examples=50",
             f"--output_dir={tmp_path / 'out'}"], cwd=REPO_ROOT)
    metrics = json.loads((tmp_path / "out" / "zero_shot.json").read_text())["metrics"]
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == metrics["num_examples"] == 50
    assert metrics["top1"] == pytest.approx(100 * np.trace(confusion) / 50)
    assert (tmp_path / "out" / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")
