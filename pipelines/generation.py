"""Batch generation on Ray Data: caption rows → wavs + a manifest, resumable, under one root.

Layout of ``out``::

    plan.json                       what the job is: the resolved model, the job's settings and
                                    a hash of every planned row (written before any wav)
    wavs/<name>.wav                 one per good row (``name``: a sanitised, unique file stem)
    parts/shard-00000.parquet       the manifest rows of one shard, written after its wavs
    rejects/plan.parquet            rows refused before generation, with the reason
    rejects/shard-00000.parquet     rows of a shard refused when their input clip was read
    manifest.parquet, manifest.csv  every generated row: id, caption, seed, steps, guidance,
                                    solver, nfe, duration, path, seconds, model_version; and
                                    for rows that use them audio, audio_sha256, start, end,
                                    strength, and best-of-N's candidates, kept, score
    _SUCCESS.json                   totals, throughput, real-time factor, the resolved model

Rows are cut into deterministic shards; a shard's manifest part is written after its wavs,
so a re-run generates only shards without a part (at most one batch per actor is redone
after a crash) and no row appears twice. A re-run resumes only under the plan that made
the finished parts: another model (an alias that moved, too), other rows or other settings
stop it with :class:`PlanChanged` before anything is written, so one output never mixes two.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import pyarrow as pa

from lafma.config import ConfigError
from lafma.data.captions import (
    MAX_CANDIDATES,
    GenerationRow,
    batches,
    plan_generation,
    read_caption_records,
)
from lafma.data.manifest import resolve, scheme_refusal
from pipelines.core import storage, tracking
from pipelines.core.limits import BATCH_CLIP
from pipelines.core.stage import pending_shards, rejects_table, run_shards

# One row per generated clip: manifest.parquet / manifest.csv (not the data manifest of ingest).
# ``seed`` is the kept clip's: plain generation with it makes that clip. The columns after
# ``model_version`` are null for rows that do not use them: ``audio`` (the input clip's URI),
# ``audio_sha256`` (of its bytes), ``start``, ``end``, ``strength``; ``candidates`` (JSON: every
# candidate's seed and score, in seed order), ``kept`` (the kept one's index in it) and ``score``
# (its score) for rows generated best-of-N or scored.
GENERATION_SCHEMA = pa.schema([
    ("id", pa.string()), ("caption", pa.string()), ("seed", pa.int64()), ("steps", pa.int32()),
    ("guidance", pa.float64()), ("solver", pa.string()), ("nfe", pa.int32()), ("duration", pa.float64()),
    ("path", pa.string()), ("seconds", pa.float64()), ("model_version", pa.string()),
    ("audio", pa.string()), ("audio_sha256", pa.string()), ("start", pa.float64()), ("end", pa.float64()),
    ("strength", pa.float64()), ("candidates", pa.string()), ("kept", pa.int32()), ("score", pa.float64()),
])
PLAN, PLAN_FORMAT = "plan.json", 1


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
    # Best-of-N: candidates per row without a ``candidates`` column; the scorer folder that
    # ranks them (None: the one the model's evaluation recorded, when a row needs one).
    candidates: int = 1
    scorer: str | None = None


class PlanChanged(ConfigError):
    """``out`` holds generations made under another plan (or under none recorded): resuming
    into it would mix models, captions or settings in one manifest."""

    def __init__(self, message: str):
        super().__init__("", message)


@dataclass(frozen=True)
class ResolvedModel:
    """``--model`` pinned for one job.

    ``uri`` is what every actor loads (``models:/lafma/3``, never an alias); ``version`` is the
    manifest's ``model_version`` and what two plans compare: ``models:/<name>/<N>``,
    ``runs:/<run id>/<path>``, or ``bundle@sha256:<16 hex>`` for a bundle directory (the
    digest of its manifest, which records each weight file's SHA-256), wherever it lies.
    """

    given: str
    uri: str
    version: str


_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))?/?$")


def resolve_model(model: str, *, root: str) -> ResolvedModel:
    """Pin ``model`` (a registry URI, ``runs:/…``, or a bundle / pyfunc directory) to what it
    names now.

    Raises:
        ConfigError: ``model`` names nothing (unknown alias or version, no such directory).
    """
    if model.startswith("models:/"):
        return _resolve_registered(model, root)
    if model.startswith("runs:/"):
        run_id, _, path = model[len("runs:/"):].strip("/").partition("/")
        if not run_id:
            raise ConfigError("model", f"{model!r} names no run: expected runs:/<run id>/<path>")
        uri = f"runs:/{run_id}/{path}" if path else f"runs:/{run_id}"
        return ResolvedModel(model, uri, uri)
    local = "://" not in model  # s3://, file://: a logged model's directory, read through MLflow
    uri = os.path.abspath(model) if local else model
    if local and not os.path.isdir(uri):
        raise ConfigError("model", f"no model at {model!r}: expected models:/..., runs:/... or a bundle directory")
    try:
        digest = manifest_digest(uri, root)
    except Exception as e:  # not a bundle, a pyfunc directory without one, an unreadable file: say which
        raise ConfigError("model", f"{model!r} is not a bundle or logged model: {str(e).splitlines()[0]}") from None
    return ResolvedModel(model, uri, f"bundle@sha256:{digest}")


def _resolve_registered(model: str, root: str) -> ResolvedModel:
    import mlflow

    m = _REGISTRY_URI.match(model)
    if m is None:
        raise ConfigError("model", f"{model!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    name, alias, ref = m["name"], m["alias"], m["ref"]
    if alias is None and ref is None:
        if not name.startswith("m-"):
            raise ConfigError("model", f"{model!r}: expected models:/{name}/<version> or models:/{name}@<alias>")
        return ResolvedModel(model, model.rstrip("/"), model.rstrip("/"))  # a logged model's id: immutable
    store = tracking.tracking_uri(root)
    client = mlflow.MlflowClient(store)
    try:
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias).version
        elif ref.isdigit():
            version = client.get_model_version(name, ref).version
        elif ref == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ConfigError("model", f"{model}: {name!r} has no versions in {store}")
            version = max(int(v.version) for v in versions)
        else:
            raise ConfigError("model", f"{model}: stages are not used here (MLflow 3 aliases): "
                                       f"use models:/{name}@<alias> or models:/{name}/<version>")
    except mlflow.exceptions.MlflowException as e:
        raise ConfigError("model", f"{model} is not in the registry at {store}: {str(e).splitlines()[0]}") from None
    uri = f"models:/{name}/{version}"
    return ResolvedModel(model, uri, uri)


def manifest_digest(model: str, root: str) -> str:
    """SHA-256 (16 hex) of a bundle's manifest (``lafma.json``) as canonical JSON."""
    from pipelines.core.registry import bundle_manifest

    text = json.dumps(bundle_manifest(model, root=root), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class GenerateShard:
    """Actor: holds one model (and the scorer, for best-of-N); for a shard, reads its rows' input
    clips, writes its wavs, the rows it had to refuse, then its manifest part."""

    def __init__(self, model: dict, root: str, out: str, tracking_uri: str | None = None, scorer: str | None = None,
                 batch_size: int = 8):
        from pipelines.core.registry import load_pipeline

        self.model = ResolvedModel(**model)
        # Ray sets OMP_NUM_THREADS to the actor's CPUs, so actors do not fight over cores. The
        # registry is the driver's, not one this process would find from its own working directory
        # (with an s3:// root and no MLFLOW_TRACKING_URI: ./.lafma of wherever Ray runs the actor).
        self.pipe = load_pipeline(self.model.uri, root=root, tracking_uri=tracking_uri)
        if self.model.version.startswith("bundle@"):  # a directory can be rewritten in place
            now = f"bundle@sha256:{manifest_digest(self.model.uri, root)}"
            if now != self.model.version:
                raise RuntimeError(f"{self.model.uri} changed since the job was planned ({self.model.version} -> "
                                   f"{now}): refusing to mix two models in {out}")
        self.scorer = None
        if scorer is not None:  # checked against the model's text encoder when the job was planned
            from pipelines.scoring import as_written, default_weights_dir, load_scorer

            # Scored as the wav files it writes: the manifest's score is the one the file gets.
            self.scorer = as_written(load_scorer(scorer, text_encoder=self.pipe.text_encoder, text_config=None,
                                                 weights_dir=default_weights_dir(root), device=str(self.pipe.device)))
        self.out, self.batch_size = out, batch_size

    def __call__(self, batch: pa.Table) -> dict:
        from pipelines.row_generation import RowRejected, generate_rows, load_clip, read_clip_bytes

        shard = int(batch.column("shard")[0].as_py())
        rows = [GenerationRow.from_dict(r) for r in batch.column("rows")[0].as_py()]
        clips, rejects = {}, []
        for r in rows:
            if r.audio is None:
                continue
            try:
                clips[r.id] = load_clip(read_clip_bytes(r.audio, BATCH_CLIP), self.pipe.sample_rate, BATCH_CLIP,
                                        name=r.audio, seconds=r.duration)
            except RowRejected as e:  # a clip that cannot be used is its row's reject, never the shard's failure
                rejects.append({"id": r.id, "audio_uri": r.audio, "reason": e.reason, "detail": e.detail})
        usable = [r for r in rows if r.audio is None or r.id in clips]
        results, refused = generate_rows(self.pipe, usable, clips, scorer=self.scorer, batch_size=self.batch_size)
        audio_of = {r.id: r.audio for r in rows}
        rejects += [{"id": e.row_id, "audio_uri": audio_of[e.row_id], "reason": e.reason, "detail": e.detail}
                    for e in refused]
        records = []
        for res in results:
            r, pick = res.row, res.pick
            sf_write(storage.join(self.out, path := f"wavs/{r.name}.wav"), pick.audio, res.sample_rate)
            records.append({"id": r.id, "caption": r.caption, "seed": pick.seed, "steps": r.steps,
                            "guidance": r.guidance, "solver": r.solver, "nfe": pick.nfe, "duration": r.duration,
                            "path": path, "seconds": round(res.seconds, 4), "model_version": self.model.version,
                            "audio": r.audio, "audio_sha256": res.clip_sha256, "start": r.start, "end": r.end,
                            "strength": r.strength, **candidate_columns(pick)})
        if rejects:  # before the part: a shard whose part exists has its rejects written too
            storage.write_parquet(storage.join(self.out, "rejects", f"shard-{shard:05d}.parquet"),
                                  rejects_table(rejects))
        part = pa.Table.from_pylist(records, schema=GENERATION_SCHEMA)
        storage.write_parquet(storage.join(self.out, "parts", f"shard-{shard:05d}.parquet"), part)  # last
        return {"shard": [shard], "rows_out": [len(records)], "rejected": [len(rejects)]}


def sf_write(uri: str, wav, sample_rate: int) -> None:
    """(N,) float audio → a 16-bit PCM wav at ``uri`` (local or remote), clipped to [-1, 1]."""
    import soundfile as sf

    sf.write(buf := io.BytesIO(), wav.clamp(-1, 1).numpy(), sample_rate, "PCM_16", format="WAV")
    storage.write_bytes(uri, buf.getvalue())


def candidate_columns(pick) -> dict:
    """The manifest's best-of-N columns for a :class:`~lafma.metrics.scoring.Pick`: every
    candidate's seed and score (JSON), the kept one's index and score; nulls for a row of one
    unscored candidate."""
    if pick.scores is None and len(pick.seeds) == 1:
        return {"candidates": None, "kept": None, "score": None}
    scores = pick.scores or [None] * len(pick.seeds)
    return {"candidates": json.dumps([{"seed": s, "score": x} for s, x in zip(pick.seeds, scores)]),
            "kept": pick.index, "score": pick.score}


def shards_of(rows: list[GenerationRow], batch_size: int) -> list[list[dict]]:
    """One shard per :func:`lafma.data.captions.batches` batch: a re-run cuts the same shards."""
    return [[r.to_dict() for r in part] for part in batches(rows, batch_size)]


def model_defaults(model: str, root: str) -> dict:
    """The model's own sampler defaults (steps, guidance, solver, duration) and the longest clip
    it makes (``max_duration``: None but for a model conditioned on duration), from its bundle's
    manifest: read in place from a bundle directory; for a registry URI, only that one file
    is downloaded. Nothing is built."""
    from pipelines.core.registry import bundle_manifest

    config = bundle_manifest(model, root=root)["config"]
    sampler = config["sampler"]
    # A bundle written before unet.duration_embedding existed has no such key: not conditioned.
    longest = config["audio"]["clip_seconds"] if config["unet"].get("duration_embedding") else None
    return {**{k: sampler[k] for k in ("steps", "guidance", "solver", "duration")}, "max_duration": longest}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def row_hash(r: GenerationRow) -> str:
    """A hash of everything that shapes a row's audio and its file. The optional fields enter
    only when set, so a row planned before they existed hashes as it did then."""
    fields = [r.id, r.name, r.caption, int(r.seed), int(r.steps), float(r.guidance), r.solver,
              None if r.duration is None else float(r.duration)]
    return _hash(fields + ([r.extras()] if r.extras() else []))


def make_plan(rows: list[GenerationRow], shards: list[list[dict]], model: ResolvedModel, settings: dict) -> dict:
    """What ``plan.json`` records: the resolved model, the job's settings, a hash per row (of
    everything that shapes its audio and its file) and of how rows are cut into shards."""
    row_hashes = {r.id: row_hash(r) for r in rows}
    return {"format": PLAN_FORMAT, "model": asdict(model), "settings": settings,
            "rows_hash": _hash(sorted(row_hashes.items())), "shards_hash": _hash([[r["id"] for r in s] for s in shards]),
            "row_count": len(rows), "rows": row_hashes}


def plan_changes(old: dict, new: dict) -> list[str]:
    """What differs between two plans, one phrase each (``steps: 10 -> 20``); [] if none."""
    if old.get("format") != new["format"]:
        return [f"plan format {old.get('format')} -> {new['format']}"]
    changes = []
    if old["model"]["version"] != new["model"]["version"]:
        changes.append(_model_change(old["model"], new["model"]))
    for key, value in new["settings"].items():
        if old["settings"].get(key) != value:
            changes.append(f"{key}: {old['settings'].get(key)} -> {value}")
    for key in sorted(old["settings"].keys() - new["settings"].keys()):  # e.g. a scorer no longer used
        changes.append(f"{key}: {old['settings'][key]} -> None")
    was, now = old["rows"], new["rows"]
    if old["rows_hash"] != new["rows_hash"]:
        counts = {"changed": sum(i in was and was[i] != h for i, h in now.items()),
                  "added": sum(i not in was for i in now), "removed": sum(i not in now for i in was)}
        changes.append("rows: " + ", ".join(f"{n} {what}" for what, n in counts.items() if n))
    elif old["shards_hash"] != new["shards_hash"] and old["settings"].get("batch_size") == new["settings"]["batch_size"]:
        changes.append("rows: the same rows in another order (they would be cut into other shards)")
    return changes


def _model_change(old: dict, new: dict) -> str:
    a, b = (_REGISTRY_URI.match(m["version"]) for m in (old, new))
    if a and b and a["ref"] and b["ref"] and a["name"] == b["name"]:
        text = f"model: v{a['ref']} -> v{b['ref']}"
    else:
        text = f"model: {old['version']} -> {new['version']}"
    if old["given"] != new["given"]:
        return f"{text} (--model {old['given']} -> {new['given']})"
    return f"{text} ({new['given']} {'moved' if new['given'].startswith('models:/') else 'changed'})"


def check_plan(out: str, plan: dict) -> None:
    """Write ``plan`` to ``out/plan.json``, or check it against the one there.

    Raises:
        PlanChanged: the plan there differs (the message names what changed), or ``out`` has
            finished shards and no plan (written by older code: what made them is unknown).
    """
    file = storage.join(out, PLAN)
    advice = f"choose a new --out, or delete {out} to start over"
    if storage.exists(file):
        try:
            old = storage.read_json(file)
            changes = plan_changes(old, plan)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PlanChanged(f"{out}: its {PLAN} cannot be read ({type(e).__name__}: {e}); {advice}") from None
        if changes:
            done = len(storage.list_files(storage.join(out, "parts"), ".parquet"))
            raise PlanChanged(f"{out} was generated under another plan ({'; '.join(changes)}); resuming would mix "
                              f"them with its {done} finished shard{'s' * (done != 1)}: {advice}")
        return
    if done := len(storage.list_files(storage.join(out, "parts"), ".parquet")):
        raise PlanChanged(f"{out} holds {done} finished shard{'s' * (done != 1)} but no {PLAN} (written by an "
                          f"older version): which model and captions made them is unknown, so it cannot be "
                          f"resumed; {advice}")
    storage.write_json(file, plan)


def run_generation(captions: str, out: str, s: GenerationSettings, *, root: str,
                   defaults: dict | None = None) -> dict:
    """Generate every good row of ``captions`` into ``out``; returns the summary it writes.

    Args:
        captions: caption file (txt / csv / jsonl / parquet), local or ``s3://``; a relative
            ``audio`` path in it lies under the file's folder.
        out: output root, local or ``s3://``; nothing is written outside it.
        s: the job's settings.
        root: the storage root whose MLflow store resolves ``models:/`` URIs.
        defaults: the model's sampler defaults, if the caller already knows them.

    Raises:
        PlanChanged: ``out`` holds a job planned otherwise (see :func:`check_plan`).
        ConfigError: ``s.model`` names no model, ``s.batch_size`` < 1, or rows ask for
            best-of-N and no scorer can be found or used with the model.
    """
    if s.batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {s.batch_size}")
    if not 1 <= s.candidates <= MAX_CANDIDATES:
        raise ConfigError("candidates", f"must be in [1, {MAX_CANDIDATES}], got {s.candidates}")
    records, unparsed = read_caption_records(captions)
    model = resolve_model(s.model, root=root)  # pinned: an alias moved mid-job changes nothing
    d = defaults or model_defaults(model.uri, root)
    job = {"steps": int(s.steps or d["steps"]), "guidance": float(d["guidance"] if s.guidance is None else s.guidance),
           "solver": s.solver or d["solver"], "duration": float(s.duration or d["duration"])}
    rows, rejects = plan_generation(records, job_seed=s.seed, candidates=s.candidates,
                                    max_duration=d.get("max_duration"), **job)
    rows, refused = _locate_clips(rows, captions)
    rejects = [{"id": r["id"], "audio_uri": r.get("audio_uri", ""), "reason": r["reason"], "detail": r["detail"]}
               for r in [*unparsed, *rejects, *refused]]
    shards = shards_of(rows, s.batch_size)
    parts = storage.join(out, "parts")
    scorer, digest = _scorer_for(rows, s, model, root)
    # The scorer enters the plan only when used: a plan without one reads as it did before.
    check_plan(out, make_plan(rows, shards, model, {**job, "seed": s.seed, "batch_size": s.batch_size,
                                                    **({"scorer": digest} if scorer else {})}))
    storage.write_parquet(storage.join(out, "rejects", "plan.parquet"), rejects_table(rejects))
    todo = pending_shards(parts, len(shards))
    print(f"[generate] {len(rows)} rows in {len(shards)} shards ({len(shards) - len(todo)} done before), "
          f"{len(rejects)} rejected; model {model.version}" + (f"; scorer {scorer}" if scorer else ""), flush=True)
    t0 = time.time()
    if todo:
        _run(out, shards, todo, s, root, model, scorer)
    wall = time.time() - t0
    manifest = storage.read_parquet_dir(parts, columns=None)
    manifest = manifest.sort_by("id") if manifest.num_rows else GENERATION_SCHEMA.empty_table()
    storage.write_parquet(storage.join(out, "manifest.parquet"), manifest)
    csv = io.BytesIO()
    import pyarrow.csv as pacsv

    pacsv.write_csv(manifest, csv)
    storage.write_bytes(storage.join(out, "manifest.csv"), csv.getvalue())
    rejects = storage.read_parquet_dir(storage.join(out, "rejects")).to_pylist()  # the plan's and the shards'
    now = {r["id"] for i in todo for r in shards[i]}
    made = [r for r in manifest.select(["id", "duration"]).to_pylist() if r["id"] in now]
    generated, audio_s = len(made), sum(r["duration"] for r in made)
    summary = {"rows": manifest.num_rows, "generated_now": generated, "rejected": len(rejects),
               "reasons": _reasons(rejects), "wall_seconds": round(wall, 2),
               "clips_per_second": round(generated / wall, 3) if generated else None,
               "audio_seconds_per_second": round(audio_s / wall, 3) if generated else None,
               "rtf": round(wall / audio_s, 4) if generated else None, "model": s.model,
               "model_uri": model.uri, "model_version": model.version, "scorer": scorer, "out": out}
    storage.write_json(storage.join(out, "_SUCCESS.json"), summary)
    if generated:
        print(f"[generate] {generated} clips, {audio_s:.1f} s of audio in {wall:.1f} s: "
              f"{summary['clips_per_second']} clips/s, {summary['audio_seconds_per_second']}x real time "
              f"(RTF {summary['rtf']})", flush=True)
    return summary


def _locate_clips(rows: list[GenerationRow], captions: str) -> tuple[list[GenerationRow], list[dict]]:
    """Rows with their ``audio`` resolved (a relative path lies under the caption file's folder),
    and the rejects of rows whose clip lies under a scheme the job may not read."""
    base = captions.rsplit("/", 1)[0] if "/" in captions else "."
    kept, refused = [], []
    for r in rows:
        if r.audio is not None:
            r = replace(r, audio=resolve(r.audio, base if storage.is_remote(base) else os.path.abspath(base)))
            if (why := scheme_refusal(r.audio, BATCH_CLIP.allowed_schemes)) is not None:
                refused.append({"id": r.id, "audio_uri": r.audio, "reason": "scheme_not_allowed", "detail": why})
                continue
        kept.append(r)
    return kept, refused


def _scorer_for(rows: list[GenerationRow], s: GenerationSettings, model: ResolvedModel,
                root: str) -> tuple[str | None, str | None]:
    """The scorer folder the job ranks candidates with and its digest, or (None, None) when no
    row has more than one candidate and none was given.

    Raises:
        ConfigError: a row needs one and none is found, or it does not fit the model.
    """
    if s.scorer is None and not any(r.candidates > 1 for r in rows):
        return None, None
    from pipelines.core.registry import bundle_manifest
    from pipelines.scoring import ScorerError, check_fits, read_meta, resolve_scorer

    try:
        uri = resolve_scorer(model.uri, s.scorer, root=root)
        meta, digest = read_meta(uri)
        check_fits(meta, bundle_manifest(model.uri, root=root)["config"]["text"], uri)
    except ScorerError as e:
        raise ConfigError("scorer", str(e)) from None
    return uri, digest


def _reasons(rejects: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejects:
        out[r["reason"]] = out.get(r["reason"], 0) + 1
    return dict(sorted(out.items()))


def _run(out: str, shards: list[list[dict]], todo: list[int], s: GenerationSettings, root: str,
         model: ResolvedModel, scorer: str | None) -> None:
    """The pending shards through an actor pool (``run_shards`` picks what is missing by
    ``shard-*.parquet`` in a directory: here the manifest parts). Actors load ``model.uri``."""
    run_shards(storage.join(out, "parts"), shards, GenerateShard, label="generate", num_cpus=s.actor_cpus,
               num_gpus=s.actor_gpus, actors=max(1, min(s.actors, len(todo))),
               fn_kwargs={"model": asdict(model), "root": root, "out": out,
                          "tracking_uri": tracking.tracking_uri(root), "scorer": scorer,
                          "batch_size": s.batch_size})
