"""Stage 2, text: unique captions → token embeddings, on a Ray Data actor pool.

Captions are deduplicated by text (AudioCaps repeats many), and the empty caption — the
unconditional input of classifier-free guidance — is always included. Rows: ``caption_key``
(sha1 of the text), ``caption``, ``length`` (real tokens L), ``dim`` (D), ``emb`` (L × D
float32 flattened: only real tokens are stored, the mask is ``ones(L)``).
The encoder runs in float32 on any device: T5 overflows fp16.
"""

from __future__ import annotations

import bisect
import hashlib
import time

import pyarrow as pa

from lafma.config import ConfigError, TextConfig
from pipelines.core import storage
from pipelines.core.stage import (
    Stage,
    StageContext,
    arrow_table,
    chunk,
    rejects_table,
    run_shards,
    shard_name,
)

SCHEMA = pa.schema([("caption_key", pa.string()), ("caption", pa.string()), ("length", pa.int32()),
                    ("dim", pa.int32()), ("emb", pa.list_(pa.float32()))])


# Rows per Parquet row group of the text table. A reader that wants one caption fetches its
# whole group, so this bounds the over-read (8 embeddings of FLAN-T5-Large, ~0.6 MB); smaller
# groups cost footer bytes (~1 kB a group) and one ranged read each.
ROW_GROUP_ROWS = 8


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


class EncodeCaptions:
    """Actor: loads the text encoder once, then encodes and writes one shard per call."""

    def __init__(self, text: TextConfig, out_dir: str, batch_size: int):
        import torch

        from lafma.text import build_text_encoder

        self.encoder = build_text_encoder(text)
        if torch.cuda.is_available():
            self.encoder.to("cuda")
        self.out_dir, self.batch_size = out_dir, batch_size

    def __call__(self, batch: pa.Table) -> dict:
        shard = int(batch.column("shard")[0].as_py())
        captions = [r["caption"] for r in batch.column("rows")[0].as_py()]
        rows = []
        for part in chunk(captions, self.batch_size):
            emb, mask = self.encoder(part)
            for caption, e, m in zip(part, emb.cpu(), mask.cpu()):
                n = int(m.sum())
                rows.append({"caption_key": caption_key(caption), "caption": caption, "length": n,
                             "dim": e.shape[-1], "emb": e[:n].flatten().numpy()})  # (n, D) -> (n·D,)
        table = arrow_table(rows, SCHEMA)
        # write_shard's order (rejects, then the shard, which marks it done), with small row
        # groups: the latents stage fetches a clip's embeddings by them (EmbeddingLookup).
        storage.write_parquet(storage.join(self.out_dir, "rejects", shard_name(shard)), rejects_table([]))
        storage.write_parquet(storage.join(self.out_dir, shard_name(shard)), table, row_group_size=ROW_GROUP_ROWS)
        return {"shard": [shard], "rows_out": [len(rows)], "rejected": [0]}


class TextStage(Stage):
    """Every caption of the manifest, encoded once. It needs only the captions, so a change of
    the mel or the clip length (a new audio stage) re-encodes nothing."""

    name = "text"
    needs = ("ingest",)

    def key(self, ctx: StageContext) -> dict:
        return {"ingest": ctx.hashes["ingest"], "text": ctx.cfg.text, "batch": ctx.cfg.compute.text_batch_size}

    def resources(self, ctx: StageContext) -> list:
        return [encoder_actors("text encoder actors", ctx)]

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        table = storage.read_parquet_dir(ctx.outputs["ingest"], columns=["captions"])
        unique = {""} | {c for cs in table.column("captions").to_pylist() for c in cs}
        captions = sorted(unique)  # deterministic shards: the same captions land in the same files
        c = ctx.cfg.compute
        shards = chunk([{"caption": x} for x in captions], 4 * c.text_batch_size)
        start = time.time()
        run_shards(out_dir, shards, EncodeCaptions, label="text", num_cpus=c.text_actor_cpus,
                   num_gpus=c.text_actor_gpus, actors=c.text_actors,
                   fn_kwargs={"text": ctx.cfg.text, "out_dir": out_dir, "batch_size": c.text_batch_size})
        written = storage.read_parquet_dir(out_dir, columns=["caption_key"]).num_rows
        return {"rows_in": table.num_rows, "rows": written, "unique_captions": len(captions), "rejected": 0,
                "empty_caption_key": caption_key(""), "dim": recorded_width(out_dir),
                "seconds": round(time.time() - start, 2)}

    def check(self, ctx: StageContext, marker: dict) -> None:
        """The UNet is built ``context_dim`` wide: stop now, before any training, if the encoder
        produced another width (a guess by name can be wrong; training would fail only at
        the LFM, after the VAE and vocoder have trained)."""
        width = marker.get("dim") or recorded_width(ctx.outputs[self.name])
        if width != ctx.cfg.context_dim:
            source = "unet.context_dim" if ctx.cfg.unet.context_dim else f"the guess for text.name_or_path={ctx.cfg.text.name_or_path!r}"
            raise ConfigError("unet.context_dim",
                              f"the text encoder ({ctx.cfg.text.kind}) produced {width}-d embeddings, but the UNet "
                              f"would be built {ctx.cfg.context_dim} wide ({source}); set unet.context_dim={width}")


