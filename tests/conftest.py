"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip where no CUDA device is; benchmarks/gpu_check.sh runs them on a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU by benchmarks/gpu_check.sh)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Run single-threaded: tiny tensors gain nothing from threads, and on a busy 2-core machine every
    OpenMP fork-join waits for a descheduled thread (it made the CRF tests 7x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_camvid(root: Path, *, splits: dict[str, int], size: tuple[int, int] = (20, 28), seed: int = 0) -> Path:
    """A CamVid-layout folder under ``root``: SPLIT/f{i}.png random RGB images and SPLITannot/f{i}.png
    label maps with values 0..11 (11 = Unlabelled, ignored), ``splits[SPLIT]`` images of ``size`` (H, W)."""
    rng = np.random.default_rng(seed)
    for split, count in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / f"f{i}.png")
            Image.fromarray(rng.integers(0, 12, size, dtype=np.uint8)).save(root / f"{split}annot" / f"f{i}.png")
    return root


@pytest.fixture
def camvid_folder():
    """`write_camvid`: tests call ``camvid_folder(tmp_path / "camvid", splits={"val": 3})``."""
    return write_camvid
