"""The registered model's pyfunc: what ``mlflow models serve`` runs for a ``lafma`` version.

Input: a table with ``caption`` and optional ``seed``, ``steps``, ``guidance``, ``solver``,
``duration``, ``candidates`` per row, and to start from a clip ``audio_b64`` (base64 of a wav /
flac / ogg file) with ``start`` and ``end`` (seconds to regenerate) or ``strength``
(audio-to-audio). A path or URI in an ``audio`` column is read only under the schemes the
server's operator allows (``$LAFMA_SERVE_AUDIO_SCHEMES``; none by default: a client must not
make the server read its own files). Output: the same rows with ``audio`` (float32),
``sample_rate`` and ``nfe``; rows from a clip add ``start``, ``end``, ``strength`` and
``audio_sha256``; best-of-N rows add ``candidates`` (JSON: each candidate's seed and score),
``kept`` and ``score``, and ``seed`` is the kept clip's.

Rows are checked exactly as batch generation checks them (:func:`lafma.data.captions.plan_generation`),
clips are read and decoded by the same code (:mod:`pipelines.row_generation`) under the served
limits (:mod:`pipelines.core.limits`), and a request with any row that cannot be generated
raises ``ValueError`` (a 400 from the server) naming each such row and why, and generates
nothing.
"""

from __future__ import annotations

import os
import sys

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from lafma.data.captions import plan_generation
from pipelines.core.limits import ClipLimits, decode_b64_clip, served_clip_limits

INPUT_COLUMNS = {"caption": "string", "seed": "long", "steps": "long", "guidance": "double", "solver": "string",
                 "duration": "double", "candidates": "long", "audio_b64": "string", "audio": "string",
                 "start": "double", "end": "double", "strength": "double"}
# Clips per pipeline call in ``predict``: batch generation's default (GenerationSettings),
# so one large request holds no more in memory than one shard of a batch job.
PREDICT_BATCH = 8
# The scorer folder best-of-N requests rank with; without it, the one the served version's
# evaluation recorded (its ``lafma.scorer_uri`` tag, found through the tracking server).
SCORER_ENV = "LAFMA_SCORER"
_B64_REF = "audio_b64:"  # what a row's ``audio`` becomes when its clip came in the request


def _given(v) -> bool:
    return not (v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) or (isinstance(v, str) and v == ""))


class LafmaModel(mlflow.pyfunc.PythonModel):
    """The pyfunc (see the module docstring)."""

    def load_context(self, context) -> None:
        import torch

        from lafma.bundle import load_bundle, read_bundle_manifest

        device = "cuda" if torch.cuda.is_available() else "cpu"
        bundle = context.artifacts["bundle"]
        self.pipe = load_bundle(bundle, device=device)
        self.text_config = read_bundle_manifest(bundle)["config"]["text"]
        self.scorer_uri = os.environ.get(SCORER_ENV) or _recorded_scorer(bundle)
        self._scorer = None
        _warn_if_signature_drops_columns(bundle)

    def scorer(self):
        """The scorer, loaded on the first best-of-N request.

        Raises:
            ValueError: the served model has none.
        """
        if self._scorer is None:
            if not self.scorer_uri:
                raise ValueError(f"candidates: this served model has no text-audio scorer to rank candidates with "
                                 f"(its version records none); start the server with {SCORER_ENV}=<scorer folder>")
            from pipelines.scoring import load_scorer

            self._scorer = load_scorer(self.scorer_uri, text_encoder=self.pipe.text_encoder,
                                       text_config=self.text_config, device=str(self.pipe.device))
        return self._scorer

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from pipelines.core.limits import check_request

        check_request(model_input)  # rows, steps, duration, candidates, clips: a 400 before any work
        frame = pd.DataFrame(model_input)
        try:
            best_of = "candidates" in frame.columns and any(_given(n) and float(n) > 1 for n in frame["candidates"])
            return generate_frame(self.pipe, frame, scorer=self.scorer() if best_of else None)
        except ValueError as e:  # rows batch generation would reject (no caption, an unknown solver, ...)
            # An MlflowException keeps its message in the server's answer (400); any other
            # exception becomes a generic "unexpected error" there.
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from e


def _warn_if_signature_drops_columns(bundle: str) -> None:
    """Say so at start-up when the version's signature predates some of :data:`INPUT_COLUMNS`:
    MLflow drops a request's columns that the signature does not name before ``predict`` sees
    them (a ``strength`` would be lost without a word), so such a version serves captions only."""
    try:
        from mlflow.models import Model

        signature = Model.load(os.path.dirname(os.path.dirname(os.path.abspath(bundle)))).signature
        names = set(signature.inputs.input_names()) if signature is not None else set(INPUT_COLUMNS)
    except Exception:  # noqa: BLE001 — a warning, never a failed load
        return
    if missing := [c for c in INPUT_COLUMNS if c not in names]:
        print(f"[lafma] this version's signature lacks {', '.join(missing)}: MLflow drops those columns from "
              "requests before the model sees them; register the bundle again to serve them", file=sys.stderr)