def encoder_actors(what: str, ctx: StageContext):
    """The actor pool ``compute.text_*`` sizes (the text and latents stages run one)."""
    from pipelines.core.preflight import Request

    c = ctx.cfg.compute
    return Request(what, c.text_actors, c.text_actor_cpus, c.text_actor_gpus, "compute.text_actors",
                   "compute.text_actor_cpus", "compute.text_actor_gpus")


def recorded_width(text_dir: str) -> int:
    """The embedding width D the text stage wrote (every row of a stage has the same)."""
    first = storage.list_files(text_dir, ".parquet")[0]
    return int(storage.read_parquet_file(first, ["dim"]).column("dim")[0].as_py())


class EmbeddingLookup:
    """The text table's rows for a given set of captions, read without loading the table.

    The text stage writes captions sorted (in and across its shards) in small row groups, so
    the footers' min/max ``caption`` statistics cut the table into disjoint, ordered ranges:
    each caption is in the one group whose range holds it, found by bisection, and only those
    groups are read. Held in memory: two captions per group (about a quarter of the keys, none
    of the embeddings); read per call: at most ``ROW_GROUP_ROWS`` rows per caption asked for.
    A table written before the row groups were small (one group a shard) still reads, a whole
    shard per caption's group.
    """

    COLUMNS = ["caption_key", "caption", "emb", "length"]

    def __init__(self, text_dir: str):
        groups = []  # (min caption, max caption, file, row group)
        for uri in storage.list_files(text_dir, ".parquet"):
            meta = storage.parquet_metadata(uri)
            col = meta.schema.to_arrow_schema().get_field_index("caption")
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(col).statistics
                if stats is not None and stats.has_min_max:
                    low, high = stats.min, stats.max
                else:  # no statistics written (a caption past the writer's size limit): read the keys
                    names = storage.read_row_groups(uri, [g], ["caption"]).column("caption").to_pylist()
                    low, high = min(names), max(names)
                groups.append((low, high, uri, g))
        groups.sort()
        for (_, high, uri, g), (low, *_rest) in zip(groups, groups[1:]):
            if high >= low:  # ranges overlap: the table is not sorted as the text stage writes it
                raise ValueError(f"text table {text_dir}: row group {g} of {uri} overlaps the next; "
                                 "its captions are not sorted across shards")
        self.lows = [g[0] for g in groups]
        self.groups = groups

    def rows(self, captions: list[str]) -> dict[str, tuple]:
        """``{caption_key: (emb (L·D,) float32, L)}`` for ``captions``; a caption the table does
        not hold raises KeyError (the text stage encodes every caption of the manifest)."""
        import numpy as np

        wanted: dict[tuple[str, int], set[str]] = {}
        for caption in set(captions):
            i = bisect.bisect_right(self.lows, caption) - 1
            if i < 0 or caption > self.groups[i][1]:
                raise KeyError(f"caption {caption!r} is not in the text table")
            wanted.setdefault(self.groups[i][2:], set()).add(caption_key(caption))
        out: dict[str, tuple] = {}
        by_file: dict[str, list[int]] = {}
        for uri, g in sorted(wanted):
            by_file.setdefault(uri, []).append(g)
        keys = set().union(*wanted.values()) if wanted else set()
        for uri, gs in by_file.items():
            table = storage.read_row_groups(uri, gs, self.COLUMNS)
            for key, emb, n in zip(table.column("caption_key").to_pylist(),
                                   table.column("emb").to_numpy(zero_copy_only=False),
                                   table.column("length").to_pylist()):
                if key in keys:  # a copy: a view would keep the whole row groups' buffers alive
                    out[key] = (np.array(emb, np.float32), n)
        if missing := keys - out.keys():
            raise KeyError(f"{len(missing)} caption(s) not in the text table, e.g. {sorted(missing)[0]}")
        return out
