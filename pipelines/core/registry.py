"""The model registry: one registered MLflow model, ``lafma``, whose versions are bundles.

A version is a pyfunc around a :mod:`lafma.bundle` directory (the LFM, VAE and vocoder as
safetensors, every component's config, the text encoder or its reference, the mel hash).
It is logged as *models from code* (:mod:`pipelines.lafma_pyfunc`), so loading it executes
that small file instead of unpickling an object.

Aliases, not stages (MLflow 3): every new version becomes ``candidate``; ``champion`` moves
only through :func:`gate` (the candidate's gate metric must beat the champion's) or by hand
through :func:`promote` / :func:`rollback`, which record who and why as version tags.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from lafma.data.captions import batches, plan_generation
from pipelines.core import tracking

MODEL_NAME = "lafma"
CANDIDATE, CHAMPION = "candidate", "champion"
PYFUNC_CODE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lafma_pyfunc.py")
# Version tags. The gate metric travels with the version so any two versions can be compared.
GATE_METRIC_TAG, GATE_VALUE_TAG, GATE_MODE_TAG = "lafma.gate.metric", "lafma.gate.value", "lafma.gate.mode"
INPUT_COLUMNS = {"caption": "string", "seed": "long", "steps": "long", "guidance": "double", "solver": "string",
                 "duration": "double"}
# Clips per pipeline call in ``predict``: batch generation's default (GenerationSettings),
# so one large request holds no more in memory than one shard of a batch job.
PREDICT_BATCH = 8


class LafmaModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: a table of captions (optional seed, steps, guidance, solver, duration per
    row) in, a table with each row's audio (float32 list), sample rate, seed and NFE out.

    Rows are checked as batch generation checks them (:func:`lafma.data.captions.plan_generation`);
    a table with any row that cannot be generated raises ``ValueError`` naming every such row
    and why, and generates nothing.
    """

    def load_context(self, context) -> None:
        import torch

        from lafma.bundle import load_bundle

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_bundle(context.artifacts["bundle"], device=device)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return generate_frame(self.pipe, pd.DataFrame(model_input))


def generate_frame(pipe, frame: pd.DataFrame, batch_size: int = PREDICT_BATCH) -> pd.DataFrame:
    """Generate every row of ``frame`` (see :class:`LafmaModel`); rows sharing settings are batched.

    Rows are planned by :func:`lafma.data.captions.plan_generation`, with the pipeline's
    defaults for what a row leaves out. A row without a seed gets its position (0, 1, ...), so
    a table always yields the same audio.

    Raises:
        ValueError: no ``caption`` column, or rows that batch generation would reject; the
            message names each (``row-000002``: the second row, or its ``id``) with its reason.
    """
    if "caption" not in frame.columns:
        raise ValueError(f"the input needs a 'caption' column; got {list(frame.columns)}")
    d = pipe.defaults
    records = frame.to_dict("records")
    for i, r in enumerate(records):
        seed = r.get("seed")
        if seed is None or (pd.api.types.is_scalar(seed) and pd.isna(seed)):
            r["seed"] = i
    rows, rejects = plan_generation(records, job_seed=0, steps=d["steps"], guidance=d["guidance"],
                                    solver=d["solver"], duration=d["duration"])
    if rejects:
        raise ValueError(f"{len(rejects)} of {len(records)} rows cannot be generated: " + "; ".join(
            f"{r['id']}: {r['reason']}" + (f" ({r['detail']})" if r["detail"] else "") for r in rejects))
    position = {r.id: i for i, r in enumerate(rows)}  # every row was kept: planned rows are in input order
    out: list[dict | None] = [None] * len(rows)
    for part in batches(rows, batch_size):
        steps, guidance, solver, duration = part[0].settings
        gen = pipe.generate([r.caption for r in part], seeds=[r.seed for r in part], steps=steps,
                            guidance=guidance, solver=solver, duration=duration)
        for r, audio in zip(part, gen.audio):
            out[position[r.id]] = {"caption": r.caption, "seed": r.seed, "steps": r.steps, "guidance": r.guidance,
                                   "solver": r.solver, "duration": r.duration, "nfe": gen.nfe,
                                   "sample_rate": gen.sample_rate, "audio": audio.numpy().astype(np.float32)}
    return pd.DataFrame(out)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec(t, n, required=n == "caption") for n, t in INPUT_COLUMNS.items()]))


@dataclass
class Registered:
    version: str
    uri: str  # models:/lafma/<version>


