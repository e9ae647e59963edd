"""Stage 0, ingest: a manifest (or the built-in demo corpus) → clean manifest Parquet + rejects."""

from __future__ import annotations

import copy
import functools
import os
import tempfile

import pyarrow as pa

from lafma.data.manifest import Manifest, manifest_digest, read_manifest
from lafma.data.splits import HELD_OUT, SplitReport, assign_splits
from pipelines.config import DataConfig
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


DEFAULT_SCHEMES = DataConfig().allowed_schemes

# Fewer held-out clips than this and evaluation cannot score (two halves of two clips for
# real vs real); pipelines.stages.evaluate refuses, and the preflight says so before any stage.
MIN_HELD_OUT = 4


@functools.lru_cache(maxsize=4)
def _parsed(uri: str, digest: str, d: DataConfig) -> Manifest:
    """The manifest as read, once per content (``digest``): key() and run() both need it."""
    return read_manifest(uri, layout=d.layout, audio_dir=d.audio_dir, audiocaps_pattern=d.audiocaps_pattern,
                         max_caption_chars=d.max_caption_chars, allowed_schemes=d.allowed_schemes)


def _absolute(uri: str) -> str:
    """A local manifest by its absolute path (one cache entry for key() and run())."""
    return uri if "://" in uri else os.path.abspath(uri)


def split_manifest(uri: str, d: DataConfig, digest: str | None = None) -> tuple[Manifest, SplitReport]:
    """The manifest's rows with every row's split decided (:mod:`lafma.data.splits`). A local
    manifest is read by its absolute path, so the audio paths it resolves work from any worker."""
    uri = _absolute(uri)
    m = copy.deepcopy(_parsed(uri, digest or manifest_digest(uri), d))
    if d.splits == "hash":
        for r in m.rows:
            r["split"] = ""
    return m, assign_splits(m.rows, fraction=d.heldout_fraction, min_clips=d.heldout_min)


def draws_splits(uri: str, d: DataConfig, digest: str) -> bool:
    """Whether any split comes from the hash draw (then its settings are part of the key)."""
    return d.splits == "hash" or any(not r["split"] for r in _parsed(_absolute(uri), digest, d).rows)


def held_out_problem(report: SplitReport, d: DataConfig) -> tuple[str, str] | None:
    """(the key that fixes it, what is wrong) when the held-out splits are too small to
    evaluate, else None."""
    held = sum(report.counts[s] for s in HELD_OUT)
    if held >= MIN_HELD_OUT:
        return None
    if report.drawn:
        key, fix = "data.heldout_fraction", "raise data.heldout_fraction or data.heldout_min (or add clips)"
    else:
        key, fix = "data.splits", ("give test or validation rows in the manifest's split column, or set "
                                   "data.splits=hash to draw them by a hash of each clip")
    return key, f"{held} held-out clips (validation + test), and evaluation needs at least {MIN_HELD_OUT}: {fix}"


class IngestStage(Stage):
    name = "ingest"

    def key(self, ctx: StageContext) -> dict:
        d = ctx.cfg.data
        if not d.manifest:
            source = {"demo": os.path.basename(demo_dir(ctx))}
            drawn = d.splits == "hash"
        else:
            # A file hashes as its bytes (as it always has); a folder as its listing and captions.
            source = {"manifest": d.manifest, "sha256": (digest := manifest_digest(d.manifest))}
            drawn = draws_splits(d.manifest, d, digest)
        if drawn:  # only then: a manifest that gives its splits keeps the key it had
            source["heldout"] = {"splits": d.splits, "fraction": d.heldout_fraction, "min": d.heldout_min}
        # Only when changed, so a default config keeps the key it had; a manifest an older run
        # ingested with other schemes in it is still safe: the audio stage refuses them too.
        if d.allowed_schemes != DEFAULT_SCHEMES:
            source["allowed_schemes"] = list(d.allowed_schemes)
        return {**source, "layout": d.layout, "audio_dir": d.audio_dir, "pattern": d.audiocaps_pattern,
                "max_caption_chars": d.max_caption_chars}

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        d = ctx.cfg.data
        uri = d.manifest or ensure_demo_corpus(ctx)
        m, report = split_manifest(uri, d)
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
                "reasons": dict(sorted(reasons.items())), "layout": m.layout, "manifest": uri, "splits": splits,
                "clips_per_split": report.counts, "split_reason": report.reason,
                "held_out_problem": (problem := held_out_problem(report, d)) and problem[1]}

    def summary(self, info: dict) -> list[str]:
        """Clips per split and where the splits came from; a warning when evaluation cannot run."""
        counts = info.get("clips_per_split")
        if not counts:
            return []
        lines = ["clips per split: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                 + f" ({info.get('split_reason', '')})"]
        if info.get("held_out_problem"):
            lines.append("warning: " + info["held_out_problem"])
        return lines
