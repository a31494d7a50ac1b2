"""Time to reject crafted checkpoints, and the cost of reading TorchScript safely.

Prints, for each crafted case of tests/test_checkpoint_hostile.py and
tests/test_convert_validation_hostile.py, the error class, the seconds
`CLIP.from_preset` (or `read_state_dict`) took to reject it and the peak Python
allocation during a second call (tracemalloc slows allocation, so the
timed call runs without it). Then the seconds to read the tensors of a
scripted open_clip archive with keras_clip's restricted reader versus
`torch.jit.load(...).state_dict()` (the old path, which runs the archive's code):
the tiny test model and, with --full, a ViT-B/32-sized one (random weights).

Usage (from the repository root):

    python benchmarks/hostile_checkpoints.py [--full] [--repeats=5]
"""
import os
import pathlib
import pickle
import statistics
import sys
import tempfile
import time
import tracemalloc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from keras_clip import CLIP  # noqa: E402
from keras_clip.convert import CheckpointError, read_state_dict  # noqa: E402
from keras_clip.convert import torchscript  # noqa: E402
from tests import reference_models as ref  # noqa: E402
from tests.reference import import_open_clip  # noqa: E402
from tests.test_checkpoint_hostile import (  # noqa: E402
    MarkerWriterWithWeight,
    _Reduce,
    _tensor_pickle,
    _write_archive,
)
from tests.test_convert_validation_hostile import EMBED, _block, tiny_vit_state_dict  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("full", False, "Also time a ViT-B/32-sized archive (~600 MB, float32).")
flags.DEFINE_integer("repeats", 5, "Timed repeats of each TorchScript read (median printed).")


def _safetensors(folder, name, sd):
    path = os.path.join(folder, name + ".safetensors")
    save_file(sd, path)
    return path


def crafted_cases(folder):
    import torch

    cases = []
    sd = tiny_vit_state_dict()
    for i in range(2, 30_000):
        sd[f"transformer.resblocks.{i}.ln_1.weight"] = np.zeros(1, np.float32)
    cases.append(("30,000 fake transformer.resblocks.N keys", _safetensors(folder, "blocks", sd)))
    sd = tiny_vit_state_dict()
    for i in range(2, 5_000):
        sd[f"transformer.resblocks.{i}.ln_1.weight"] = np.zeros(1, np.float32)
    cases.append(("5,000 fake transformer.resblocks.N keys", _safetensors(folder, "blocks5k", sd)))
    sd = tiny_vit_state_dict()
    sd.update(_block("transformer.resblocks.5."))
    cases.append(("block indices 0,1,5 (gap)", _safetensors(folder, "gap", sd)))
    sd = tiny_vit_state_dict()
    sd["text_projection"] = np.zeros(EMBED, np.float32)
    cases.append(("1-D text_projection", _safetensors(folder, "proj", sd)))
    sd = tiny_vit_state_dict()
    del sd["visual.conv1.weight"]
    cases.append(("missing visual.conv1.weight", _safetensors(folder, "conv1", sd)))
    cases.append(("text width 32 -> 0 heads", _safetensors(folder, "heads", tiny_vit_state_dict(text_width=32))))
    sd = tiny_vit_state_dict()
    sd["ln_final.weight"] = np.zeros(100_000, np.float32)
    cases.append(("text width 100,000", _safetensors(folder, "wide", sd)))

    payload = pickle.dumps({"weight": _Reduce(os.system, "true")}, protocol=2, fix_imports=False)
    cases.append(("archive pickle calling os.system", _write_archive(os.path.join(folder, "system.pt"), payload)))
    raw = np.zeros(10, "<f4").tobytes()
    cases.append((
        "storage declaring 1e9 floats over 40 bytes",
        _write_archive(os.path.join(folder, "storage.pt"), _tensor_pickle(10**9, 0, (10,), (1,)), {"0": raw}),
    ))
    cases.append((
        "tensor (1e5, 1e5) with stride 0 over 10 floats",
        _write_archive(os.path.join(folder, "stride.pt"), _tensor_pickle(10, 0, (10**5, 10**5), (0, 0)), {"0": raw}),
    ))
    custom = os.path.join(folder, "custom_state.pt")
    torch.jit.script(MarkerWriterWithWeight(os.path.join(folder, "marker"))).save(custom)
    cases.append(("TorchScript __setstate__ writing a file", custom))
    return cases


def _from_preset(path):
    try:
        CLIP.from_preset(path)
        return "LOADED (not rejected)"
    except CheckpointError as e:
        return f"CheckpointError: {str(e)[:90]}"


def time_rejection(path):
    """(seconds, peak traced bytes, outcome); timed apart from tracemalloc, which slows allocation."""
    start = time.perf_counter()
    outcome = _from_preset(path)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    _from_preset(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, outcome


def time_reads(path, repeats):
    """Median seconds of each reader; runs are interleaved so load on a shared host hits all."""
    import torch

    readers = {
        "restricted": lambda: torchscript.read_tensors(path),
        "read_state_dict": lambda: read_state_dict(path),
        "torch.jit.load": lambda: {k: v.float().numpy() for k, v in torch.jit.load(path).state_dict().items()},
    }
    times = {name: [] for name in readers}
    for _ in range(repeats):
        for name, read in readers.items():
            start = time.perf_counter()
            read()
            times[name].append(time.perf_counter() - start)
    return [statistics.median(times[name]) for name in readers]


def main(argv):
    del argv
    import torch

    logging.set_verbosity(logging.WARNING)

    open_clip = import_open_clip()
    with tempfile.TemporaryDirectory() as folder:
        print("Crafted checkpoints: CLIP.from_preset(path)")
        print(f"{'case':48s} {'seconds':>8s} {'peak MB':>8s}  outcome")
        for name, path in crafted_cases(folder):
            seconds, peak, outcome = time_rejection(path)
            print(f"{name:48s} {seconds:8.3f} {peak / 2**20:8.1f}  {outcome}")
        print(f"marker written by the __setstate__ case: {os.path.exists(os.path.join(folder, 'marker'))}")

        specs = [("tiny test model (ref.SMALL_VIT)", ref.SMALL_VIT)]
        if FLAGS.full:
            specs.append(("ViT-B/32 size (ref.FULL_VIT_B32)", ref.FULL_VIT_B32))
        print(f"\nReading a scripted open_clip archive (median of {FLAGS.repeats})")
        print(f"{'model':36s} {'MB':>7s} {'tensors':>8s} {'restricted':>11s} {'read_state_dict':>16s} {'torch.jit.load':>15s}")
        for name, spec in specs:
            path = os.path.join(folder, "model.pt")
            torch.jit.script(ref.open_clip_model(open_clip, spec)).save(path)
            count = len(torchscript.read_tensors(path))
            safe, full, old = time_reads(path, FLAGS.repeats)
            size = os.path.getsize(path) / 2**20
            print(f"{name:36s} {size:7.1f} {count:8d} {safe:10.3f}s {full:15.3f}s {old:14.3f}s")


if __name__ == "__main__":
    app.run(main)