def register(bundle_dir: str, *, root: str, run_id: str, gate_metric: str, gate_value: float,
             lower_is_better: bool = True, tags: Mapping[str, Any] | None = None) -> Registered:
    """Log ``bundle_dir`` as a pyfunc in run ``run_id``, register it as a new version of
    ``lafma``, give it the ``candidate`` alias, and tag it with its lineage and gate metric."""
    import torch

    tracking.configure(root)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=PYFUNC_CODE, artifacts={"bundle": bundle_dir},
            registered_model_name=MODEL_NAME, signature=signature(),
            # Shown in the UI as the request to send; MLflow also loads the logged model and runs
            # it once on this example (two steps), warning if the artifact cannot serve it.
            input_example=pd.DataFrame({"caption": ["a dog barks twice"], "seed": [0], "steps": [2]}),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                              "safetensors", "transformers", "torchaudio", "soundfile"])
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    all_tags = {**(tags or {}), GATE_METRIC_TAG: gate_metric, GATE_VALUE_TAG: repr(float(gate_value)),
                GATE_MODE_TAG: "min" if lower_is_better else "max", "lafma.run_id": run_id}
    for k, v in all_tags.items():
        client.set_model_version_tag(MODEL_NAME, version, k, str(v))
    client.set_registered_model_alias(MODEL_NAME, CANDIDATE, version)
    return Registered(version, f"models:/{MODEL_NAME}/{version}")


def register_imported(bundle_dir: str, *, root: str, sources: Mapping[str, Mapping[str, Any]]) -> Registered:
    """Register an imported bundle (:func:`lafma.importer.import_published`) in its own run of
    the ``lafma-import`` experiment. Its tags name each source file and its SHA-256 and say
    "imported"; it has no gate value yet (NaN), so the gate will not promote it until an
    evaluation sets one (:func:`set_gate`) or someone promotes it by hand."""
    tags = {"lafma.imported": "true"}
    for part, src in sources.items():
        tags[f"lafma.source.{part}"] = src["name"]
        tags[f"lafma.source.{part}.format"] = src["format"]
        for file, digest in src["sha256"].items():
            tags[f"lafma.source.{part}.sha256" + ("" if file == src["name"] else f".{file}")] = digest
    run_id = tracking.start_run(root=root, experiment="lafma-import", run_name="import", tags=tags,
                                params={"sources": {p: s["path"] for p, s in sources.items()}})
    try:
        reg = register(bundle_dir, root=root, run_id=run_id, gate_metric="none", gate_value=float("nan"), tags=tags)
    except BaseException:
        tracking.end_run(run_id, "FAILED", tracking=tracking.tracking_uri(root))
        raise
    tracking.end_run(run_id, tracking=tracking.tracking_uri(root))
    return reg


def set_gate(version: str, *, root: str, metric: str, value: float, lower_is_better: bool = True) -> None:
    """Replace a version's gate metric (the evaluation stage's, once it has measured one)."""
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    for k, v in {GATE_METRIC_TAG: metric, GATE_VALUE_TAG: repr(float(value)), GATE_MODE_TAG: "min" if lower_is_better else "max"}.items():
        client.set_model_version_tag(MODEL_NAME, version, k, v)


def _alias_version(client, alias: str):
    try:
        return client.get_model_version_by_alias(MODEL_NAME, alias)
    except mlflow.exceptions.MlflowException:
        return None


@dataclass
class Decision:
    promoted: bool
    reason: str
    candidate: str
    champion: str | None  # the champion before the decision


def gate(*, root: str, version: str | None = None) -> Decision:
    """Move ``champion`` to ``version`` (default: the ``candidate``) only if its gate metric beats
    the current champion's. Versions gated on different metrics are not compared: the champion
    stays, and the reason says so."""
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    cand = client.get_model_version(MODEL_NAME, version) if version else _alias_version(client, CANDIDATE)
    if cand is None:
        raise ValueError(f"no {CANDIDATE!r} version of {MODEL_NAME!r} to gate")
    champ = _alias_version(client, CHAMPION)
    metric, value, mode = cand.tags.get(GATE_METRIC_TAG), float(cand.tags.get(GATE_VALUE_TAG, "nan")), cand.tags.get(GATE_MODE_TAG)
    cand_v, champ_v = str(cand.version), (str(champ.version) if champ else None)
    if math.isnan(value):
        return Decision(False, f"version {cand_v} has no {metric or 'gate'} value (imported or not evaluated): "
                               "evaluate it, or promote by hand (pipelines/promote.py)", cand_v, champ_v)
    if champ is None:
        ok, why = True, f"no champion yet; {metric} = {value:.6g}"
    elif champ_v == cand_v:
        return Decision(False, f"version {cand_v} is already the champion", cand_v, champ_v)
    elif math.isnan(float(champ.tags.get(GATE_VALUE_TAG, "nan"))):
        # An imported (or never evaluated) champion promoted by hand has nothing to compare.
        ok, why = True, f"champion v{champ.version} has no gate value; {metric} = {value:.6g}"
    elif champ.tags.get(GATE_METRIC_TAG) != metric:
        ok, why = False, (f"champion v{champ.version} is gated on {champ.tags.get(GATE_METRIC_TAG)!r}, candidate on "
                          f"{metric!r}: not comparable; promote by hand (pipelines/promote.py) if intended")
    else:
        best = float(champ.tags.get(GATE_VALUE_TAG, "nan"))
        ok = bool(value < best if mode == "min" else value > best)  # NaN never wins
        why = (f"{metric}: candidate {value:.6g} {'beats' if ok else 'does not beat'} champion v{champ.version} "
               f"{best:.6g} ({'lower' if mode == 'min' else 'higher'} is better)")
    if ok:
        promote(cand_v, root=root, reason=f"gate: {why}", by="gate")
    return Decision(ok, why, cand_v, champ_v)


