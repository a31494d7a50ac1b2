"""Hostile PyTorch checkpoints: TorchScript archives are read without running their code,
foreign pickle globals are refused, and torch.load needs a torch without known bypasses.

torch.jit.load appears here only as the reference reader of archives this test wrote
itself (and as the control that shows the planted code really runs under it).
"""
import collections
import io
import os
import pickle
import subprocess
import sys
import zipfile
from typing import Tuple

import numpy as np
import pytest

from keras_clip import CLIP
from keras_clip.convert import CheckpointError, read_state_dict
from keras_clip.convert import checkpoint as checkpoint_module
from tests import reference_models as ref

torch = pytest.importorskip("torch")

CAPTIONS = ["a dog on the grass", "two people at a market", "a red car", "snow on a hill"]


class MarkerWriter(torch.nn.Module):
    """Creates `path` (4 bytes "AAAA") when TorchScript unpickles it: its `__setstate__` runs."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.written = 0

    @torch.jit.export
    def __getstate__(self):
        return (self.path, self.training, self.written)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool, int]):
        self.path = state[0]
        self.training = state[1]
        marker = torch.from_file(self.path, True, 4, dtype=torch.uint8)  # creates the file
        marker.fill_(65)
        self.written = int(marker[0])  # keeps the write alive through TorchScript's optimiser

    def forward(self, x):
        return x


class MarkerWriterWithWeight(torch.nn.Module):
    """Like `MarkerWriter`, with a parameter that lives only in its custom state."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.written = 0
        self.weight = torch.nn.Parameter(torch.ones(3))

    @torch.jit.export
    def __getstate__(self):
        return (self.path, self.training, self.weight)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool, torch.Tensor]):
        self.path = state[0]
        self.training = state[1]
        self.weight = state[2]
        marker = torch.from_file(self.path, True, 4, dtype=torch.uint8)
        marker.fill_(65)
        self.written = int(marker[0])

    def forward(self, x):
        return x * self.weight


def _scripted_clip(open_clip, seed=3):
    return ref.open_clip_model(open_clip, ref.SMALL_VIT, seed=seed)


def _inputs(open_clip):
    images = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
    return images, open_clip.tokenize(CAPTIONS).numpy()


def _reference_embeddings(model, images, tokens):
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True)
        text = model.encode_text(torch.from_numpy(tokens), normalize=True)
    return image.numpy(), text.numpy()


def test_torchscript_archive_code_never_runs_and_weights_load_with_parity(open_clip_module, tmp_path):
    reference = _scripted_clip(open_clip_module)
    marker = tmp_path / "marker"
    reference.marker_writer = MarkerWriter(str(marker))
    path = tmp_path / "ViT-small.pt"
    torch.jit.script(reference).save(str(path))

    # Control: the planted __setstate__ really runs under torch.jit.load.
    assert not marker.exists()
    reference_state = torch.jit.load(str(path)).state_dict()
    assert marker.read_bytes() == b"AAAA"
    marker.unlink()

    state = read_state_dict(str(path))
    model = CLIP.from_preset(str(path))
    assert not marker.exists()

    # Same keys (in the same order) and bit-identical values as torch.jit.load.
    assert list(state) == list(reference_state)
    for key, value in reference_state.items():
        np.testing.assert_array_equal(state[key], value.numpy())

    images, tokens = _inputs(open_clip_module)
    ref_image, ref_text = _reference_embeddings(reference, images, tokens)
    image = np.asarray(model.encode_image(images))
    text = np.asarray(model.encode_text(tokens))
    assert np.max(np.abs(image - ref_image)) <= 1e-5
    assert np.max(np.abs(text - ref_text)) <= 1e-5


def test_tensors_inside_custom_setstate_are_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "custom_state.pt"
    torch.jit.script(MarkerWriterWithWeight(str(marker))).save(str(path))

    with pytest.raises(CheckpointError) as info:
        read_state_dict(str(path))
    assert not marker.exists()
    message = str(info.value)
    assert message.startswith("TorchScript module `<root module>` (__torch__.")
    assert ".MarkerWriterWithWeight) stores its tensors through a custom __getstate__/__setstate__" in message

    torch.jit.load(str(path))  # control
    assert marker.read_bytes() == b"AAAA"


def test_torchscript_archive_loads_without_torch(open_clip_module, tmp_path, monkeypatch):
    reference = _scripted_clip(open_clip_module, seed=4)
    path = tmp_path / "model.pt"
    scripted = torch.jit.script(reference)
    scripted.save(str(path))
    expected = {k: v.numpy() for k, v in scripted.state_dict().items()}  # + attn_mask buffer

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    state = read_state_dict(str(path))
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value)


