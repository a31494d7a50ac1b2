"""The export appears atomically: never a half-written `<base>/<version>` folder."""
import os

import pytest
import tensorflow as tf

from keras_clip.export import saved_model as export_lib
from tests.test_export import tiny_clip

LABELS = ["dog", "cat"]
TEMPLATES = ["a photo of a {}."]
# What one export writes, relative to `<base>`, before and after the atomic rename.
EXPECTED_FILES = sorted([
    "1/assets.extra/tf_serving_warmup_requests",
    "1/fingerprint.pb",
    "1/saved_model.pb",
    "1/variables/variables.data-00000-of-00001",
    "1/variables/variables.index",
    "batching_parameters.txt",
    "models.config",
])


def _files(base):
    found = []
    for root, _, files in os.walk(base):
        found += [os.path.relpath(os.path.join(root, name), base) for name in files]
    return sorted(found)


def _entries(base):
    return sorted(os.listdir(base))


@pytest.fixture(scope="module")
def model():
    return tiny_clip()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model):
    base = tmp_path_factory.mktemp("atomic") / "clip"
    seen = {}
    real_warmup = export_lib.warmup_requests

    def spying_warmup(*args, **kwargs):
        # Called after the SavedModel is written and before the warm-up file is.
        seen["entries_mid_export"] = _entries(base)
        return real_warmup(*args, **kwargs)

    export_lib.warmup_requests = spying_warmup
    try:
        export_lib.export_saved_model(model, str(base), 1, class_names=LABELS,
                                      templates=TEMPLATES)
    finally:
        export_lib.warmup_requests = real_warmup
    return {"base": base, "seen": seen}


def test_normal_export_writes_the_same_files_and_no_leftovers(exported):
    assert _files(exported["base"]) == EXPECTED_FILES
    assert _entries(exported["base"]) == ["1", "batching_parameters.txt", "models.config"]
    # The export still reloads with every signature.
    loaded = tf.saved_model.load(str(exported["base"] / "1"))
    assert sorted(loaded.signatures) == ["classify", "encode_image", "encode_text",
                                         "serving_default", "similarity"]


def test_version_folder_is_absent_while_the_export_is_being_written(exported):
    entries = exported["seen"]["entries_mid_export"]
    assert "1" not in entries
    (staging,) = entries
    assert staging.startswith(export_lib.STAGING_PREFIX)
    assert not staging.isdigit()


def _failing_save(module, export_dir, signatures=None):
    """Writes part of a SavedModel, then fails, like a full disk or a killed process."""
    tf.io.gfile.makedirs(export_dir)
    with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
        f.write(b"\x08\x01half")
    raise OSError("No space left on device (simulated)")


def test_failed_export_leaves_no_version_folder(tmp_path, model, monkeypatch):
    monkeypatch.setattr(tf.saved_model, "save", _failing_save)
    base = tmp_path / "clip"
    with pytest.raises(OSError, match="No space left on device"):
        export_lib.export_saved_model(model, str(base), 1)
    assert _entries(base) == []  # no `1`, no staging folder, no configs


def test_failed_overwrite_leaves_the_live_version_untouched(tmp_path, model, monkeypatch):
    base = tmp_path / "clip"
    live = base / "1"
    (live / "variables").mkdir(parents=True)
    (live / "saved_model.pb").write_bytes(b"live version")
    (live / "variables" / "variables.index").write_bytes(b"live index")
    before = {path: (live / path).read_bytes() for path in _files(live)}
    monkeypatch.setattr(tf.saved_model, "save", _failing_save)
    with pytest.raises(OSError, match="No space left on device"):
        export_lib.export_saved_model(model, str(base), 1, overwrite=True)
    assert _entries(base) == ["1"]
    assert {path: (live / path).read_bytes() for path in _files(live)} == before


def test_overwrite_swaps_the_new_version_in(tmp_path, model, monkeypatch):
    base = tmp_path / "clip"
    live = base / "1"
    live.mkdir(parents=True)
    (live / "saved_model.pb").write_bytes(b"old version")
    (live / "stale_file_of_old_version").write_bytes(b"old")
    writes = []

    def fake_save(module, export_dir, signatures=None):
        writes.append(os.path.basename(export_dir))
        tf.io.gfile.makedirs(export_dir)
        with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
            f.write(b"new version")

    monkeypatch.setattr(tf.saved_model, "save", fake_save)
    export_lib.export_saved_model(model, str(base), 1, overwrite=True)
    (written,) = writes
    assert written.startswith(export_lib.STAGING_PREFIX)  # never into the live `1`
    assert (live / "saved_model.pb").read_bytes() == b"new version"
    assert _files(live) == ["assets.extra/tf_serving_warmup_requests", "saved_model.pb"]
    assert _entries(base) == ["1", "batching_parameters.txt", "models.config"]
