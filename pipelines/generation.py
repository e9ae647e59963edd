"""Batch generation on Ray Data: caption rows → wavs + a manifest, resumable, under one root.

Layout of ``out``::

    wavs/<name>.wav                 one per good row (``name``: a sanitised, unique file stem)
    parts/shard-00000.parquet       the manifest rows of one shard, written after its wavs
    rejects/plan.parquet            rows refused before generation, with the reason
    manifest.parquet, manifest.csv  every generated row: id, caption, seed, steps, guidance,
                                    solver, nfe, duration, path, seconds
    _SUCCESS.json                   totals, throughput, real-time factor

Rows are cut into deterministic shards; a shard's manifest part is written after its wavs,
so a re-run generates only shards without a part (at most one batch per actor is redone
after a crash) and no row appears twice.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import pyarrow as pa

from lafma.data.captions import GenerationRow, batches, plan_generation, read_caption_records
from pipelines.core import storage
from pipelines.core.stage import pending_shards, rejects_table, run_shards

# One row per generated clip: manifest.parquet / manifest.csv (not the data manifest of ingest).
GENERATION_SCHEMA = pa.schema([
    ("id", pa.string()), ("caption", pa.string()), ("seed", pa.int64()), ("steps", pa.int32()),
    ("guidance", pa.float64()), ("solver", pa.string()), ("nfe", pa.int32()), ("duration", pa.float64()),
    ("path", pa.string()), ("seconds", pa.float64()),
])


@dataclass
class GenerationSettings:
    model: str
    steps: int | None = None  # None: the model's defaults
    guidance: float | None = None
    solver: str | None = None
    duration: float | None = None
    seed: int = 0
    batch_size: int = 8
    actors: int = 1
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0


class GenerateShard:
    """Actor: holds one model; for a shard, writes its wavs, then its manifest part."""

    def __init__(self, model: str, root: str, out: str):
        from pipelines.core.registry import load_pipeline

        # Ray sets OMP_NUM_THREADS to the actor's CPUs, so actors do not fight over cores.
        self.pipe = load_pipeline(model, root=root)
        self.out = out

    def __call__(self, batch: pa.Table) -> dict:
        import soundfile as sf

        shard = int(batch.column("shard")[0].as_py())
        rows = [GenerationRow(**r) for r in batch.column("rows")[0].as_py()]
        t0 = time.perf_counter()
        gen = self.pipe.generate([r.caption for r in rows], seeds=[r.seed for r in rows], steps=rows[0].steps,
                                 guidance=rows[0].guidance, solver=rows[0].solver, duration=rows[0].duration)
        seconds = (time.perf_counter() - t0) / len(rows)
        records = []
        for r, wav in zip(rows, gen.audio):
            sf.write(buf := io.BytesIO(), wav.clamp(-1, 1).numpy(), gen.sample_rate, "PCM_16", format="WAV")
            path = f"wavs/{r.name}.wav"
            storage.write_bytes(storage.join(self.out, path), buf.getvalue())
            records.append({"id": r.id, "caption": r.caption, "seed": r.seed, "steps": r.steps,
                            "guidance": r.guidance, "solver": r.solver, "nfe": gen.nfe,
                            "duration": r.duration, "path": path, "seconds": round(seconds, 4)})
        part = pa.Table.from_pylist(records, schema=GENERATION_SCHEMA)
        storage.write_parquet(storage.join(self.out, "parts", f"shard-{shard:05d}.parquet"), part)  # last
        return {"shard": [shard], "rows_out": [len(rows)], "rejected": [0]}


def shards_of(rows: list[GenerationRow], batch_size: int) -> list[list[dict]]:
    """One shard per :func:`lafma.data.captions.batches` batch: a re-run cuts the same shards."""
    return [[r.to_dict() for r in part] for part in batches(rows, batch_size)]


def model_defaults(model: str, root: str) -> dict:
    """The model's own sampler defaults (steps, guidance, solver, duration), from its bundle's
    manifest: read in place from a bundle directory; for a registry URI, only that one file
    is downloaded. Nothing is built."""
    from pipelines.core.registry import bundle_manifest

    sampler = bundle_manifest(model, root=root)["config"]["sampler"]
    return {k: sampler[k] for k in ("steps", "guidance", "solver", "duration")}


def run_generation(captions: str, out: str, s: GenerationSettings, *, root: str,
                   defaults: dict | None = None) -> dict:
    """Generate every good row of ``captions`` into ``out``; returns the summary it writes.

    Args:
        captions: caption file (txt / csv / jsonl / parquet), local or ``s3://``.
        out: output root, local or ``s3://``; nothing is written outside it.
        s: the job's settings.
        root: the storage root whose MLflow store resolves ``models:/`` URIs.
        defaults: the model's sampler defaults, if the caller already knows them.
    """
    records, unparsed = read_caption_records(captions)
    d = defaults or model_defaults(s.model, root)
    rows, rejects = plan_generation(records, job_seed=s.seed, steps=s.steps or d["steps"],
                                    guidance=d["guidance"] if s.guidance is None else s.guidance,
                                    solver=s.solver or d["solver"], duration=s.duration or d["duration"])
    rejects = [{"id": r["id"], "audio_uri": "", "reason": r["reason"], "detail": r["detail"]}
               for r in [*unparsed, *rejects]]
    storage.write_parquet(storage.join(out, "rejects", "plan.parquet"), rejects_table(rejects))
    shards = shards_of(rows, s.batch_size)
    todo = pending_shards(storage.join(out, "parts"), len(shards))
    print(f"[generate] {len(rows)} rows in {len(shards)} shards ({len(shards) - len(todo)} done before), "
          f"{len(rejects)} rejected", flush=True)
    t0 = time.time()
    if todo:
        _run(out, shards, todo, s, root)
    wall = time.time() - t0
    manifest = storage.read_parquet_dir(storage.join(out, "parts"), columns=None)
    manifest = manifest.sort_by("id") if manifest.num_rows else GENERATION_SCHEMA.empty_table()
    storage.write_parquet(storage.join(out, "manifest.parquet"), manifest)
    csv = io.BytesIO()
    import pyarrow.csv as pacsv

    pacsv.write_csv(manifest, csv)
    storage.write_bytes(storage.join(out, "manifest.csv"), csv.getvalue())
    generated = sum(len(shards[i]) for i in todo)
    audio_s = sum(r["duration"] for i in todo for r in shards[i])
    summary = {"rows": manifest.num_rows, "generated_now": generated, "rejected": len(rejects),
               "reasons": _reasons(rejects), "wall_seconds": round(wall, 2),
               "clips_per_second": round(generated / wall, 3) if generated else None,
               "audio_seconds_per_second": round(audio_s / wall, 3) if generated else None,
               "rtf": round(wall / audio_s, 4) if generated else None, "model": s.model, "out": out}
    storage.write_json(storage.join(out, "_SUCCESS.json"), summary)
    if generated:
        print(f"[generate] {generated} clips, {audio_s:.1f} s of audio in {wall:.1f} s: "
              f"{summary['clips_per_second']} clips/s, {summary['audio_seconds_per_second']}x real time "
              f"(RTF {summary['rtf']})", flush=True)
    return summary


def _reasons(rejects: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejects:
        out[r["reason"]] = out.get(r["reason"], 0) + 1
    return dict(sorted(out.items()))


def _run(out: str, shards: list[list[dict]], todo: list[int], s: GenerationSettings, root: str) -> None:
    """The pending shards through an actor pool (``run_shards`` picks what is missing by
    ``shard-*.parquet`` in a directory: here the manifest parts)."""
    run_shards(storage.join(out, "parts"), shards, GenerateShard, label="generate", num_cpus=s.actor_cpus,
               num_gpus=s.actor_gpus, actors=max(1, min(s.actors, len(todo))),
               fn_kwargs={"model": s.model, "root": root, "out": out})
