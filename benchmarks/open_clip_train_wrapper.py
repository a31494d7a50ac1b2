"""Runs open_clip's own trainer (`open_clip_train.main.main`) on this machine.

    python benchmarks/open_clip_train_wrapper.py --model_config_dir DIR -- [open_clip_train flags]

Used by `train_vs_open_clip.py`, one process per training run. Three things stand
between this machine and `python -m open_clip_train.main`:

1. PyPI's torchvision cannot load its compiled operators beside the local torch
   build; `tests.reference.import_open_clip` imports open_clip with torchvision's
   pure-Python parts only (transforms, which the trainer uses).
2. The model architecture is not one of open_clip's: `--model_config_dir` is a
   folder of open_clip model-config JSON files, registered with
   `open_clip.add_model_config` before the trainer looks the name up.
3. `open_clip_train.data` imports its webdataset-path dependencies (`braceexpand`,
   `webdataset`) and `pandas` at module level, and none of the three is installed
   here. Where one is missing, a stand-in module is registered: the webdataset ones
   raise if anything is called (the CSV path never calls them), and the pandas one
   has only `read_csv(path, sep=...)[column].tolist()`, the one use on the CSV path,
   read with Python's `csv` module (standard quoting, as pandas reads it). Installed
   packages are always preferred; the stand-ins used are logged.

Unless `--report-to` asks for TensorBoard, `torch.utils.tensorboard` is made
unimportable (the trainer then sets it to None, as where TensorBoard is not
installed): here it would import TensorFlow into the torch training process, which
the keras_clip runs of the benchmark mirror by loading no torch.

Everything else (model, transforms, tokenizer, DataLoader, loss, AdamW groups,
warm-up + cosine schedule, the training loop, its logging and checkpoints) is
open_clip's own code, unchanged.
"""
import argparse
import csv
import importlib.util
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reference import import_open_clip  # noqa: E402


def _not_available(name):
    def fail(*args, **kwargs):
        raise NotImplementedError(
            f"{name} is a stand-in (the package is not installed); only open_clip's "
            "--dataset-type csv path works through benchmarks/open_clip_train_wrapper.py."
        )

    return fail


class _Column(list):
    def tolist(self):
        return list(self)


class _Table:
    """The part of a pandas DataFrame that `open_clip_train.data.CsvDataset` uses."""

    def __init__(self, columns):
        self._columns = columns

    def __getitem__(self, name):
        return _Column(self._columns[name])


def _read_csv(path, sep=","):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=sep))
    header, body = rows[0], rows[1:]
    return _Table({name: [row[i] for row in body] for i, name in enumerate(header)})


def _install_stand_ins():
    """Registers stand-in modules for the training-only imports that are missing."""
    stand_ins = {}
    if importlib.util.find_spec("braceexpand") is None:
        module = types.ModuleType("braceexpand")
        module.braceexpand = _not_available("braceexpand.braceexpand")
        stand_ins["braceexpand"] = module
    if importlib.util.find_spec("webdataset") is None:
        module = types.ModuleType("webdataset")
        module.PipelineStage = type("PipelineStage", (), {})  # a base class in open_clip_train.data
        filters = types.ModuleType("webdataset.filters")
        filters._shuffle = _not_available("webdataset.filters._shuffle")
        tariterators = types.ModuleType("webdataset.tariterators")
        for name in ("base_plus_ext", "url_opener", "tar_file_expander", "valid_sample"):
            setattr(tariterators, name, _not_available(f"webdataset.tariterators.{name}"))
        module.filters, module.tariterators = filters, tariterators
        stand_ins.update({"webdataset": module, "webdataset.filters": filters,
                          "webdataset.tariterators": tariterators})
    if importlib.util.find_spec("pandas") is None:
        module = types.ModuleType("pandas")
        module.read_csv = _read_csv
        stand_ins["pandas"] = module
    sys.modules.update(stand_ins)
    return sorted(name for name in stand_ins if "." not in name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config_dir", required=True,
                        help="folder of open_clip model-config JSON files to register")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="flags for open_clip_train.main, after `--`")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args

    report_to = train_args[train_args.index("--report-to") + 1] if "--report-to" in train_args[:-1] else ""
    if "tensorboard" not in report_to and "all" not in report_to:
        sys.modules["torch.utils.tensorboard"] = None  # `import` raises ImportError
    open_clip = import_open_clip()
    open_clip.add_model_config(args.model_config_dir)
    stand_ins = _install_stand_ins()
    from open_clip_train import main as train_main

    if stand_ins:
        print(f"open_clip_train_wrapper: stand-ins for missing packages (CSV path only): "
              f"{', '.join(stand_ins)}", file=sys.stderr)
    result = train_main.main(train_args)
    return 1 if result == -1 else 0


if __name__ == "__main__":
    sys.exit(main())
