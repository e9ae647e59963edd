"""Stored token embeddings back into a padded batch, from the read-only rows Arrow hands over."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lafma.text import pad_embeddings

ROOT = Path(__file__).parents[2]


def _stored_rows() -> list[np.ndarray]:
    """Two captions of 2 and 1 tokens (D = 3), flat, as zero-copy views of an Arrow column."""
    col = pa.array([np.arange(6, dtype=np.float32), np.arange(10, 13, dtype=np.float32)], type=pa.list_(pa.float32()))
    return [col[i].values.to_numpy(zero_copy_only=True) for i in range(len(col))]


def test_padding_puts_each_caption_first_and_masks_the_rest():
    rows = _stored_rows()
    assert not rows[0].flags.writeable  # what the text stage's Parquet gives the training job
    x, mask = pad_embeddings(rows, [2, 1], 3)
    assert x.dtype == torch.float32 and x.shape == (2, 2, 3)  # (B, max L, D)
    assert x[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert x[1].tolist() == [[10, 11, 12], [0, 0, 0]]
    assert mask.tolist() == [[True, True], [True, False]]
    x += 1  # the batch owns its memory: the stored rows are untouched
    assert rows[0][0] == 0 and rows[1][0] == 10


def test_padding_read_only_rows_warns_about_nothing():
    # In a fresh interpreter: torch warns about a non-writable array once per process only.
    code = (
        "import warnings\n"
        "from tests.lafma.test_text_tokens import _stored_rows\n"
        "from lafma.text import pad_embeddings\n"
        "rows = _stored_rows()\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')\n"
        "    pad_embeddings(rows, [2, 1], 3)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
