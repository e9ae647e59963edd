"""Reading published checkpoints without running their pickles.

The released LAFMA, VAEGAN and HiFi-GAN files are ``torch.save`` pickles. A pickle can name any
importable callable and have it run on load, so they are opened with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers; a file
that needs more is refused with the reason. ``.safetensors`` files are read as they are.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, or whose layout is not the one expected."""


def load_checkpoint(path: str) -> dict:
    """The top-level mapping stored in ``path`` (a torch pickle or a safetensors file), on CPU.

    Raises:
        CheckpointError: the file is missing, is not a checkpoint, or needs arbitrary pickle
            (code) to load.
    """
    if not os.path.isfile(path):
        # A directory, FIFO or device is refused before any read: nothing here can block on it.
        raise CheckpointError(f"{path}: not a regular file" if os.path.exists(path) else f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).strip().splitlines()
        detail = next((line for line in lines if "GLOBAL" in line), "")
        if not detail:  # not a refused global: a truncated download, an HTML page, another format
            raise CheckpointError(f"{path} is not a readable torch checkpoint ({lines[0] if lines else err}); "
                                  "is the download complete?") from None
        # torch's message names the global the pickle wanted; keep it, say what to do.
        raise CheckpointError(
            f"{path} needs arbitrary pickle to load ({detail.strip()}). Unpickling it could run code, so "
            "LAFMA only reads tensors and plain containers (torch.load weights_only=True). Re-save just the "
            "state dict (torch.save({'model': sd}, path)) from an environment you trust, or use safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {err}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a mapping of tensors")
    return dict(obj)


def state_dict_from(ckpt: Mapping, keys: Iterable[str], path: str) -> dict[str, Tensor]:
    """The state dict under the first of ``keys`` present in ``ckpt`` (or ``ckpt`` itself when
    it is already a flat mapping of tensors), with torch.compile's ``_orig_mod.`` removed.

    Raises:
        CheckpointError: none of ``keys`` is there and ``ckpt`` is not a state dict.
    """
    keys = list(keys)
    sd = next((ckpt[k] for k in keys if isinstance(ckpt.get(k), Mapping)), None)
    if sd is None:
        if ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
            sd = ckpt
        else:
            raise CheckpointError(f"{path}: expected a state dict under {' or '.join(map(repr, keys))}; "
                                  f"top-level keys are {sorted(ckpt)[:8]}")
    return {k.replace("_orig_mod.", ""): v for k, v in sd.items() if isinstance(v, Tensor)}
