"""Test tiers and shared fixtures.

Default tier, `python -m pytest -q tests`: needs nothing outside the repository and its
declared packages. The data fixtures (`flickr8k_dir`, `cifar10_dir`, `mnist_dir`) are
folders in the real datasets' layouts, made once per session by `tests/harness.py` from
a real photograph that matplotlib ships, grammar and docstring captions, and drawn
class images.

Real-data tier, `python -m pytest -q tests -m data --data_dir ../shared/data`: the same
data fixtures point at the real Flickr8k / CIFAR-10 / MNIST folders, and `-m data`
selects every test that uses one of them (they are marked `data` automatically). Asking for the tier (`--data_dir` or `-m data`) with the
folder missing fails naming the folder; nothing is skipped silently.
"""
import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DATA_FIXTURES = ("flickr8k_dir", "cifar10_dir", "mnist_dir", "data_root")


def pytest_addoption(parser):
    parser.addoption(
        "--data_dir", default=None,
        help="Real-data tier: run the data tests on this folder (flickr8k/, cifar10_test/, "
        f"mnist_test/). With `-m data` alone it defaults to {DEFAULT_DATA_DIR}.",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "data: runs on the real datasets (real-data tier: -m data --data_dir DIR)")


def _real_data_dir(config):
    """The real data folder when the real-data tier is asked for, else None."""
    option = config.getoption("--data_dir")
    if option:
        return pathlib.Path(option).resolve()
    if "data" in (config.option.markexpr or ""):
        return DEFAULT_DATA_DIR
    return None


# The slowest files, slowest first (per-file sums of `--durations`, 2-core 2.0 GHz Xeon,
# 2026-12-02). With `--no-loadscope-reorder` (pytest.ini), pytest-xdist's `--dist loadfile`
# hands files out in collection order; by default it hands out the files with the most
# tests first, which put these (few tests each, 300-400 s per file) last, one process busy
# while the other had finished. Run first, they overlap with the many short files.
SLOW_FILES_FIRST = (
    "test_multiworker.py", "test_entry_points.py", "test_training_hostile.py", "test_training_run.py",
    "test_large_batch_training.py", "test_large_batch_multiworker.py", "test_data.py", "test_export.py",
    "test_data_spec.py", "test_launch_hostile.py",
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if set(getattr(item, "fixturenames", ())) & set(DATA_FIXTURES):
            item.add_marker(pytest.mark.data)
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(scope="session")
def real_data(request):
    """True in the real-data tier (the data fixtures are the real datasets)."""
    return _real_data_dir(request.config) is not None


@pytest.fixture(scope="session")
def data_root(request, tmp_path_factory):
    """The folder holding flickr8k/, cifar10_test/ and mnist_test/ for this tier."""
    real = _real_data_dir(request.config)
    if real is None:
        from tests import harness

        return harness.write_all(tmp_path_factory.mktemp("data"))
    missing = [name for name in ("flickr8k", "cifar10_test", "mnist_test") if not (real / name).is_dir()]
    if missing:
        pytest.fail(f"Real-data tier asked for, but {real} lacks {missing} "
                    "(pass --data_dir pointing at a copy of shared/data)", pytrace=False)
    return real


@pytest.fixture(scope="session")
def flickr8k_dir(data_root):
    return data_root / "flickr8k"


@pytest.fixture(scope="session")
def cifar10_dir(data_root):
    return data_root / "cifar10_test"


@pytest.fixture(scope="session")
def mnist_dir(data_root):
    return data_root / "mnist_test"


@pytest.fixture(scope="session")
def open_clip_module():
    from tests.reference import import_open_clip

    return import_open_clip()
