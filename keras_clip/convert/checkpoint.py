"""Reading checkpoint files into `{name: numpy array}` without running untrusted pickles."""
import os
import re
import zipfile

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Most tensors a checkpoint may hold. The largest CLIPs (ViT-bigG/14, Hugging Face
# layout) have about 1,200; counted from the safetensors header before any tensor is
# read, so a file of countless tiny tensors is refused in milliseconds.
MAX_TENSORS = 10_000


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or is not a CLIP checkpoint."""


def _is_torchscript_archive(path):
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False
    return any(name.endswith("/constants.pkl") for name in names) and any(
        "/code/" in name for name in names
    )


# torch.load(weights_only=True) is the only torch path left (TorchScript archives are
# read without torch). Releases before this one have published ways to run code
# through weights_only=True: CVE-2025-32434 (GHSA-53q9-r3pm-6pq6, torch <= 2.5.1,
# fixed in 2.6.0) and CVE-2026-24747 (GHSA-63cw-57p8-fm3p, memory corruption in the
# weights_only unpickler, torch <= 2.9.1, fixed in 2.10.0). Keep equal to setup.py.
MIN_TORCH_VERSION = (2, 10, 0)


def _version_tuple(version):
    """(major, minor, patch) of a torch version string; pre-releases count as below."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(.*)", str(version))
    if not match:
        return (0, 0, 0)
    major, minor, patch, rest = match.groups()
    numbers = (int(major), int(minor), int(patch or 0))
    if re.match(r"\.?(a|b|rc|dev|alpha|beta)", rest or ""):
        numbers = numbers[:2] + (numbers[2] - 1,)  # 2.10.0rc1 < 2.10.0
    return numbers


def _import_torch(path):
    """Imports torch for `torch.load`, refusing releases whose weights_only has bypasses."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"Reading the PyTorch checkpoint {path} needs torch: pip install 'keras_clip[torch]'"
        ) from e
    floor = ".".join(map(str, MIN_TORCH_VERSION))
    if _version_tuple(torch.__version__) < MIN_TORCH_VERSION:
        raise CheckpointError(
            f"`torch` must be >= {floor} to read the PyTorch checkpoint {path}: older releases "
            "can run code from a crafted file even with torch.load(weights_only=True) "
            "(CVE-2025-32434, CVE-2026-24747). Upgrade with pip install 'keras_clip[torch]', "
            f"or convert the file to safetensors on a trusted machine. "
            f"Received: torch.__version__={torch.__version__}"
        )
    return torch


def _check_tensor_count(count, path):
    if count > MAX_TENSORS:
        raise CheckpointError(
            f"Checkpoint {path} holds {count} tensors, more than the limit of {MAX_TENSORS} "
            "(keras_clip.convert.checkpoint.MAX_TENSORS); no CLIP has that many"
        )


def _torch_to_numpy(state_dict):
    import torch

    arrays = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            arrays[key] = value.detach().to(torch.float32 if value.is_floating_point() else value.dtype).cpu().numpy()
    return arrays


def read_state_dict(path):
    """Reads a checkpoint file into a dict of float32/int numpy arrays.

    `.safetensors` is read with safetensors (no torch needed). TorchScript archives
    (OpenAI's `.pt` files: a zip with `constants.pkl` and `code/`) are read with
    numpy and a restricted unpickler (`keras_clip.convert.torchscript`): none of the
    archive's code runs and torch is not needed. Other PyTorch files are read with
    `torch.load(weights_only=True)`, which refuses arbitrary pickled objects, and only
    with torch >= `MIN_TORCH_VERSION` (older releases have published bypasses).
    Training checkpoints that wrap the weights (`{"state_dict": ...}`, `module.`
    prefixes from DDP) are unwrapped.

    Raises:
        CheckpointError: unreadable, truncated or corrupt file, no tensors in it, an
            archive that refers to anything but tensors, or torch older than
            `MIN_TORCH_VERSION` for a `torch.load` file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            from safetensors.numpy import load_file

            with safe_open(path, framework="numpy") as f:
                _check_tensor_count(len(f.keys()), path)
            arrays = load_file(path)
        elif _is_torchscript_archive(path):
            from keras_clip.convert import torchscript

            arrays = torchscript.read_tensors(path)
            _check_tensor_count(len(arrays), path)
        else:
            torch = _import_torch(path)
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise CheckpointError(
                    f"{path} holds a {type(state).__name__}, not a state dict of tensors"
                )
            _check_tensor_count(len(state), path)
            arrays = _torch_to_numpy(state)
        arrays = {k: (v.astype(np.float32, copy=False) if v.dtype.kind == "f" else v) for k, v in arrays.items()}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - every reader raises its own types
        raise CheckpointError(
            f"Could not read checkpoint {path}: the file is corrupt, truncated or not a "
            f"PyTorch/safetensors checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not arrays:
        raise CheckpointError(f"Checkpoint {path} contains no tensors")
    if all(k.startswith("module.") for k in arrays):
        arrays = {k[len("module."):]: v for k, v in arrays.items()}
    return arrays
