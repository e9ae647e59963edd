"""Run the DAG's stages in order: skip finished ones, resume interrupted ones, select by name."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from lafma.config import config_hash, to_dict
from pipelines.config import PipelineConfig
from pipelines.core import storage, tracking
from pipelines.core.cluster import init_ray
from pipelines.core.console import format_duration
from pipelines.core.locks import stage_lock
from pipelines.core.preflight import Preflight, PreflightError, preflight
from pipelines.core.stage import Stage, StageContext, digest, read_marker, write_marker


@dataclass
class StageReport:
    name: str
    status: str  # "ran", "skipped" (finished before), "not selected"
    path: str
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # the stage's own summary lines


def dataset_name(cfg: PipelineConfig) -> str:
    if cfg.data.dataset:
        return cfg.data.dataset
    if not cfg.data.manifest:
        return "demo"
    stem = cfg.data.manifest.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "dataset"


def select(names: Sequence[str], only: Sequence[str] = (), start: str | None = None,
           until: str | None = None) -> list[str]:
    """Which stages to run, by ``--only`` or by the ``--from``/``--until`` range."""
    for n in [*only, start, until]:
        if n is not None and n not in names:
            raise SystemExit(f"unknown stage {n!r}; stages are: {', '.join(names)}")
    if only:
        return [n for n in names if n in only]
    i = names.index(start) if start else 0
    j = names.index(until) if until else len(names) - 1
    return list(names[i : j + 1])


def with_needs(stages: Sequence[Stage], name: str) -> list[str]:
    """``name`` and every stage it transitively needs, in DAG order."""
    by_name = {s.name: s for s in stages}
    if name not in by_name:
        raise SystemExit(f"unknown stage {name!r}; stages are: {', '.join(by_name)}")
    wanted, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in wanted:
            wanted.add(n)
            todo += list(by_name[n].needs)
    return [s.name for s in stages if s.name in wanted]


def stage_version(stage: Stage, ctx: StageContext, h: str, marker: dict | None) -> None:
    """What downstream stages hash for this stage: its own hash, and its ``version`` when it
    has one (a training stage resumed to more steps keeps its directory, but its weights
    change, so what depends on them must not count as finished)."""
    v = stage.version(marker) if marker is not None else None
    if v is not None:
        ctx.hashes[stage.name] = digest({"stage": h, "steps": v})


def _pipeline_run(ctx: StageContext) -> str:
    """The parent run of this config: resumed when the same config runs again, so a
    re-run or a resumed run lands under the same parent as the first attempt."""
    h = config_hash(ctx.cfg)
    tags = {"lafma.kind": "pipeline", "lafma.config_hash": h, "lafma.dataset": ctx.dataset}
    found = tracking.find_run(root=ctx.root, experiment=ctx.cfg.name, tags=tags)
    if found:
        tracking.end_run(found, "RUNNING", tracking=tracking.tracking_uri(ctx.root))
        return found
    return tracking.start_run(root=ctx.root, experiment=ctx.cfg.name, run_name=f"pipeline-{h}",
                              params=to_dict(ctx.cfg), tags=tags)


def _stage_run(ctx: StageContext, name: str, h: str) -> str:
    """The stage's child run, found again by its stage hash when an interrupted stage resumes."""
    uri = tracking.tracking_uri(ctx.root)
    found = tracking.find_run(root=ctx.root, experiment=ctx.cfg.name, tags={"lafma.stage_hash": h})
    if found:
        tracking.end_run(found, "RUNNING", tracking=uri)
        from mlflow import MlflowClient

        MlflowClient(uri).set_tag(found, "mlflow.parentRunId", ctx.parent_run_id)  # the current pipeline run
        return found
    return tracking.start_run(root=ctx.root, experiment=ctx.cfg.name, run_name=f"{name}-{h}", params=to_dict(ctx.cfg),
                              tags={"lafma.stage": name, "lafma.stage_hash": h, "lafma.dataset": ctx.dataset,
                                    "lafma.mel_hash": ctx.cfg.mel.config_hash()},
                              parent_run_id=ctx.parent_run_id)


