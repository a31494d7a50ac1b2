"""Exported SavedModel: every signature, reloaded without keras_clip, equals the model."""
import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_clip.export import saved_model as export_lib
from keras_clip.preprocessing.tokenizer import CLIPTokenizer
from keras_clip.zero_shot import ZeroShotClassifier
from tests import harness

LABELS = ["dog", "child", "bicycle", "beach"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]
NUM_PHOTOS = 8
TOLERANCE = 1e-5
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# -- shared with tests/test_serving.py --------------------------------------------------
def tiny_clip():
    """A small random-weight CLIP (32px ViT, 16-token text) that exports in seconds."""
    return harness.tiny_clip(seed=0, vision_patch_size=16)


def flickr8k_samples(flickr8k_dir, count=NUM_PHOTOS):
    """`count` photos (bytes) and the first caption of each."""
    images, captions = [], []
    with open(flickr8k_dir / "captions.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["caption_idx"] != "0":
                continue
            images.append((flickr8k_dir / "images" / row["image"]).read_bytes())
            captions.append(row["caption"])
            if len(images) == count:
                break
    return images, captions


def keras_reference(model, images, captions):
    """What each signature should return, computed with the in-memory Keras model."""
    image_embeddings = model.encode_image(model.image_preprocessor()(tf.constant(images)))
    tokenizer = CLIPTokenizer(context_length=model.context_length, fix_text=True)
    text_embeddings = model.encode_text(tokenizer(tf.constant(captions)))
    logits = model.logit_scale() * tf.matmul(image_embeddings, text_embeddings, transpose_b=True)
    classifier = ZeroShotClassifier(model, LABELS, templates=TEMPLATES)
    scores = classifier(tf.constant(images)).numpy()
    return {
        "image_embeddings": image_embeddings.numpy(),
        "text_embeddings": text_embeddings.numpy(),
        "logits_per_image": logits.numpy(),
        "scores": scores,
        "top_label": [LABELS[i] for i in classifier.predict_labels(tf.constant(images))],
    }


def export_tiny(base_dir):
    model = tiny_clip()
    export_lib.export_saved_model(model, str(base_dir), 1, class_names=LABELS,
                                  templates=TEMPLATES)
    return model


# -- a fresh interpreter that knows only tensorflow and tensorflow_text -------------------
RELOAD_SCRIPT = r"""
import importlib.abc, importlib.machinery, json, sys


class NoKerasClip(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # keras_clip is installed in this environment; make importing it fail, so a load
    # that needed it (to revive registered Keras objects, say) fails the test.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "keras_clip":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"{spec.name} is blocked in this process")

    def exec_module(self, module):
        raise ImportError("blocked")


sys.meta_path.insert(0, NoKerasClip())
import numpy as np
from tensorflow.python.client import pywrap_tf_session
from tensorflow.core.framework import op_def_pb2
import tensorflow as tf

def registered_ops():
    ops = op_def_pb2.OpList()
    ops.ParseFromString(pywrap_tf_session.TF_GetBuffer(pywrap_tf_session.TF_GetAllOpList()))
    return {op.name for op in ops.op}

core_registered = registered_ops()
import tensorflow_text  # noqa: F401
tf_text_ops = registered_ops() - core_registered

version_dir, inputs_path, out_path = sys.argv[1:4]
inputs = np.load(inputs_path, allow_pickle=True)
images, captions = list(inputs["images"]), list(inputs["captions"])
loaded = tf.saved_model.load(version_dir)
sig = loaded.signatures
results = {}
results.update(sig["encode_image"](image_bytes=tf.constant(images)))
results.update(sig["encode_text"](texts=tf.constant(captions)))
results.update(sig["similarity"](image_bytes=tf.constant(images), texts=tf.constant(captions)))
results.update(sig["classify"](image_bytes=tf.constant(images)))
results = {k: v.numpy() for k, v in results.items()}
results["serving_default_top_labels"] = sig["serving_default"](image_bytes=tf.constant(images))["top_labels"].numpy()
errors = {}
for name, call in [("empty_images", lambda: sig["encode_image"](image_bytes=tf.constant([], tf.string))),
                   ("empty_texts", lambda: sig["encode_text"](texts=tf.constant([], tf.string)))]:
    try:
        call()
        errors[name] = None
    except tf.errors.InvalidArgumentError as e:
        errors[name] = e.message

# Every op of every graph: the main graph and the whole function library.
from tensorflow.core.protobuf import saved_model_pb2
saved_model = saved_model_pb2.SavedModel()
saved_model.ParseFromString(open(version_dir + "/saved_model.pb", "rb").read())
graph = saved_model.meta_graphs[0].graph_def
function_names = {f.signature.name for f in graph.library.function}
ops = {n.op for n in graph.node}
for function in graph.library.function:
    ops |= {n.op for n in function.node_def}
allowed = set(dir(tf.raw_ops)) | tf_text_ops | function_names
report = {
    "keras_clip_imported": any(m.startswith("keras_clip") for m in sys.modules),
    "ops": sorted(ops - function_names),
    "disallowed": sorted(ops - allowed),
    "tf_text_ops_used": sorted(ops & tf_text_ops),
    "signatures": {name: {"inputs": sorted(s.inputs), "outputs": sorted(s.outputs),
                          "input_dtypes": sorted({s.inputs[i].dtype for i in s.inputs})}
                   for name, s in saved_model.meta_graphs[0].signature_def.items()
                   if not name.startswith("__")},
    "errors": errors,
}
np.savez(out_path, **results)
json.dump(report, open(out_path + ".json", "w"))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, flickr8k_dir):
    base = tmp_path_factory.mktemp("export") / "clip"
    model = export_tiny(base)
    images, captions = flickr8k_samples(flickr8k_dir)
    inputs_path = base.parent / "inputs.npz"
    np.savez(inputs_path, images=np.array(images, dtype=object),
             captions=np.array(captions, dtype=object))
    out_path = str(base.parent / "reloaded.npz")
    env = dict(os.environ, PYTHONPATH="")  # nothing from this repository
    subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(base / "1"), str(inputs_path), out_path],
        check=True, cwd=str(base.parent), env=env, timeout=300,
    )
    reloaded = dict(np.load(out_path, allow_pickle=True))
    with open(out_path + ".json") as f:
        report = json.load(f)
    return {
        "base": base,
        "reloaded": reloaded,
        "report": report,
        "expected": keras_reference(model, images, captions),
    }


def test_reload_process_imports_only_tensorflow_and_tf_text(exported):
    report = exported["report"]
    # keras_clip cannot be imported in that process (see RELOAD_SCRIPT), and every
    # signature still ran: the SavedModel needs nothing of ours, only its graphs.
    assert not report["keras_clip_imported"]
    # The tokenizer's string ops come from tensorflow-text (linked by TF Serving), and
    # every op is a TF core or tf-text op.
    assert report["tf_text_ops_used"], report["ops"]


def test_layout_is_tf_serving_version_folder(exported):
    version_dir = exported["base"] / "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables" / "variables.index").is_file()
    assert (version_dir / "assets").is_dir()
    assert (version_dir / "assets.extra" / "tf_serving_warmup_requests").is_file()


@pytest.mark.parametrize("output", ["image_embeddings", "text_embeddings",
                                    "logits_per_image", "scores"])
def test_signature_matches_keras_model(exported, output):
    reloaded, expected = exported["reloaded"][output], exported["expected"][output]
    assert reloaded.shape == expected.shape
    np.testing.assert_allclose(reloaded, expected, rtol=0, atol=TOLERANCE)


def test_embeddings_are_unit_norm(exported):
    for name in ("image_embeddings", "text_embeddings"):
        norms = np.linalg.norm(exported["reloaded"][name], axis=-1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_classify_top_labels_match_zero_shot_classifier(exported):
    reloaded = exported["reloaded"]
    top = [label.decode() for label in reloaded["top_labels"][:, 0]]
    assert top == exported["expected"]["top_label"]
    assert reloaded["top_labels"].shape == (NUM_PHOTOS, len(LABELS))
    np.testing.assert_allclose(reloaded["top_scores"][:, 0], reloaded["scores"].max(-1), atol=0)
    # `serving_default` is `classify` when labels are given.
    np.testing.assert_array_equal(reloaded["serving_default_top_labels"], reloaded["top_labels"])


def test_signatures_have_documented_names(exported):
    signatures = exported["report"]["signatures"]
    assert signatures["encode_image"]["inputs"] == ["image_bytes"]
    assert signatures["encode_image"]["outputs"] == ["image_embeddings"]
    assert signatures["encode_text"]["inputs"] == ["texts"]
    assert signatures["encode_text"]["outputs"] == ["text_embeddings"]
    assert signatures["classify"]["inputs"] == ["image_bytes"]
    assert signatures["classify"]["outputs"] == ["scores", "top_labels", "top_scores"]
    assert signatures["similarity"]["inputs"] == ["image_bytes", "texts"]
    assert signatures["similarity"]["outputs"] == ["logits_per_image"]
    assert signatures["serving_default"] == signatures["classify"]
    for signature in signatures.values():
        assert signature["input_dtypes"] == [tf.string.as_datatype_enum]


def test_graphs_hold_only_core_and_tf_text_ops(exported):
    report = exported["report"]
    assert report["disallowed"] == []
    assert not {"PyFunc", "PyFuncStateless", "EagerPyFunc"} & set(report["ops"])
    assert "StatefulPartitionedCall" in report["ops"]  # the library functions were scanned


def test_empty_batch_gives_clear_error(exported):
    errors = exported["report"]["errors"]
    assert "`image_bytes` is an empty batch" in errors["empty_images"]
    assert "`texts` is an empty batch" in errors["empty_texts"]


def test_warmup_file_parses_as_prediction_logs(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    path = str(exported["base"] / "1" / export_lib.WARMUP_FILE)
    signatures = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.name == "clip"
        signatures.append(request.model_spec.signature_name)
    assert sorted(signatures) == ["classify", "encode_image", "encode_text",
                                  "serving_default", "similarity"]


def test_serving_configs_parse(exported):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    base = exported["base"]
    config = text_format.Parse(
        (base / export_lib.MODELS_CONFIG_FILE).read_text(),
        model_server_config_pb2.ModelServerConfig(),
    )
    (model,) = config.model_config_list.config
    assert (model.name, model.model_platform) == ("clip", "tensorflow")
    assert model.base_path == str(base.resolve())
    assert model.model_version_policy.latest.num_versions == 1
    assert "max_batch_size" in (base / export_lib.BATCHING_FILE).read_text()


def test_existing_version_is_not_overwritten(exported):
    with pytest.raises(FileExistsError, match="already exists"):
        export_lib.export_saved_model(tiny_clip(), str(exported["base"]), 1)


def test_rejects_bad_version():
    with pytest.raises(ValueError, match="`version` must be a positive integer"):
        export_lib.export_saved_model(None, "/nonexistent", 0)


def test_export_without_labels_has_no_classify_and_defaults_to_encode_image(tmp_path):
    import tensorflow_text  # noqa: F401 - the tokenizer's ops

    model = tiny_clip()
    export_lib.export_saved_model(model, str(tmp_path / "clip"), 1)  # used to fail tracing classify
    loaded = tf.saved_model.load(str(tmp_path / "clip" / "1"))
    assert sorted(loaded.signatures) == ["encode_image", "encode_text", "serving_default", "similarity"]
    images = [harness.encode(p) for p in harness.photo_crops(2, size=(40, 30), seed=4)]
    served = loaded.signatures["serving_default"](image_bytes=tf.constant(images))["image_embeddings"]
    expected = model.encode_image(model.image_preprocessor()(tf.constant(images)))
    np.testing.assert_allclose(served.numpy(), expected.numpy(), atol=TOLERANCE)


def test_export_traces_each_tower_and_the_image_decoder_once(tmp_path, monkeypatch):
    # Four signatures share two towers; `tf.saved_model.save` used to retrace every
    # tf.function attribute of the module, and each signature inlined its own copy of
    # the per-image decoder, so an export traced it six times (81 s for this model on
    # a 2-core Xeon; 17-21 s now). Each is now one graph function in the library.
    from keras_clip.preprocessing import image_preprocessor

    calls = {"image": 0, "text": 0, "decode": 0}

    def counting(name, method):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(export_lib.CLIPServingModule, "_image_embeddings",
                        counting("image", export_lib.CLIPServingModule._image_embeddings))
    monkeypatch.setattr(export_lib.CLIPServingModule, "_text_embeddings",
                        counting("text", export_lib.CLIPServingModule._text_embeddings))
    # The per-image trace is shared by the whole process: start from an empty cache.
    image_preprocessor._per_image_function.cache_clear()
    monkeypatch.setattr(image_preprocessor, "_preprocess_bytes",
                        counting("decode", image_preprocessor._preprocess_bytes))
    version_dir = export_lib.export_saved_model(tiny_clip(), str(tmp_path / "clip"), 1,
                                                class_names=LABELS)
    assert calls == {"image": 1, "text": 1, "decode": 1}
    assert sorted(tf.saved_model.load(version_dir).signatures) == [
        "classify", "encode_image", "encode_text", "serving_default", "similarity"]
