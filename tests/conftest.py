"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch


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
