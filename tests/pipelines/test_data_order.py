"""The training data order is the seed's: the same config on the same data trains the same weights."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import load_pipeline_config
from pipelines.train.data import RankRows, epochs
from pipelines.train.launch import train_job
from pipelines.train.weights import load_weights
from tests.pipelines.dag_run import CONFIG, overrides


def rows(n: int) -> list[dict]:
    return [{"id": f"clip-{i:03d}", "caption_key": f"k{i % 3}", "x": float(i)} for i in range(n)]


def take(it, k: int) -> list[list[str]]:
    return [list(next(it)["id"]) for _ in range(k)]


def test_each_rank_keeps_its_rows_whatever_order_they_arrive_in(ray_local):
    import ray.data

    items = rows(23)
    forward = ray.data.from_items(items).iterator()
    backward = ray.data.from_items(items[::-1]).iterator()
    shares = [RankRows(forward, r, 2, ("id",)).columns()["id"].tolist() for r in (0, 1)]
    assert shares == [RankRows(backward, r, 2, ("id",)).columns()["id"].tolist() for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(r["id"] for r in items)  # every row, once
    assert not set(shares[0]) & set(shares[1])
    # Two epochs (rank 0 keeps 12 of the 23 rows: 3 batches of 4 per epoch), the same both
    # times, each epoch in its own order, and another order with another seed.
    first = take(epochs(RankRows(forward, 0, 2, ("id",)), 4, seed=7), 6)
    assert first == take(epochs(RankRows(backward, 0, 2, ("id",)), 4, seed=7), 6)
    assert sorted(sum(first[:3], [])) == sorted(sum(first[3:], [])) == sorted(shares[0])
    assert first[:3] != first[3:]
    assert first != take(epochs(RankRows(forward, 0, 2, ("id",)), 4, seed=8), 6)


def test_small_data_read_from_storage_gives_each_rank_the_rows_ray_data_would(ray_local, tmp_path):
    """Data that fits every worker is read whole with pyarrow (ParquetRows), not through Ray
    Data: the same rows of the split, with the padding column the shards have, so every rank
    keeps exactly the rows (and epochs) it kept when Ray Data read them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.train.data import ParquetRows, parquet_dataset

    items = [{**r, "split": "train" if i % 4 else "test", "valid_frames": i, "emb": [float(i)] * 3}
             for i, r in enumerate(rows(22))]
    (tmp_path / "rejects").mkdir()
    for n, part in enumerate((items[:9], items[9:])):
        pq.write_table(pa.Table.from_pylist(part), tmp_path / f"shard-{n:05d}.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": "bad", "reason": "unreadable"}]), tmp_path / "rejects" / "r.parquet")
    columns = ("id", "x", "emb", "caption_key")
    (direct,) = ParquetRows(str(tmp_path), columns).iter_batches()
    assert sorted(direct) == sorted([*columns, "valid_frames"])
    assert sorted(direct["id"]) == sorted(r["id"] for r in items if r["split"] == "train")
    via_ray = parquet_dataset(str(tmp_path), columns).iterator()
    for rank in (0, 1):
        mine = RankRows(ParquetRows(str(tmp_path), columns), rank, 2, ("id",)).columns()
        theirs = RankRows(via_ray, rank, 2, ("id",)).columns()
        assert mine["id"].tolist() == theirs["id"].tolist()
        assert [list(e) for e in mine["emb"]] == [list(e) for e in theirs["emb"]]
        assert take(epochs(RankRows(ParquetRows(str(tmp_path), columns), rank, 2, ("id",)), 4, seed=3), 4) == \
            take(epochs(RankRows(via_ray, rank, 2, ("id",)), 4, seed=3), 4)


def test_a_shard_smaller_than_a_batch_is_a_clear_error(ray_local):
    import ray.data

    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        next(epochs(RankRows(ray.data.from_items(rows(9)).iterator(), 1, 2, ("id",)), 8, seed=0))


def test_the_same_vae_job_twice_trains_the_same_weights(trained, tmp_path):
    """Two fresh launches (2 Ray Train workers, DeepSpeed ZeRO-2) on the same data and config.

    In bf16 as the demo's VAE trains (DeepSpeed's torch autocast on the CPU), where the CPU has
    native bf16; in fp32 elsewhere (``use_bf16``).
    """
    _, _, reports = trained
    cfg = load_pipeline_config(CONFIG, [*overrides(tmp_path), "train_vae.steps=6", "train_vae.fail_at_step=-1",
                                        "train_vae.checkpoint_every=6", "train_vae.sample_every=100",
                                        "train_vae.precision=bf16"])
    weights = []
    for run in ("a", "b"):
        marker = train_job(cfg, "vae", root=str(tmp_path), data_dir=reports["audio"].path,
                           out_dir=str(tmp_path / run), stage_hash=f"determinism-{run}")
        assert marker["steps"] == 6
        weights.append(load_weights(marker["weights"]))
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert np.array_equal(tensor.numpy(), weights[1][name].numpy()), name