class Geometry(torch.nn.Module):
    """Dtypes and tensor layouts a checkpoint can hold: views, offsets, shared storage."""

    def __init__(self):
        super().__init__()
        base = torch.arange(60, dtype=torch.float32) / 7
        self.w_half = torch.nn.Parameter(torch.randn(3, 5).half())
        self.w_bf16 = torch.nn.Parameter(torch.randn(4, 2).bfloat16())
        self.transposed = torch.nn.Parameter(torch.randn(6, 4).t())  # strides (1, 4)
        self.offset_view = torch.nn.Parameter(base[7:19].view(3, 4))  # offset 7 in a 60-storage
        self.scalar = torch.nn.Parameter(torch.tensor(2.5))
        self.register_buffer("counts", torch.arange(5, dtype=torch.int64) * 3)
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.shared = torch.nn.Linear(3, 2)
        self.tied = self.shared  # the same module under two names

    def forward(self, x):
        return x


def test_every_dtype_and_layout_matches_torch_jit_load(tmp_path):
    from keras_clip.convert import torchscript

    torch.manual_seed(0)
    path = tmp_path / "geometry.pt"
    torch.jit.script(Geometry()).save(str(path))
    reference = torch.jit.load(str(path)).state_dict()
    arrays = torchscript.read_tensors(str(path))

    assert list(arrays) == list(reference)
    for key, value in reference.items():
        expected = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
        assert arrays[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(arrays[key], expected, err_msg=key)
    assert arrays["transposed"].shape == (4, 6) and arrays["transposed"].flags.c_contiguous


# ---- crafted archives ------------------------------------------------------------------


def _write_archive(path, data_pkl, storages=None, root="archive"):
    """A zip laid out like a TorchScript archive (so read_state_dict takes that path)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{root}/data.pkl", data_pkl)
        archive.writestr(f"{root}/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr(f"{root}/code/__torch__/model.py", "class Model(Module):\n  __parameters__ = []\n")
        archive.writestr(f"{root}/version", "4\n")
        for key, raw in (storages or {}).items():
            archive.writestr(f"{root}/data/{key}", raw)
    return str(path)


class _Reduce:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize(
    "function, args, global_name",
    [
        (os.system, ("touch {marker}",), f"{os.system.__module__}.system"),
        (eval, ("open({marker!r}, 'w').write('x')",), "builtins.eval"),
        (subprocess.Popen, (["touch", "{marker}"],), "subprocess.Popen"),
    ],
)
def test_foreign_pickle_globals_are_refused_by_name(function, args, global_name, tmp_path):
    marker = tmp_path / "marker"
    fill = lambda a: a.format(marker=str(marker)) if isinstance(a, str) else a  # noqa: E731
    args = tuple([fill(x) for x in a] if isinstance(a, list) else fill(a) for a in args)
    payload = pickle.dumps({"weight": _Reduce(function, *args)}, protocol=2, fix_imports=False)
    path = _write_archive(tmp_path / "hostile.pt", payload)

    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(info.value) == (
        f"Refusing to load the TorchScript archive {path}: its pickle refers to the global "
        f"`{global_name}`, which is not a tensor, storage or TorchScript module. Only "
        "weights are read from archives; nothing in them is executed."
    )
    assert not marker.exists()


class _StorageRef:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _TensorPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _tensor_pickle(numel, offset, size, stride):
    tensor = _Reduce(
        torch._utils._rebuild_tensor_v2, _StorageRef("0", numel), offset, size, stride, False,
        collections.OrderedDict(),
    )
    buffer = io.BytesIO()
    _TensorPickler(buffer, protocol=2).dump({"weight": tensor})
    return buffer.getvalue()


def test_well_formed_crafted_tensor_is_read(tmp_path):
    raw = np.arange(12, dtype="<f4").tobytes()
    path = _write_archive(tmp_path / "ok.pt", _tensor_pickle(12, 2, (2, 3), (1, 2)), {"0": raw})
    np.testing.assert_array_equal(
        read_state_dict(path)["weight"], np.array([[2, 4, 6], [3, 5, 7]], np.float32)
    )


@pytest.mark.parametrize(
    "numel, offset, size, stride, raw_elements, message",
    [
        (1_000_000_000, 0, (10,), (1,), 10,
         "Storage `archive/data/0` holds 40 bytes but its record declares 1000000000 x "
         "FloatStorage (4000000000 bytes): the file is truncated or crafted"),
        (10, 5, (3, 4), (4, 1), 10,
         "Tensor of size (3, 4) (stride (4, 1), offset 5) does not fit its storage `0` of 10 elements"),
        (10, 0, (100000, 100000), (0, 0), 10,
         "Tensor of size (100000, 100000) (stride (0, 0), offset 0) does not fit its storage `0` "
         "of 10 elements"),
    ],
)
def test_storage_records_are_bounds_checked(numel, offset, size, stride, raw_elements, message, tmp_path):
    raw = np.zeros(raw_elements, "<f4").tobytes()
    path = _write_archive(tmp_path / "bad.pt", _tensor_pickle(numel, offset, size, stride), {"0": raw})
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(info.value) == message


# ---- torch version floor for torch.load ------------------------------------------------


@pytest.mark.parametrize("version", ["2.5.1", "2.9.1", "2.10.0rc1", "1.13.1+cu117"])
def test_torch_load_refused_on_torch_with_known_weights_only_bypass(version, tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(str(path))
    assert str(info.value) == (
        f"`torch` must be >= 2.10.0 to read the PyTorch checkpoint {path}: older releases can "
        "run code from a crafted file even with torch.load(weights_only=True) "
        "(CVE-2025-32434, CVE-2026-24747). Upgrade with pip install 'keras_clip[torch]', or "
        "convert the file to safetensors on a trusted machine. "
        f"Received: torch.__version__={version}"
    )


@pytest.mark.parametrize("version", ["2.10.0", "2.13.0+cpu", "3.0.0"])
def test_torch_load_allowed_from_the_floor(version, tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(torch, "__version__", version)
    np.testing.assert_array_equal(read_state_dict(str(path))["w"], np.ones(2, np.float32))


def test_torch_floor_matches_setup_py():
    setup = open(os.path.join(os.path.dirname(__file__), "..", "setup.py")).read()
    floor = ".".join(map(str, checkpoint_module.MIN_TORCH_VERSION))
    assert f'TORCH = ["torch>={floor}"]' in setup and '"torch": TORCH,' in setup


def test_compressed_storage_is_refused_not_inflated(tmp_path):
    """A deflated storage could expand far beyond the file (a zip bomb); torch never writes one."""
    path = str(tmp_path / "bomb.pt")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _tensor_pickle(10**8, 0, (10**8,), (1,)))
        archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("archive/code/__torch__/model.py", "")
        archive.writestr("archive/data/0", bytes(4 * 10**8), compress_type=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(path) < 1_000_000  # 400 MB of zeros in under 1 MB
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(info.value) == (
        "Storage `archive/data/0` is compressed; TorchScript archives store tensors uncompressed"
    )


def test_pickle_cannot_modify_the_objects_it_is_given(tmp_path):
    # GLOBAL torch.FloatStorage, then BUILD {"dtype": "O"}: would retype every later storage.
    payload = (
        b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x01\x00\x00\x00Osb."
    )
    path = _write_archive(tmp_path / "build.pt", payload)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(info.value) == "Refusing a pickle that tries to modify `torch.FloatStorage` (BUILD)"


def test_oversized_data_pickle_is_refused(tmp_path, monkeypatch):
    from keras_clip.convert import torchscript

    path = _write_archive(tmp_path / "big.pt", pickle.dumps({"x": list(range(1000))}, protocol=2))
    monkeypatch.setattr(torchscript, "MAX_PICKLE_BYTES", 100)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    size = zipfile.ZipFile(path).getinfo("archive/data.pkl").file_size
    assert str(info.value) == (
        f"{path}: data.pkl is {size} bytes, more than the limit of 100 "
        "(keras_clip.convert.torchscript.MAX_PICKLE_BYTES)"
    )


def test_many_views_of_one_storage_are_refused(tmp_path):
    """Every tensor is an own copy, so 1,000 full views of one storage would take 1,000x memory."""
    views = [
        _Reduce(torch._utils._rebuild_tensor_v2, _StorageRef("0", 1000), 0, (1000,), (1,), False,
                collections.OrderedDict())
        for _ in range(1000)
    ]
    buffer = io.BytesIO()
    _TensorPickler(buffer, protocol=2).dump({f"w{i}": v for i, v in enumerate(views)})
    path = _write_archive(tmp_path / "views.pt", buffer.getvalue(), {"0": bytes(4000)})
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(info.value) == (
        "Storage `0` of 1000 elements backs tensors of 5000 elements in all, more than 4x its size"
    )


def test_too_many_tensors_are_refused_before_reading_them(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "many.safetensors")
    save_file({f"t{i}": np.zeros(1, np.float32) for i in range(10_001)}, path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(info.value) == (
        f"Checkpoint {path} holds 10001 tensors, more than the limit of 10000 "
        "(keras_clip.convert.checkpoint.MAX_TENSORS); no CLIP has that many"
    )
