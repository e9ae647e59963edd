"""Reading reference checkpoints safely and checking them against a published key layout.

Every literature embedder loads a file the user supplies. Three things must hold before a
number computed with it can be trusted or compared: the file is the one named (its SHA-256
is reported with every metric), it is read without executing pickled code, and its keys and
shapes are exactly the published ones (a checkpoint of another variant loaded with
``strict=False`` would produce plausible-looking nonsense).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# BatchNorm's step counter: never used at inference, and absent from files saved by old torch.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


class CheckpointFormatError(ValueError):
    """A checkpoint's keys or shapes differ from the published layout it claims to have.

    Attributes:
        path: the file.
        missing: keys the layout needs and the file lacks.
        unexpected: keys the file has and the layout does not.
        mismatched: ``key -> (shape in file, expected shape)``.
    """

    def __init__(self, path: str | os.PathLike, layout: str, *, missing: Iterable[str] = (),
                 unexpected: Iterable[str] = (), mismatched: Mapping[str, tuple] | None = None,
                 detail: str = ""):
        self.path = os.fspath(path)
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = dict(mismatched or {})
        parts = []
        if self.missing:
            parts.append(f"missing keys {_shorten(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys {_shorten(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k}: file {tuple(a)} vs expected {tuple(b)}" for k, (a, b) in self.mismatched.items()]
            parts.append(f"shape mismatches {_shorten(shapes)}")
        if detail:
            parts.append(detail)
        super().__init__(f"{self.path}: not a {layout} checkpoint: " + "; ".join(parts))


def _shorten(items: list[str], limit: int = 8) -> str:
    head = ", ".join(items[:limit])
    return f"[{head}{f', … ({len(items) - limit} more)' if len(items) > limit else ''}]"


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError naming it and what it should hold."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {os.fspath(path)!s} "
                                f"(a local file is required; nothing is downloaded)")
    return p


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (reference checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _numpy_safe_globals() -> list:
    """numpy scalars, dtypes and plain arrays: data only, never a callable chosen by the file.

    Published checkpoints (the aisfx weights, PANNs' training checkpoints with their sampler
    state) contain numpy integers and arrays, which ``weights_only=True`` refuses by default.
    Allowing exactly these types keeps the loader unable to run code: an object array or any
    other global in the file is still refused.
    """
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    dtype_classes = {type(np.dtype(c)) for c in np.typecodes["All"] if c not in "OVSUaMm"}
    allowed: list = [np.dtype, np.ndarray, *sorted(dtype_classes, key=str)]
    # A pickle names a function by the module path it had when it was written: numpy 1.x
    # wrote numpy.core.multiarray, numpy 2 writes numpy._core.multiarray.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    return allowed


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` on CPU, with numpy scalars and arrays allowed.

    Zip-format files (torch >= 1.6) are memory-mapped: a 300 MB reference checkpoint is then
    not copied before its tensors are handed to the network.
    """
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def check_state_dict(state: Mapping[str, Any], expected: Mapping[str, torch.Size | tuple],
                     path: str | os.PathLike, layout: str) -> None:
    """Raise :class:`CheckpointFormatError` unless ``state`` has exactly the expected keys and shapes.

    Keys ending in :data:`OPTIONAL_SUFFIXES` may be absent.
    """
    have, want = set(state), set(expected)
    missing = {k for k in want - have if not k.endswith(OPTIONAL_SUFFIXES)}
    unexpected = have - want
    mismatched = {}
    for k in have & want:
        v = state[k]
        shape = tuple(v.shape) if hasattr(v, "shape") else None
        if shape != tuple(expected[k]):
            mismatched[k] = (shape if shape is not None else type(v).__name__, tuple(expected[k]))
    if missing or unexpected or mismatched:
        raise CheckpointFormatError(path, layout, missing=missing, unexpected=unexpected, mismatched=mismatched)


def load_checked(module: nn.Module, state: Mapping[str, Any], path: str | os.PathLike, layout: str) -> None:
    """Check ``state`` against ``module``'s own keys and shapes, then load it strictly.

    The file's tensors are assigned, not copied, so ``module`` may be built on the ``meta``
    device: a large reference network then never spends time on a random initialisation
    that the checkpoint would overwrite.
    """
    own = module.state_dict()
    check_state_dict(state, {k: v.shape for k, v in own.items()}, path, layout)
    full = {}
    for k, ref in own.items():
        if k in state:
            full[k] = torch.as_tensor(state[k]).to(ref.dtype)
        else:  # only optional step counters can be absent here
            full[k] = torch.zeros(ref.shape, dtype=ref.dtype)
    module.load_state_dict(full, strict=True, assign=True)

