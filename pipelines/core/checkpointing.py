"""Checkpoints of DeepSpeed engines inside a Ray Train (V2) job: save, report, resume.

One Ray Train checkpoint directory holds everything a job needs to continue exactly::

    checkpoint_000000120/
        <engine name>/latest                      tag of the DeepSpeed checkpoint (rank 0)
        <engine name>/step_000000120/*.pt         DeepSpeed files: module + scheduler + step
                                                  counters (rank 0), one ZeRO optimizer shard
                                                  per data-parallel rank
        state.pt                                  the job's own state: step, EMA weights, ...
                                                  (rank 0; must be the same on every rank)
        rng/rank_00000.pt, rng/rank_00001.pt      torch / CUDA / numpy / python RNG per rank

Every rank writes its own files into its *own* temporary directory and reports it. Ray Train
V2 copies each rank's directory into the same ``checkpoint_dir_name`` (rank 0 broadcasts
the name; ``ray.train.report`` is a barrier) and registers the checkpoint only once every
rank has reported, so a registered checkpoint always holds every rank's ZeRO shard. Sharing
one local directory between ranks would be wrong on a multi-node cluster and races with
Ray's "delete local checkpoint after upload".

A job's RNG streams differ per rank (each rank draws its own noise, dropout masks and
flow-matching times), so each rank restores its own; restoring them is what makes a resumed
run draw the same numbers the uninterrupted run would have drawn.

Nothing here unpickles code: every file is read with ``torch.load(weights_only=True)``,
DeepSpeed's own through :class:`WeightsOnlyCheckpointEngine`, so whoever can write the
storage root can corrupt a resume but not run code in it.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.train
import torch
from ray.train import Checkpoint

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
RNG_DIR = "rng"


def _deepspeed_globals() -> list:
    """The classes DeepSpeed (0.19) pickles into its ZeRO optimizer files besides tensors and
    plain containers, found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on
    checkpoints of ZeRO stages 0-2, fp32 and bf16. Plain data: a dataclass, an enum, the
    loss-scaler's attributes; allowing them lets no callable through."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@functools.cache
def _weights_only_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` (DeepSpeed's
        own loads with ``weights_only=False``, which runs whatever a pickled file names)."""

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine


def __getattr__(name: str) -> Any:  # deepspeed is imported lazily: the driver never pays for it
    if name == "WeightsOnlyCheckpointEngine":
        return _weights_only_engine_class()
    raise AttributeError(name)


def _load_weights_only(engine: DeepSpeedEngine) -> None:
    """Make ``engine`` read its checkpoints with :class:`WeightsOnlyCheckpointEngine`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current, cls = engine.checkpoint_engine, _weights_only_engine_class()
    if isinstance(current, cls):
        return
    if type(current) is not TorchCheckpointEngine:  # our DeepSpeed configs never choose another
        raise RuntimeError(f"cannot resume safely with DeepSpeed's {type(current).__name__}: "
                           "only its TorchCheckpointEngine has a weights-only replacement")
    engine.checkpoint_engine = cls(engine._config)


def _tag(step: int) -> str:
    return f"step_{step:09d}"


def _rank() -> int:
    return ray.train.get_context().get_world_rank()


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain Python values.

    Only types that ``torch.load(weights_only=True)`` accepts are used (numpy's state is
    split into a tensor and scalars), so loading a checkpoint never unpickles code.
    """
    _name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(engines: dict[str, DeepSpeedEngine], state: dict[str, Any],
                    metrics: dict[str, Any]) -> None:
    """Save every engine plus the job state and report them to Ray Train as one checkpoint.

    Must be called by **every** rank at the same step: ``engine.save_checkpoint`` is a
    collective (barriers, and a tag-consistency all-reduce) and each rank owns a ZeRO shard
    of the optimizer state; ``ray.train.report`` is a barrier too.

    Args:
        engines: Engines by name (e.g. ``{"generator": g, "discriminator": d}``); each name
            becomes a sub-directory, so names must stay the same across restarts.
        state: The job's own state. Must hold ``"step"`` (int, the number of finished
            optimizer steps). Tensors (EMA weights) and plain Python values only; saved from
            rank 0, so it must be identical on every rank. RNG states are added per rank.
        metrics: Reported with the checkpoint (rank 0's are kept); Python numbers, no tensors.
    """
    step = int(state["step"])
    rank = _rank()
    # A fresh directory per rank: see the module docstring.
    local = tempfile.mkdtemp(prefix=f"lafma-ckpt-{step}-r{rank}-")
    try:
        for name, engine in engines.items():
            # All ranks call this: rank 0 writes the module/scheduler file and ``latest``,
            # each rank writes its own ``zero_pp_rank_<r>_..._optim_states.pt``.
            engine.save_checkpoint(os.path.join(local, name), tag=_tag(step))
        os.makedirs(os.path.join(local, RNG_DIR))
        torch.save(rng_state(), os.path.join(local, RNG_DIR, f"rank_{rank:05d}.pt"))
        if rank == 0:
            torch.save(state, os.path.join(local, STATE_FILE))
        # A step-derived name keeps the storage readable; it is unique because the step only
        # grows (a restart resumes from the last *registered* step and saves later ones).
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(local),
                         checkpoint_dir_name=f"checkpoint_{step:09d}")
    finally:
        # SYNC upload (the default) has copied the files by the time report returns.
        shutil.rmtree(local, ignore_errors=True)


def load_checkpoint(engines: dict[str, DeepSpeedEngine]) -> dict[str, Any] | None:
    """Resume from Ray Train's latest checkpoint, if there is one.

    Ray Train hands every worker the latest *registered* checkpoint of this run: after a
    worker failure (``FailureConfig(max_failures)``) and when a job is launched again with the
    same ``RunConfig(name, storage_path)`` (the controller reads the run's checkpoint-manager
    snapshot from storage). Call it on every rank, after ``init_engine`` and before the
    first training step. With ZeRO stage >= 1 the world size must be the one that saved
    the checkpoint (DeepSpeed raises ``ZeRORuntimeException`` otherwise); each rank reads
    only its own optimizer shard, but remote storage is downloaded whole once per node.

    Args:
        engines: The same names as given to :func:`save_checkpoint`; weights, optimizer
            (ZeRO shards) and LR-scheduler state are restored in place.

    Returns:
        The ``state`` passed to :func:`save_checkpoint` (tensors on CPU), or ``None`` when
        starting fresh. This rank's RNG states are restored as a side effect.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    rank = _rank()
    # A local storage path is used in place; a remote one is downloaded once per node.
    with checkpoint.as_directory() as local:
        for name, engine in engines.items():
            # DeepSpeed reads the tag from ``latest``; its files, weights only.
            _load_weights_only(engine)
            path, _ = engine.load_checkpoint(os.path.join(local, name))
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint for engine {name!r} in {local}")
        state = torch.load(os.path.join(local, STATE_FILE), map_location="cpu", weights_only=True)
        rng_file = os.path.join(local, RNG_DIR, f"rank_{rank:05d}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:  # the world grew: new ranks keep their fresh seeds
            log.warning("no RNG state for rank %d in %s; keeping this rank's seeds", rank, local)
    return state