def _numbers(info: dict) -> dict[str, float]:
    out = {k: float(v) for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out |= {k: float(v) for k, v in (info.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return out


def _context(cfg: PipelineConfig, stages: Sequence[Stage], only: Sequence[str], start: str | None,
             until: str | None) -> tuple[StageContext, list[str]]:
    """The run's context (sources resolved) and the stages chosen to run."""
    from pipelines.train.sources import resolve_sources

    chosen = select([s.name for s in stages], only, start, until)
    root = storage.absolute(cfg.storage.root)
    # Weights from elsewhere decide their components' architecture: resolved before any hash.
    cfg, sources = resolve_sources(cfg, root)
    ctx = StageContext(cfg=cfg, root=root, dataset=dataset_name(cfg), sources=sources)
    ctx.hashes["config"] = config_hash(cfg)
    return ctx, chosen


def check_dag(cfg: PipelineConfig, stages: Sequence[Stage], *, only: Sequence[str] = (), start: str | None = None,
              until: str | None = None) -> Preflight:
    """The preflight of :func:`run_dag` alone: the plan and what would fail, nothing run."""
    ctx, chosen = _context(cfg, stages, only, start, until)
    return preflight(stages, chosen, ctx)


def run_dag(cfg: PipelineConfig, stages: Sequence[Stage], *, only: Sequence[str] = (), start: str | None = None,
            until: str | None = None) -> list[StageReport]:
    """Run the selected stages in DAG order (see the module docstring); each stage that runs
    gets an MLflow child run under the pipeline's parent run. The preflight
    (:mod:`pipelines.core.preflight`) runs first: what it finds wrong stops the run before any
    stage, as a :class:`~pipelines.core.preflight.PreflightError` naming the keys."""
    ctx, chosen = _context(cfg, stages, only, start, until)
    pf = preflight(stages, chosen, ctx)
    for f in pf.findings:
        if not f.fatal:
            print(f"[preflight] {f}", flush=True)
    if not pf.ok:
        raise PreflightError(pf.findings)
    names = [s.name for s in stages]
    reports: list[StageReport] = []
    last = max(names.index(n) for n in chosen)
    uri = tracking.tracking_uri(ctx.root)
    started = time.time()
    try:
        for stage in stages[: last + 1]:
            reports.append(_run_stage(stage, stages, chosen, ctx, uri, started))
    except BaseException:
        if ctx.parent_run_id:
            tracking.end_run(ctx.parent_run_id, "FAILED", tracking=uri)
        raise
    if ctx.parent_run_id:
        tracking.RunLogger(ctx.parent_run_id, tracking=uri).log_text(format_summary(reports), "summary.txt")
        tracking.end_run(ctx.parent_run_id, tracking=uri)
    return reports


def _run_stage(stage: Stage, stages: Sequence[Stage], chosen: list[str], ctx: StageContext,
               uri: str, started: float) -> StageReport:
    report = _run_or_skip(stage, stages, chosen, ctx, uri, started)
    if report.status != "not selected":
        stage.check(ctx, report.info)  # before any later stage: what this output proves wrong stops here
        report.notes = stage.summary(report.info)
    return report


def _run_or_skip(stage: Stage, stages: Sequence[Stage], chosen: list[str], ctx: StageContext,
                 uri: str, started: float) -> StageReport:
    """Skip ``stage`` (finished before, or not selected) or run it, with a line when it starts
    and when it ends ("[name] stage k/n: ...", k among the selected stages)."""
    h = digest(stage.key(ctx))
    out = ctx.data_dir(stage.name, h)
    ctx.hashes[stage.name], ctx.outputs[stage.name] = h, out
    marker = read_marker(out)
    if marker is not None and not stage.done(marker, ctx):
        marker = None  # e.g. a training stage asked for more steps: resume it
    stage_version(stage, ctx, h, marker)
    if marker is not None and marker.get("run_id"):
        ctx.run_ids[stage.name] = marker["run_id"]
    if stage.name not in chosen:
        needed = any(stage.name in s.needs for s in stages if s.name in chosen)
        if marker is None and needed:
            raise SystemExit(f"stage {stage.name!r} has not finished for this config (no {out}/_SUCCESS.json); "
                             f"run it first, e.g. --until {stage.name}")
        return StageReport(stage.name, "not selected" if marker is None else "done before", out, info=marker or {})
    place = f"[{stage.name}] stage {chosen.index(stage.name) + 1}/{len(chosen)}:"
    if marker is not None:
        print(f"{place} finished before, skipping ({out})", flush=True)
        return StageReport(stage.name, "skipped", out, info=marker)
    # One driver at a time writes a stage (another on this storage root may be running it).
    with stage_lock(out, place):
        marker = read_marker(out)
        if marker is not None and stage.done(marker, ctx):  # the other driver finished it meanwhile
            stage_version(stage, ctx, h, marker)
            if marker.get("run_id"):
                ctx.run_ids[stage.name] = marker["run_id"]
            print(f"{place} finished by another driver while this one waited, skipping ({out})", flush=True)
            return StageReport(stage.name, "skipped", out, info=marker)
        return _run_locked(stage, ctx, place, out, h, uri, started)


def _run_locked(stage: Stage, ctx: StageContext, place: str, out: str, h: str, uri: str,
                started: float) -> StageReport:
    """Run ``stage`` into ``out`` (its lock held), then write its marker."""
    print(f"{place} running -> {out}", flush=True)
    init_ray(ctx.cfg.compute)  # only now: a run that skips everything never starts Ray
    if ctx.parent_run_id is None:
        ctx.parent_run_id = _pipeline_run(ctx)
    run_id = ctx.run_ids[stage.name] = _stage_run(ctx, stage.name, h)
    t0 = time.time()
    try:
        info = stage.run(ctx, out)
    except BaseException as e:
        stopped = isinstance(e, KeyboardInterrupt)
        print(f"{place} {'interrupted' if stopped else 'failed'} after {format_duration(time.time() - t0)}",
              flush=True)
        tracking.end_run(run_id, "KILLED" if stopped else "FAILED", tracking=uri)
        raise
    seconds = time.time() - t0
    marker = {"stage": stage.name, "config_hash": config_hash(ctx.cfg), "stage_hash": h,
              "inputs": {n: ctx.outputs[n] for n in stage.needs}, "seconds": round(seconds, 2),
              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(), "run_id": run_id, **info}
    write_marker(out, marker)
    tracking.RunLogger(run_id, tracking=uri).log_metrics({f"stage/{k}": v for k, v in _numbers(marker).items()}, step=0)
    tracking.end_run(run_id, tracking=uri)
    stage_version(stage, ctx, h, marker)
    print(f"{place} done in {format_duration(seconds)} (pipeline {format_duration(time.time() - started)} so far)",
          flush=True)
    return StageReport(stage.name, "ran", out, seconds, marker)


def format_summary(reports: Sequence[StageReport]) -> str:
    lines = [f"{'stage':<14}{'status':<14}{'time':>9}{'rows in':>9}{'rows out':>10}{'rejected':>10}  output"]
    for r in reports:
        i = r.info
        lines.append(f"{r.name:<14}{r.status:<14}{i.get('seconds', r.seconds):>8.1f}s{i.get('rows_in', ''):>9}"
                     f"{i.get('rows', ''):>10}{i.get('rejected', ''):>10}  {r.path}")
        if i.get("reasons"):
            lines.append(" " * 14 + "rejects: " + ", ".join(f"{k} {v}" for k, v in i["reasons"].items()))
        lines += [" " * 14 + note for note in r.notes]
    return "\n".join(lines)
