"""The latents stage pairs every clip with its own captions' embeddings, fetched shard by shard.

The text table is written by the text stage's own actor (sorted captions in small row groups)
and read back by the latents stage's actor, without Ray: what is tested is which embedding
lands beside which clip, not the scheduling.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lafma.config import to_dict
from lafma.models import build_vae
from pipelines.config import load_pipeline_config
from pipelines.core import storage
from pipelines.core.stage import arrow_table, chunk
from pipelines.stages import text as text_stage
from pipelines.stages.audio import SCHEMA as AUDIO_SCHEMA
from pipelines.stages.text import EmbeddingLookup, EncodeCaptions, caption_key
from pipelines.stages.train import LATENT_SCHEMA, EncodeLatents
from pipelines.train.weights import export_weights

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
WORDS = "dog cat bird rain wind engine bell crowd water door".split()


def caption(i: int) -> str:
    # Distinct captions whose sorted order is unrelated to the clips' order.
    h = int(hashlib.sha1(str(i).encode()).hexdigest(), 16)
    return f"{WORDS[h % 10]} {WORDS[(h // 10) % 10]} number {i}"


def write_text_table(cfg, out: Path, captions: list[str], per_shard: int) -> None:
    """The text stage's shards, by its own actor: sorted captions, ``per_shard`` to a file."""
    encode = EncodeCaptions(cfg.text, str(out), batch_size=4)
    for i, shard in enumerate(chunk([{"caption": c} for c in sorted(set(captions) | {""})], per_shard)):
        encode(pa.table({"shard": [i], "rows": [shard]}))


def embeddings_by_caption(out: Path) -> dict[str, tuple[np.ndarray, int]]:
    table = storage.read_parquet_dir(str(out), columns=["caption", "emb", "length"])
    return {c: (np.asarray(e, np.float32), n) for c, e, n in zip(table.column("caption").to_pylist(),
                                                                  table.column("emb").to_numpy(zero_copy_only=False),
                                                                  table.column("length").to_pylist())}


@pytest.fixture(scope="module")
def cfg():
    return load_pipeline_config(CONFIG)


def test_each_clip_row_carries_its_own_captions_embedding(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(text_stage, "ROW_GROUP_ROWS", 3)  # several groups per file, several files
    rng = np.random.default_rng(0)
    t, n_mels = cfg.mel_shape()
    clips, n = [], 0
    for i in range(24):
        k = int(rng.integers(1, 6))  # one to five captions, as AudioCaps' splits have
        clips.append({"id": f"c{i}", "source_id": f"c{i}", "segment": 0, "audio_uri": "",
                      "caption": caption(n), "captions": [caption(n + j) for j in range(k)], "split": "train",
                      "attributes": "", "valid_samples": cfg.clip_samples,
                      "waveform": np.zeros(cfg.clip_samples, np.float32),
                      "mel": rng.standard_normal(n_mels * t).astype(np.float32), "n_mels": n_mels, "frames": t})
        n += k
    write_text_table(cfg, tmp_path / "text", [c for r in clips for c in r["captions"]], per_shard=7)
    assert len(storage.list_files(str(tmp_path / "text"), ".parquet")) > 3
    torch.manual_seed(0)
    export_weights(build_vae(cfg).state_dict(), cfg, str(tmp_path / "vae"), "vae")
    audio = []
    for i, shard in enumerate(chunk(clips, 8)):
        audio.append(str(tmp_path / "audio" / f"shard-{i:05d}.parquet"))
        storage.write_parquet(audio[-1], arrow_table(shard, AUDIO_SCHEMA))

    encode = EncodeLatents(to_dict(cfg), str(tmp_path / "vae" / "vae.safetensors"), str(tmp_path / "text"),
                           str(tmp_path / "latents"))
    for i, uri in enumerate(audio):
        encode(pa.table({"shard": [i], "rows": [[{"file": uri}]]}))

    out = storage.read_parquet_dir(str(tmp_path / "latents"))
    assert out.schema == LATENT_SCHEMA
    truth = embeddings_by_caption(tmp_path / "text")
    rows = out.to_pylist()
    assert [(r["id"], r["caption"]) for r in rows] == [(c["id"], x) for c in clips for x in c["captions"]]
    for r in rows:
        emb, length = truth[r["caption"]]
        assert r["caption_key"] == caption_key(r["caption"])
        assert r["length"] == length
        np.testing.assert_array_equal(np.asarray(r["emb"], np.float32), emb)
    # The check can fail: the random encoder gives every caption its own embedding.
    assert len({np.asarray(r["emb"], np.float32).tobytes() for r in rows}) == len(rows)


def test_the_lookup_reads_a_table_of_one_group_per_shard_and_refuses_an_unknown_caption(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(text_stage, "ROW_GROUP_ROWS", None)  # as tables written before small groups
    captions = [caption(i) for i in range(20)]
    write_text_table(cfg, tmp_path / "text", captions, per_shard=6)
    lookup = EmbeddingLookup(str(tmp_path / "text"))
    truth = embeddings_by_caption(tmp_path / "text")
    got = lookup.rows(captions[::3] + [""])
    assert set(got) == {caption_key(c) for c in captions[::3] + [""]}
    for c in captions[::3]:
        np.testing.assert_array_equal(got[caption_key(c)][0], truth[c][0])
    with pytest.raises(KeyError, match="not in the text table"):
        lookup.rows(["a caption nobody wrote"])


def test_the_lookup_refuses_a_table_that_is_not_sorted_across_shards(cfg, tmp_path):
    encode = EncodeCaptions(cfg.text, str(tmp_path / "text"), batch_size=4)
    encode(pa.table({"shard": [0], "rows": [[{"caption": "a"}, {"caption": "m"}]]}))
    encode(pa.table({"shard": [1], "rows": [[{"caption": "b"}, {"caption": "z"}]]}))
    with pytest.raises(ValueError, match="not sorted"):
        EmbeddingLookup(str(tmp_path / "text"))
