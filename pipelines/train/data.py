"""Parquet caches → Ray Data datasets for the trainers, and numpy batches → tensors.

Random crops happen in the training worker from the global RNG, which the checkpoint saves
per rank, so a resumed run continues the same random stream. Every tensor is reshaped from
the shape stored with it (the audio stage's ``n_mels``/``frames``, the latents'
``latent_channels``/``latent_frames``/``latent_bins``), never from the config.

The order examples are trained in is a function of the data, the seed and the rank when the
dataset is small enough for every worker to read it whole (:data:`REPLICATE_BYTES`): each
worker sorts the rows by the job's key columns, keeps every ``world``-th one from its rank on,
and shuffles them per epoch from ``seed + epoch`` (:class:`RankRows`). Ray Data's streaming
split, used for larger datasets, hands blocks to whichever worker asks first, so there which
rows a worker sees, and when, varies from run to run.

Padding: the audio stage zero-pads clips shorter than ``audio.clip_seconds`` and records each
row's ``valid_samples``; the latents stage records ``valid_frames`` (latent frames). A job with
``mask_padding`` crops inside the real audio (:func:`valid_crop`) and keeps the padding out of
its losses (:mod:`lafma.train.objectives`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lafma.train.objectives import valid_frames
from pipelines.core import storage

# Datasets up to this many bytes of Parquet are read whole by every training worker, which
# keeps its share by rank (deterministic order); larger ones are streamed and split by Ray Data.
REPLICATE_BYTES = 512 << 20

# How much of each row is real audio (the audio table's samples, the latents table's latent
# frames). Read along with a job's columns wherever the table has them: a latents table written
# before ``valid_frames`` existed stays readable, and means "every frame is real".
PADDING_COLUMNS = ("valid_samples", "valid_frames")


def fits_every_worker(data_dir: str) -> bool:
    """Whether the Parquet shards under ``data_dir`` are small enough for :class:`RankRows`."""
    return sum(storage.size(f) for f in storage.list_files(data_dir, ".parquet")) <= REPLICATE_BYTES


@dataclass
class RankRows:
    """This rank's share of a dataset every worker reads whole, in an order fixed by the data.

    Attributes:
        dataset: the worker's iterator over the whole dataset (:class:`ParquetRows`, or
            ``get_dataset_shard`` of an unsplit Ray dataset).
        rank, world: this worker's rank and the number of workers.
        order: columns that sort the rows into one order regardless of how they were read
            (e.g. ``("id",)``; the latents add ``caption_key``).
    """

    dataset: Any
    rank: int
    world: int
    order: Sequence[str]

    def columns(self) -> dict[str, np.ndarray]:
        """This rank's rows (every ``world``-th of the sorted rows, from ``rank`` on), as columns."""
        batches = list(self.dataset.iter_batches(batch_size=1024, batch_format="numpy"))
        if not batches:
            return {}
        cols = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        keys = list(zip(*(cols[k].tolist() for k in self.order)))
        sorted_rows = sorted(range(len(keys)), key=keys.__getitem__)
        mine = np.asarray(sorted_rows[self.rank :: self.world], dtype=np.int64)
        return {k: v[mine] for k, v in cols.items()}