def _recorded_scorer(bundle: str) -> str | None:
    """The scorer URI recorded on the registered version this model directory was logged as
    (found by its run id), or None: no tracking store to ask, or no version records one."""
    try:
        from mlflow.models import Model

        from pipelines.scoring import SCORER_TAG

        model_dir = os.path.dirname(os.path.dirname(os.path.abspath(bundle)))  # <model>/artifacts/bundle
        run_id = Model.load(model_dir).run_id
        if not run_id:
            return None
        versions = mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
        found = {v.tags[SCORER_TAG] for v in versions if v.tags.get(SCORER_TAG)}
        return found.pop() if len(found) == 1 else None
    except Exception as e:  # noqa: BLE001 — serving plain requests must not depend on the registry
        print(f"[lafma] no recorded scorer found ({type(e).__name__}: {e}); best-of-N needs {SCORER_ENV}",
              file=sys.stderr)
        return None


def _plan(pipe, frame: pd.DataFrame, clip_limits: ClipLimits):
    """Rows planned as batch generation plans them, and the bytes of clips the request carries.

    Raises:
        ValueError: rows batch generation would reject, named with their reasons.
    """
    d = pipe.defaults
    records = frame.to_dict("records")
    carried: dict[str, bytes] = {}
    for i, r in enumerate(records):
        if not _given(r.get("seed")):
            r["seed"] = i  # a table always yields the same audio
        b64 = r.pop("audio_b64", None)
        if _given(b64):
            if _given(r.get("audio")):
                raise ValueError(f"row {i} has both audio and audio_b64; give one")
            r["audio"] = f"{_B64_REF}{i}"  # a reference to the bytes, which never pass for a path
            try:
                carried[r["audio"]] = decode_b64_clip(b64, i, clip_limits.max_bytes)
            except MlflowException as e:
                raise ValueError(e.message) from None
    rows, rejects = plan_generation(records, job_seed=0, steps=d["steps"], guidance=d["guidance"],
                                    solver=d["solver"], duration=d["duration"], max_duration=pipe.max_duration)
    if rejects:
        raise ValueError(f"{len(rejects)} of {len(records)} rows cannot be generated: " + "; ".join(
            f"{r['id']}: {r['reason']}" + (f" ({r['detail']})" if r["detail"] else "") for r in rejects))
    return rows, carried


def generate_frame(pipe, frame: pd.DataFrame, batch_size: int = PREDICT_BATCH, *, scorer=None,
                   clip_limits: ClipLimits | None = None) -> pd.DataFrame:
    """Generate every row of ``frame`` (see the module docstring); rows sharing settings are batched.

    Rows are planned by :func:`lafma.data.captions.plan_generation`, with the pipeline's
    defaults for what a row leaves out. A row without a seed gets its position (0, 1, ...), so
    a table always yields the same audio.

    Args:
        scorer: ranks best-of-N candidates; needed for rows with ``candidates`` above 1.
        clip_limits: what an input clip may be (:func:`~pipelines.core.limits.served_clip_limits`).

    Raises:
        ValueError: no ``caption`` column, or rows that batch generation would reject (the
            message names each, ``row-000002``: the second row, or its ``id``, with its
            reason), a clip that cannot be read, or best-of-N without a scorer.
    """
    from pipelines.row_generation import RowRejected, generate_rows, load_clip, read_clip_bytes

    if "caption" not in frame.columns:
        raise ValueError(f"the input needs a 'caption' column; got {list(frame.columns)}")
    limits = clip_limits or served_clip_limits()
    rows, carried = _plan(pipe, frame, limits)
    clips, problems = {}, []
    for r in rows:
        if r.audio is None:
            continue
        try:
            data = carried[r.audio] if r.audio in carried else read_clip_bytes(r.audio, limits)
            clips[r.id] = load_clip(data, pipe.sample_rate, limits, name=r.id, seconds=r.duration)
        except RowRejected as e:
            problems.append(f"{r.id}: {e.reason}" + (f" ({e.detail})" if e.detail else ""))
    if problems:
        raise ValueError(f"{len(problems)} of {len(rows)} rows have an input clip that cannot be used: "
                         + "; ".join(problems))
    if scorer is None and any(r.candidates > 1 for r in rows):
        raise ValueError("candidates: best-of-N needs a text-audio scorer to rank candidates; none was given")
    results, refused = generate_rows(pipe, rows, clips, scorer=scorer, batch_size=batch_size)
    if refused:
        raise ValueError(f"{len(refused)} of {len(rows)} rows cannot be generated: "
                         + "; ".join(f"{e.row_id}: {e.reason} ({e.detail})" for e in refused))
    with_clips = any(r.audio is not None for r in rows)
    scored = any(res.pick.scores is not None or len(res.pick.seeds) > 1 for res in results)
    out = []
    for res in results:
        r, pick = res.row, res.pick
        row = {"caption": r.caption, "seed": pick.seed, "steps": r.steps, "guidance": r.guidance, "solver": r.solver,
               "duration": r.duration, "nfe": pick.nfe, "sample_rate": res.sample_rate,
               "audio": pick.audio.numpy().astype(np.float32)}
        if with_clips:
            row |= {"start": r.start, "end": r.end, "strength": r.strength, "audio_sha256": res.clip_sha256}
        if scored:
            from pipelines.generation import candidate_columns

            row |= candidate_columns(pick)
        out.append(row)
    return pd.DataFrame(out)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec(t, n, required=n == "caption") for n, t in INPUT_COLUMNS.items()]))
