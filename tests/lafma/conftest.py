"""Fixtures the metrics tests share."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: two OpenMP threads fighting other jobs for 2 cores run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    """Where published-size checkpoint files go: RAM (/dev/shm) when there is one, else tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm) as d:
            yield Path(d)
    else:
        yield tmp_path_factory.mktemp("ckpt")
