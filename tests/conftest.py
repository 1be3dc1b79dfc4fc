"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run single-threaded: tiny tensors gain nothing from threads, and on a busy 2-core machine every
    OpenMP fork-join waits for a descheduled thread (it made the CRF tests 7x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