def promote(version: str, *, root: str, reason: str, by: str | None = None) -> str | None:
    """Point ``champion`` at ``version``; record who, why, when and the previous champion as
    tags of the version. Returns the previous champion's version."""
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    client.get_model_version(MODEL_NAME, version)  # raises if it does not exist
    prev = _alias_version(client, CHAMPION)
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    record = {"lafma.promoted_by": by or getpass.getuser(), "lafma.promoted_reason": reason,
              "lafma.promoted_at": now, "lafma.previous_champion": str(prev.version) if prev else ""}
    for k, v in record.items():
        client.set_model_version_tag(MODEL_NAME, version, k, v)
    history = json.loads(client.get_registered_model(MODEL_NAME).tags.get("lafma.champion_history", "[]"))
    history = (history + [{"version": version, "by": record["lafma.promoted_by"], "at": now, "reason": reason}])[-50:]
    client.set_registered_model_tag(MODEL_NAME, "lafma.champion_history", json.dumps(history))
    return str(prev.version) if prev else None


def rollback(*, root: str, reason: str, by: str | None = None) -> str:
    """Move ``champion`` back to the version it replaced; returns that version."""
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    champ = _alias_version(client, CHAMPION)
    if champ is None:
        raise ValueError("there is no champion to roll back")
    prev = champ.tags.get("lafma.previous_champion")
    if not prev:
        raise ValueError(f"champion v{champ.version} replaced no earlier version; nothing to roll back to")
    promote(prev, root=root, reason=f"rollback from v{champ.version}: {reason}", by=by)
    return str(prev)


def _bundle_artifact(uri: str, *, root: str) -> str:
    """Where the bundle lies inside the logged model ``uri`` (e.g. ``<uri>/artifacts/bundle``),
    read from its ``MLmodel`` file alone."""
    from mlflow.models import Model

    tracking.configure(root)
    return f"{uri.rstrip('/')}/" + Model.load(uri).flavors["python_function"]["artifacts"]["bundle"]["path"]


def download_bundle(uri: str, *, root: str, dst: str) -> str:
    """The bundle of the logged model ``uri`` (``models:/…``, ``runs:/…``) as a directory under ``dst``."""
    return mlflow.artifacts.download_artifacts(artifact_uri=_bundle_artifact(uri, root=root), dst_path=dst)


def bundle_manifest(uri: str, *, root: str) -> dict:
    """The bundle manifest (``lafma.json``) of a logged model (``models:/…``, ``runs:/…`` or a
    downloaded pyfunc directory) without loading it: only the model's ``MLmodel`` file (where
    the bundle lies inside the model) and that one file are downloaded."""
    from lafma.bundle import MANIFEST, read_bundle_manifest

    if os.path.isfile(os.path.join(uri, MANIFEST)):  # a bare bundle directory: read in place
        return read_bundle_manifest(uri)
    bundle = _bundle_artifact(uri, root=root)
    with tempfile.TemporaryDirectory(prefix="lafma-manifest-") as tmp:
        file = mlflow.artifacts.download_artifacts(artifact_uri=f"{bundle}/{MANIFEST}", dst_path=tmp)
        return read_bundle_manifest(os.path.dirname(file))


def load_pipeline(uri: str, *, root: str, device: str | None = None):
    """The :class:`~lafma.pipeline.LafmaPipeline` behind ``uri``: a registry URI
    (``models:/lafma@champion``, ``models:/lafma/3``, ``runs:/<id>/model``), a downloaded pyfunc
    directory, or a bare bundle directory (no MLflow needed)."""
    from lafma.bundle import MANIFEST, load_bundle

    if os.path.isfile(os.path.join(uri, MANIFEST)):
        import torch

        return load_bundle(uri, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if os.path.isdir(uri) or "://" in uri or uri.startswith("models:/"):
        tracking.configure(root)
        return mlflow.pyfunc.load_model(uri).unwrap_python_model().pipe
    raise FileNotFoundError(f"no model at {uri!r}: expected models:/..., runs:/... or a bundle directory")
