"""Stage 0, ingest: a manifest (or the built-in demo corpus) → clean manifest Parquet + rejects."""

from __future__ import annotations

import hashlib
import os
import tempfile

import pyarrow as pa

from lafma.data.manifest import read_manifest
from pipelines.core import storage
from pipelines.core.stage import Stage, StageContext, rejects_table

INGEST_SCHEMA = pa.schema([("id", pa.string()), ("audio_uri", pa.string()), ("caption", pa.string()),
                             ("captions", pa.list_(pa.string())), ("split", pa.string()),
                             ("attributes", pa.string())])


def demo_dir(ctx: StageContext) -> str:
    d = ctx.cfg.data
    from pipelines.core.stage import digest

    key = digest({"clips": d.demo_clips, "seed": d.demo_seed, "sr": ctx.cfg.mel.sample_rate,
                  "seconds": ctx.cfg.audio.clip_seconds})
    return storage.join(ctx.root, "data", "demo", f"corpus-{key}")


def ensure_demo_corpus(ctx: StageContext) -> str:
    """Write the demo corpus under the storage root (once) and return its manifest URI."""
    from lafma.data import write_demo_corpus

    d, out = ctx.cfg.data, demo_dir(ctx)
    manifest = storage.join(out, "manifest.csv")
    if storage.exists(storage.join(out, "_COMPLETE")):
        return manifest
    print(f"[ingest] writing the demo corpus ({d.demo_clips} clips) to {out}", flush=True)
    if storage.is_remote(out):
        with tempfile.TemporaryDirectory() as tmp:
            write_demo_corpus(tmp, d.demo_clips, seed=d.demo_seed, sample_rate=ctx.cfg.mel.sample_rate,
                              clip_seconds=ctx.cfg.audio.clip_seconds)
            fs, path = storage.fs_and_path(out)
            fs.put(tmp.rstrip("/") + "/", path, recursive=True)
    else:
        write_demo_corpus(out, d.demo_clips, seed=d.demo_seed, sample_rate=ctx.cfg.mel.sample_rate,
                          clip_seconds=ctx.cfg.audio.clip_seconds)
    storage.write_bytes(storage.join(out, "_COMPLETE"), b"")
    return manifest


class IngestStage(Stage):
    name = "ingest"

    def key(self, ctx: StageContext) -> dict:
        d = ctx.cfg.data
        if not d.manifest:
            source = {"demo": os.path.basename(demo_dir(ctx))}
        else:
            source = {"manifest": d.manifest, "sha256": hashlib.sha256(storage.read_bytes(d.manifest)).hexdigest()}
        return {**source, "layout": d.layout, "audio_dir": d.audio_dir, "pattern": d.audiocaps_pattern,
                "max_caption_chars": d.max_caption_chars}

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        d = ctx.cfg.data
        uri = d.manifest or ensure_demo_corpus(ctx)
        m = read_manifest(uri, layout=d.layout, audio_dir=d.audio_dir, audiocaps_pattern=d.audiocaps_pattern,
                          max_caption_chars=d.max_caption_chars)
        rows = {name: [r[name] for r in m.rows] for name in INGEST_SCHEMA.names}
        storage.write_parquet(storage.join(out_dir, "rejects", "ingest.parquet"), rejects_table(m.rejects))
        storage.write_parquet(storage.join(out_dir, "manifest.parquet"), pa.table(rows, schema=INGEST_SCHEMA))
        splits: dict[str, int] = {}
        for r in m.rows:
            splits[r["split"]] = splits.get(r["split"], 0) + 1
        reasons: dict[str, int] = {}
        for r in m.rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        return {"rows_in": len(m.rows) + len(m.rejects), "rows": len(m.rows), "rejected": len(m.rejects),
                "reasons": dict(sorted(reasons.items())), "layout": m.layout, "manifest": uri, "splits": splits}