@dataclass
class ParquetRows:
    """A stage's shard files read whole, straight from storage, filtered to ``split``: what a
    worker of a job whose data fits every worker (:func:`fits_every_worker`) iterates instead
    of a Ray dataset.

    Reading a few MB through Ray Data inside a training worker cost 13 s on the 2-core machine
    (its read tasks start worker processes of their own), against under a second with pyarrow;
    each training stage paid it once per launch. Larger datasets still stream through Ray Data.

    Attributes:
        out_dir: the stage's output (local or ``s3://``); its ``rejects/`` are not read.
        columns: the job's columns; those of :data:`PADDING_COLUMNS` the shards have are added.
        split: the rows kept.
    """

    out_dir: str
    columns: Sequence[str]
    split: str = "train"

    def iter_batches(self, batch_size: int = 0, batch_format: str = "numpy", **_) -> Iterator[dict[str, np.ndarray]]:
        """One batch: every row of ``split``, as numpy columns (list columns as object arrays of
        arrays, as Ray Data's numpy batches hold them)."""
        import pyarrow.compute as pc

        files = storage.list_files(self.out_dir, ".parquet")
        if not files:
            raise FileNotFoundError(f"no Parquet shards under {self.out_dir}")
        present = set(parquet_columns(files[0]))
        columns = [*self.columns, *(c for c in PADDING_COLUMNS if c in present and c not in self.columns)]
        table = storage.read_parquet_dir(self.out_dir, columns=[*columns, "split"])
        table = table.filter(pc.equal(table.column("split"), self.split))
        if table.num_rows:
            yield {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


def parquet_dataset(out_dir: str, columns: Sequence[str], split: str | None = "train"):
    """A stage's shard files (not its rejects/) as a Ray dataset, filtered to ``split``.

    Reads ``columns`` and those of :data:`PADDING_COLUMNS` that the shards have.
    """
    import ray.data
    from ray.data.expressions import col

    files = storage.list_files(out_dir, ".parquet")
    if not files:
        raise FileNotFoundError(f"no Parquet shards under {out_dir}")
    present = set(parquet_columns(files[0]))
    columns = [*columns, *(c for c in PADDING_COLUMNS if c in present and c not in columns)]
    filesystem = None
    if storage.is_remote(out_dir):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, _ = storage.fs_and_path(out_dir)
        filesystem = PyFileSystem(FSSpecHandler(fs))
        files = [f.split("://", 1)[1] for f in files]
    ds = ray.data.read_parquet(files, filesystem=filesystem, columns=[*columns, "split"])
    return ds if split is None else ds.filter(expr=col("split") == split)


def parquet_columns(uri: str) -> list[str]:
    """The column names of one Parquet file (read from its footer, not its data)."""
    import pyarrow.parquet as pq

    fs, path = storage.fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return pq.read_schema(f).names


def unflatten(column: Sequence, *dims: Sequence[int]) -> torch.Tensor:
    """A batch column of flat float lists → one float32 tensor, shaped by the rows' own columns.

    Args:
        column: B flat float arrays.
        dims: the rows' shape columns, one per dimension, each (B,) ints (e.g. ``rows["n_mels"]``,
            ``rows["frames"]``); none: the rows as stored, (B, N).

    Returns:
        (B, *shape) with ``shape`` the rows' common shape.

    Raises:
        ValueError: the rows of the batch have different shapes (they cannot be stacked).
    """
    arr = np.stack([np.asarray(x, dtype=np.float32) for x in column])  # (B, prod(shape))
    if not dims:
        return torch.from_numpy(arr)
    shapes = set(zip(*(np.asarray(d).tolist() for d in dims)))
    if len(shapes) != 1:
        raise ValueError(f"the rows of one batch have different shapes: {sorted(shapes)}")
    (shape,) = shapes
    return torch.from_numpy(arr.reshape(len(arr), *shape))  # (B, prod(shape)) -> (B, *shape)


def random_crop(x: torch.Tensor, frames: int, hop: int = 0,
                wav: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Crop (B, C, T) mels to ``frames``, one random start per item; crop ``wav`` (B, N) to match.

    Starts come from the global RNG, which checkpoints save. With ``wav``, mel frame k covers
    samples [k·hop, (k+1)·hop), so the waveform crop is the same window in samples (aligned
    segments for the vocoder). ``frames`` of 0 or at least T: no crop (and no draw).

    Returns:
        (B, C, frames) mels and (B, frames · hop) waveforms (or None without ``wav``).
    """
    b, _, t = x.shape
    if frames <= 0 or frames >= t:
        return x, wav
    return _crop_at(x, torch.randint(0, t - frames + 1, (b,)).tolist(), frames, hop, wav)


def valid_crop(x: torch.Tensor, frames: int, valid_samples: torch.Tensor, hop: int,
               wav: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`random_crop` inside each item's real audio, and the real samples of each crop.

    A clip padded past ``valid_samples`` has ``v = ceil(valid_samples / hop)`` real frames
    (:func:`lafma.train.objectives.valid_frames`); its crop starts uniformly in [0, v − frames],
    so it holds real audio only, or at 0 when the clip is shorter than the crop (the crop then
    holds all of its real audio, and the loss masks the rest). Starts come from the global RNG.

    Args:
        x: (B, C, T) mels.
        frames: crop length in frames; 0 or at least T: no crop (and no draw).
        valid_samples: (B,) real samples per clip.
        hop: samples per mel frame.
        wav: (B, T · hop) waveforms, cropped to the same window, or None.

    Returns:
        (B, C, frames) mels, (B, frames · hop) waveforms (or None without ``wav``), and (B,)
        int64 real samples per crop.
    """
    b, _, t = x.shape
    valid_samples = torch.as_tensor(valid_samples, dtype=torch.long).clamp(0, t * hop)
    if frames <= 0 or frames >= t:
        return x, wav, valid_samples
    last = (valid_frames(valid_samples, hop, t) - frames).clamp_min(0)  # (B,) the latest start that stays real
    starts = torch.floor(torch.rand(b, dtype=torch.float64) * (last + 1)).long()  # uniform in [0, last]
    mel, seg = _crop_at(x, starts.tolist(), frames, hop, wav)
    return mel, seg, (valid_samples - starts * hop).clamp(0, frames * hop)


def _crop_at(x: torch.Tensor, starts: Sequence[int], frames: int, hop: int,
             wav: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, T) mels (and (B, T · hop) waveforms) cut to ``frames`` from each item's start."""
    mel = torch.stack([x[i, :, s : s + frames] for i, s in enumerate(starts)])
    if wav is None:
        return mel, None
    seg = torch.stack([wav[i, s * hop : (s + frames) * hop] for i, s in enumerate(starts)])
    return mel, seg


def batch_valid(rows: dict[str, np.ndarray], column: str, full: int) -> torch.Tensor:
    """A batch's (B,) int64 real samples or frames from ``column``, ``full`` where it is absent."""
    if column in rows:
        return torch.as_tensor(np.asarray(rows[column], dtype=np.int64))
    return torch.full((len(next(iter(rows.values()))),), full, dtype=torch.long)


def _nbytes(column: np.ndarray) -> int:
    if column.dtype == object:  # list columns arrive as an object array of arrays
        return sum(getattr(x, "nbytes", 64) for x in column)
    return column.nbytes


def epochs(shard, batch_size: int, seed: int, cache_bytes: int = 2 << 30) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches from a Ray Train dataset shard, one pass per epoch, shuffled per epoch.

    A shard that fits in ``cache_bytes`` is kept in memory after its first pass and reshuffled
    from there: streaming it again costs Ray Data seconds per epoch (the split is re-executed
    in lock-step across workers), which dominated small datasets, where an epoch is a dozen
    steps. Larger shards stream every epoch.
    """
    if isinstance(shard, RankRows):
        columns = shard.columns()
        rows = len(next(iter(columns.values()))) if columns else 0
        if rows < batch_size:
            raise ValueError(f"a worker's data shard holds {rows} rows, fewer than batch_size={batch_size}")
        yield from _shuffled_epochs(columns, batch_size, seed, first=0)
        return
    kept: list[dict] | None = []
    size, n = 0, 0
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                    local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed):
        n += 1
        if kept is not None:
            size += sum(_nbytes(v) for v in batch.values())
            if size <= cache_bytes:
                kept.append(batch)
            else:
                kept = None
        yield batch
    if n == 0:
        raise ValueError(f"a worker's data shard holds fewer than batch_size={batch_size} rows")
    if kept is None:
        yield from _streamed_epochs(shard, batch_size, seed)
        return
    yield from _shuffled_epochs({k: np.concatenate([b[k] for b in kept]) for k in kept[0]}, batch_size, seed,
                                first=1)


def _shuffled_epochs(columns: dict[str, np.ndarray], batch_size: int, seed: int,
                     first: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless epochs of in-memory ``columns``, epoch e in the order drawn from ``seed + e``."""
    rows = len(next(iter(columns.values())))
    epoch = first
    while True:
        order = np.random.default_rng(seed + epoch).permutation(rows)
        for start in range(0, rows - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield {k: v[idx] for k, v in columns.items()}
        epoch += 1


def _streamed_epochs(shard, batch_size: int, seed: int):
    epoch = 1
    while True:
        yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                      local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed + epoch)
        epoch += 1
