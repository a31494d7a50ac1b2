"""Reading checkpoint files into `{name: numpy array}` without running untrusted pickles."""
import os
import zipfile

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


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


def _torch_to_numpy(state_dict):
    import torch

    arrays = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            arrays[key] = value.detach().to(torch.float32 if value.is_floating_point() else value.dtype).cpu().numpy()
    return arrays


def read_state_dict(path):
    """Reads a checkpoint file into a dict of float32/int numpy arrays.

    `.safetensors` is read with safetensors (no torch needed). PyTorch files are read
    with `torch.load(weights_only=True)`, which refuses arbitrary pickled objects;
    OpenAI's TorchScript archives go through `torch.jit.load`, whose deserialiser
    only rebuilds TorchScript modules and tensors. Training checkpoints that wrap the
    weights (`{"state_dict": ...}`, `module.` prefixes from DDP) are unwrapped.

    Raises:
        CheckpointError: unreadable, truncated or corrupt file, or no tensors in it.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            arrays = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in load_file(path).items()}
        else:
            try:
                import torch
            except ImportError as e:
                raise CheckpointError(
                    f"Reading the PyTorch checkpoint {path} needs torch: pip install 'keras_clip[torch]'"
                ) from e
            if _is_torchscript_archive(path):
                state = torch.jit.load(path, map_location="cpu").state_dict()
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise CheckpointError(
                    f"{path} holds a {type(state).__name__}, not a state dict of tensors"
                )
            arrays = _torch_to_numpy(state)
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
