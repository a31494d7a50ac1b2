"""Shared pytest fixtures: real-data locations and the reference implementation."""
import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("KERAS_CLIP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")
)
FLICKR8K = SHARED_DATA / "flickr8k"


@pytest.fixture(scope="session")
def flickr8k_dir():
    assert FLICKR8K.is_dir(), f"Flickr8k data not found at {FLICKR8K}"
    return FLICKR8K


@pytest.fixture(scope="session")
def open_clip_module():
    from tests.reference import import_open_clip

    return import_open_clip()
