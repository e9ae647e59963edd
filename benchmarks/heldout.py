"""What the benchmarks that re-score a model's held-out captions share (best_of_n.py, duration.py).

A model's ``evaluate`` stage fixes the set: its held-out clips (ids, captions, attributes,
real audio), each caption's seed, the sampler settings, the embedder and the attribute
classifiers it fitted on the training clips. :func:`load_held_out` rebuilds all of it from the
stage's output, so a benchmark's numbers are on the evaluation's scale; the clips the batch job
writes are read back as the stage reads its own (:func:`read_clips`).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import io
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class HeldOut:
    """A model's evaluation, ready to score new clips of its held-out captions.

    Attributes:
        model: the resolved model (:func:`pipelines.generation.resolve_model`).
        evaluate: the evaluate stage's output folder; ``stage`` its metrics.
        ids: the held-out ids in the order the stage scored them; ``held`` their clips
            (:func:`pipelines.stages.evaluate.load_clips` rows), in that order.
        config: the packaged bundle's config (every section); ``sample_rate`` its mel's.
        embedder: the stage's embedder (the same weights, checked by SHA-256).
        attributes: the attribute names; ``classifiers`` fitted on the training clips as the
            stage fits them; ``labels``: attribute -> the held clips' labels.
    """

    model: object
    evaluate: str
    stage: dict
    ids: list[str]
    held: list[dict]
    config: dict
    sample_rate: int
    embedder: object
    attributes: list[str]
    classifiers: object
    labels: dict[str, list]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options every held-out benchmark takes: which run and model, where its evaluation is,
    its seed, how the batch job runs, and where the jobs and the report go."""
    p.add_argument("--root", required=True, help="storage root of the finished run (its MLflow store resolves --model)")
    p.add_argument("--model", required=True, help="models:/lafma/<version> or models:/lafma@<alias>")
    p.add_argument("--evaluate", default=None, help="the version's evaluate stage output (default: found under --root)")
    p.add_argument("--seed", type=int, default=0, help="evaluate.seed of that run (the held-out clips' seeds)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per model call")
    p.add_argument("--actor-cpus", type=float, default=1.0)
    p.add_argument("--out", default=None, help="where the jobs write (default: a new temporary folder)")
    p.add_argument("--write", default=None, help="also write the markdown report here")


def find_evaluation(root: str, version: str) -> str:
    """The newest finished ``evaluate`` stage output under ``root`` that evaluated ``version``."""
    found = []
    for marker in glob.glob(os.path.join(root, "data", "*", "evaluate-*", "_SUCCESS.json")):
        info = json.loads(Path(marker).read_text())
        if str(info.get("model_version")) == version:
            found.append((info.get("finished_at", ""), os.path.dirname(marker)))
    if not found:
        raise SystemExit(f"no evaluate stage under {root}/data evaluated version {version}: give --evaluate")
    return max(found)[1]


def load_held_out(root: str, model: str, evaluate: str | None = None) -> HeldOut:
    """The evaluation of ``model`` (found under ``root`` by its version, or ``evaluate``)."""
    import torch

    from lafma.metrics import fit_attribute_classifiers
    from pipelines.config import EvaluateConfig, PipelineConfig
    from pipelines.core import storage
    from pipelines.generation import resolve_model
    from pipelines.scoring import bundle_config
    from pipelines.stages import evaluate as ev

    resolved = resolve_model(model, root=root)
    version = resolved.uri.rsplit("/", 1)[-1]
    evaluate = storage.absolute(evaluate) if evaluate else find_evaluation(root, version)
    marker = json.loads(Path(evaluate, "_SUCCESS.json").read_text())
    inputs = marker["inputs"]
    ids = json.loads(Path(evaluate, "metrics.json").read_text())["ids"]
    # The stage scored the first max_clips held-out clips by id: the first len(ids) of them.
    by_id = {c["id"]: c for c in ev.load_clips(inputs["audio"], ev.HELD_OUT, len(ids))}
    held = [by_id[i] for i in ids]
    train = ev.load_clips(inputs["audio"], ("train",), ev.TRAIN_CLIPS)
    config = bundle_config(inputs["package"])
    sr = config["mel"]["sample_rate"]
    embedder = ev.evaluation_embedder(PipelineConfig(evaluate=EvaluateConfig()), root)
    if embedder.weights_sha256 != marker["embedder"]["embedder_sha256"]:
        raise SystemExit(f"{embedder.name} is not the embedder {evaluate} used ({marker['embedder']['embedder']})")
    names = ev.attribute_names(train)
    fit = fit_attribute_classifiers(torch.from_numpy(ev.embed(embedder, [c["waveform"] for c in train], sr).clips),
                                    {a: [c["attributes"].get(a) for c in train] for a in names})
    return HeldOut(resolved, evaluate, marker["metrics"], ids, held, config, sr, embedder, names, fit,
                   {a: [c["attributes"].get(a) for c in held] for a in names})


def write_captions(held: list[dict], seed: int, path: str) -> str:
    """The held-out captions as a batch job's caption file, each seeded as the stage seeds it."""
    from lafma.data.captions import derive_seed

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Path(path).write_text("".join(json.dumps({"id": c["id"], "caption": c["caption"],
                                              "seed": derive_seed(seed, c["id"])}) + "\n" for c in held))
    return path


def read_manifest(job: str) -> dict[str, dict]:
    """A finished batch job's manifest rows by id."""
    from pipelines.core import storage

    return {r["id"]: r for r in storage.read_parquet_file(os.path.join(job, "manifest.parquet")).to_pylist()}


def read_clips(job: str, manifest: dict[str, dict], ids: list[str]) -> list[np.ndarray]:
    """The wav files the job wrote for ``ids`` (float32, (N,) each), in that order."""
    import soundfile as sf

    return [sf.read(io.BytesIO(Path(job, manifest[i]["path"]).read_bytes()), dtype="float32")[0] for i in ids]


def attribute_scores(h: HeldOut, clip_embeddings: np.ndarray) -> dict[str, dict[str, float]]:
    """The stage's attribute classifiers on (N, D) clip embeddings of the held-out captions'
    clips: attribute -> {"accuracy", "chance", ...} (:func:`lafma.metrics.attribute_accuracy`)."""
    import torch

    from lafma.metrics import attribute_accuracy

    return attribute_accuracy(h.classifiers, torch.from_numpy(clip_embeddings), h.labels)


def provenance() -> str:
    """Date, machine, CPU count, commit and the 1-minute load average, for a report's first line."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, commit {commit}, "
            f"1-min load average {load:.2f} at the end")
