"""The model registry: one registered MLflow model, ``lafma``, whose versions are bundles.

A version is a pyfunc around a :mod:`lafma.bundle` directory (the LFM, VAE and vocoder as
safetensors, every component's config, the text encoder or its reference, the mel hash).
It is logged as *models from code* (:mod:`pipelines.lafma_pyfunc`, running
:class:`pipelines.serving.LafmaModel`) for ``mlflow models serve``;
the project's own loads (:func:`load_pipeline`) never run it: they fetch the bundle's files
and check their hashes.

Aliases, not stages (MLflow 3): every new version becomes ``candidate``; ``champion`` moves
only through :func:`gate` (the candidate's gate metric must beat the champion's) or by hand
through :func:`promote` / :func:`rollback`, which record who and why as version tags. Every
promotion is pushed onto a champion stack (a registered-model tag) that rollback pops, so
rolling back twice goes two versions back; an append-only log beside it keeps every move.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import mlflow
import pandas as pd

from pipelines.core import tracking

# The pyfunc and how it generates a request's rows live in pipelines/serving.py; they are
# named here too because versions logged before the move load them from this module.
from pipelines.serving import INPUT_COLUMNS, PREDICT_BATCH, LafmaModel, generate_frame, signature  # noqa: F401

MODEL_NAME = "lafma"
CANDIDATE, CHAMPION = "candidate", "champion"
PYFUNC_CODE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lafma_pyfunc.py")
# Version tags. The gate metric travels with the version so any two versions can be compared.
GATE_METRIC_TAG, GATE_VALUE_TAG, GATE_MODE_TAG = "lafma.gate.metric", "lafma.gate.value", "lafma.gate.mode"
# The SHA-256 of the version's bundle manifest, kept in the registry (its database), not beside
# the files: the manifest holds every file's hash, so the artifact store alone cannot change a
# registered model without the load noticing.
MANIFEST_TAG = "lafma.bundle_manifest_sha256"


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
    from lafma.bundle import MANIFEST, file_sha256

    version = str(info.registered_model_version)
    mark_candidate(version, root=root, gate_metric=gate_metric, gate_value=gate_value,
                   lower_is_better=lower_is_better, tags={**(tags or {}), "lafma.run_id": run_id,
                                                          MANIFEST_TAG: file_sha256(os.path.join(bundle_dir, MANIFEST))})
    return Registered(version, f"models:/{MODEL_NAME}/{version}")


def gate_tags(metric: str, value: float, lower_is_better: bool = True) -> dict[str, str]:
    """The version tags that carry a gate metric (what :func:`gate` compares)."""
    return {GATE_METRIC_TAG: metric, GATE_VALUE_TAG: repr(float(value)),
            GATE_MODE_TAG: "min" if lower_is_better else "max"}


def mark_candidate(version: str, *, root: str, gate_metric: str, gate_value: float, lower_is_better: bool = True,
                   tags: Mapping[str, Any] | None = None) -> None:
    """Tag an existing version of ``lafma`` with ``tags`` and its gate metric, and point
    ``candidate`` at it (the last step of :func:`register`)."""
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    for k, v in {**(tags or {}), **gate_tags(gate_metric, gate_value, lower_is_better)}.items():
        client.set_model_version_tag(MODEL_NAME, version, k, str(v))
    client.set_registered_model_alias(MODEL_NAME, CANDIDATE, version)


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
    for k, v in gate_tags(metric, value, lower_is_better).items():
        client.set_model_version_tag(MODEL_NAME, version, k, v)


def _alias_version(client, alias: str):
    """The version ``alias`` points at, or None when no version holds it (or ``lafma`` does not
    exist). Any other error (a server that cannot be reached) propagates: "no champion" must
    never be a guess, or the gate would promote anything."""
    try:
        model = client.get_registered_model(MODEL_NAME)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(alias)
    return client.get_model_version(MODEL_NAME, str(version)) if version is not None else None


# ---- the gate ------------------------------------------------------------------------------

GATE_MODES = ("min", "max")  # "min": lower is better (e.g. FD); "max": higher is better
# What the gate did, for machines (the reason says it for people). "no champion yet" is
# "promoted": the first measured version always becomes champion.
Outcome = Literal["promoted", "kept", "not_comparable", "already_champion", "nan"]


@dataclass(frozen=True)
class Decision:
    """What :func:`gate` decided about one version.

    Attributes:
        outcome: ``"promoted"`` (it beat the champion, the champion had no value, or there was
            none), ``"kept"`` (it did not beat the champion; a tie keeps the champion),
            ``"not_comparable"`` (gated on another metric or direction), ``"already_champion"``,
            ``"nan"`` (the candidate has no finite gate value).
        reason: the same decision in words, with the numbers compared.
        candidate: the version gated.
        champion: the champion before the decision, or None.
    """

    outcome: Outcome
    reason: str
    candidate: str
    champion: str | None

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"


@dataclass(frozen=True)
class _Gate:
    metric: str | None
    value: float  # NaN when missing, unreadable or not finite: nothing to compare
    mode: str | None
    text: str  # the tag as stored, for the reason


def _gate_of(version) -> _Gate:
    text = version.tags.get(GATE_VALUE_TAG, "nan")
    try:
        value = float(text)
    except ValueError:  # a tag edited by hand
        value = math.nan
    # An infinite FD (a diverged evaluation) is no measurement either; as a "max" score it
    # would beat everything forever.
    return _Gate(version.tags.get(GATE_METRIC_TAG), value if math.isfinite(value) else math.nan,
                 version.tags.get(GATE_MODE_TAG), text)


def _pair(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` to 6 significant digits, or in full where those would look equal."""
    short = f"{a:.6g}", f"{b:.6g}"
    return short if short[0] != short[1] or a == b else (repr(a), repr(b))


def _judge(cand, champ) -> tuple[Outcome, str]:
    """The gate's verdict on model version ``cand`` against the champion version ``champ``."""
    c = _gate_of(cand)
    if champ is not None and str(champ.version) == str(cand.version):
        return "already_champion", f"version {cand.version} is already the champion"
    if math.isnan(c.value):
        return "nan", (f"version {cand.version} has no {c.metric or 'gate'} value ({c.text}; imported, not "
                       "evaluated or diverged): evaluate it, or promote by hand (pipelines/promote.py)")
    if c.mode not in GATE_MODES:
        return "not_comparable", (f"version {cand.version} has gate mode {c.mode!r}, not one of {GATE_MODES}: "
                                  "nothing says which direction is better")
    if champ is None:
        return "promoted", f"no champion yet; {c.metric} = {c.value:.6g}"
    h = _gate_of(champ)
    if math.isnan(h.value):
        # An imported (or never evaluated) champion promoted by hand cannot stay against a
        # measured candidate: keeping it would mean "no number beats no number".
        return "promoted", (f"champion v{champ.version} has no gate value ({h.text}), so it does not stay "
                            f"against a measured candidate; {c.metric} = {c.value:.6g}")
    if (h.metric, h.mode) != (c.metric, c.mode):
        return "not_comparable", (f"champion v{champ.version} is gated on {h.metric!r} ({h.mode}), candidate on "
                                  f"{c.metric!r} ({c.mode}): not comparable; promote by hand "
                                  "(pipelines/promote.py) if intended")
    better = c.value < h.value if c.mode == "min" else c.value > h.value  # a tie keeps the champion
    mine, theirs = _pair(c.value, h.value)
    verb = "beats" if better else ("ties" if c.value == h.value else "does not beat")
    return ("promoted" if better else "kept"), (
        f"{c.metric}: candidate {mine} {verb} champion v{champ.version} {theirs} "
        f"({'lower' if c.mode == 'min' else 'higher'} is better{'; a tie keeps the champion' if verb == 'ties' else ''})")


def gate(*, root: str, version: str | None = None) -> Decision:
    """Move ``champion`` to ``version`` (default: the ``candidate``) only if its gate metric beats
    the current champion's (:class:`Decision` lists every outcome). A version without a finite
    value is never promoted; a champion without one is replaced by any measured candidate.

    Raises:
        ValueError: no ``version`` given and no ``candidate`` alias.
    """
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    cand = client.get_model_version(MODEL_NAME, version) if version else _alias_version(client, CANDIDATE)
    if cand is None:
        raise ValueError(f"no {CANDIDATE!r} version of {MODEL_NAME!r} to gate")
    champ = _alias_version(client, CHAMPION)
    outcome, why = _judge(cand, champ)
    if outcome == "promoted":
        promote(str(cand.version), root=root, reason=f"gate: {why}", by="gate")
    return Decision(outcome, why, str(cand.version), str(champ.version) if champ else None)


# ---- champion history: a stack to replay, a log to read -------------------------------------

# Registered-model tags. The stack lists the champions that each replaced the one before it,
# oldest first; its top is the champion, and rollback pops it. The log is every move ever made.
STACK_TAG, HISTORY_TAG = "lafma.champion_stack", "lafma.champion_history"
# MLflow's SQL stores hold a registered-model tag in VARCHAR(5000) (sqlite ignores the length,
# PostgreSQL and MySQL refuse more): both lists drop their oldest entries to fit.
_MODEL_TAG_CHARS = 5000
_LOG_REASON_CHARS = 300  # the full reason is on the version's own tags


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _read_list(client, key: str) -> list:
    text = client.get_registered_model(MODEL_NAME).tags.get(key, "[]")
    try:
        entries = json.loads(text)
    except json.JSONDecodeError:
        entries = None
    if not isinstance(entries, list):
        raise ValueError(f"registered-model tag {key!r} of {MODEL_NAME!r} is not a JSON list ({text[:80]!r}): "
                         "fix or delete it in the MLflow UI")
    return entries


def _write_list(client, key: str, entries: list) -> None:
    while len(text := json.dumps(entries)) > _MODEL_TAG_CHARS:
        entries = entries[1:]
    client.set_registered_model_tag(MODEL_NAME, key, text)


def _log(client, entry: dict) -> None:
    """Append ``entry`` (action, version, from, by, at, reason) to the champion log."""
    reason = entry["reason"]
    entry = {**entry, "reason": reason if len(reason) <= _LOG_REASON_CHARS else reason[:_LOG_REASON_CHARS - 1] + "…"}
    _write_list(client, HISTORY_TAG, _read_list(client, HISTORY_TAG) + [entry])


def _replayable(stack: list[str], champion: str | None) -> list[str]:
    """The part of ``stack`` that leads to ``champion``: the alias is the truth, the stack only
    its record. If the alias was moved by hand (the MLflow UI) to a version lower on the stack,
    that was a rollback, and the stack is cut there; to a version not on it, nothing is known
    of what it replaced, and the stack starts again from it; removed, there is no champion to
    return to, and the next promotion starts a new stack."""
    if champion is None:
        return []
    if champion not in stack:
        return [champion]
    top = len(stack) - 1 - stack[::-1].index(champion)
    return stack[: top + 1]


def champion_stack(*, root: str) -> list[str]:
    """The versions :func:`rollback` would replay, oldest first; the last is the champion."""
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    champ = _alias_version(client, CHAMPION)
    return _replayable(_read_list(client, STACK_TAG), str(champ.version)) if champ else []


def _tag_version(client, version: str, tags: Mapping[str, str]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(MODEL_NAME, version, k, v)


def verified_identity(root: str) -> dict[str, str]:
    """Who is moving the alias, as far as this process can tell without trusting ``--by``: the
    OS account and host running it and, against a tracking server (whose basic-auth checked
    them), the MLflow user. ``--by`` is what the person declared; these are recorded beside it."""
    import socket

    who = {"os": f"{getpass.getuser()}@{socket.gethostname()}"}
    if tracking.tracking_uri(root).startswith(("http://", "https://")) and os.environ.get("MLFLOW_TRACKING_USERNAME"):
        who["mlflow"] = os.environ["MLFLOW_TRACKING_USERNAME"]
    return who


def promote(version: str, *, root: str, reason: str, by: str | None = None) -> str | None:
    """Point ``champion`` at ``version`` and push it onto the champion stack; record who, why,
    when and the previous champion as tags of the version, and in the champion log.

    Returns:
        The previous champion's version, or None.

    Raises:
        MlflowException: ``version`` does not exist.
        ValueError: ``version`` is already the champion.
    """
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    version = str(client.get_model_version(MODEL_NAME, version).version)  # raises if it does not exist
    prev = _alias_version(client, CHAMPION)
    prev_v = str(prev.version) if prev else None
    if prev_v == version:
        raise ValueError(f"version {version} is already the champion")
    # The stack first: if moving the alias then fails, the stack's top is not the alias, and
    # _replayable cuts it back to the truth on the next move.
    _write_list(client, STACK_TAG, _replayable(_read_list(client, STACK_TAG), prev_v) + [version])
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    who, now, seen = by or getpass.getuser(), _now(), verified_identity(root)
    _tag_version(client, version, {"lafma.promoted_by": who, "lafma.promoted_reason": reason,
                                   "lafma.promoted_at": now, "lafma.previous_champion": prev_v or "",
                                   **{f"lafma.promoted_by_{k}": v for k, v in seen.items()}})
    _log(client, {"action": "promote", "version": version, "from": prev_v, "by": who, "verified": seen, "at": now,
                  "reason": reason})
    return prev_v


def _nothing_below(champion: str, recorded: list[str]) -> str:
    if champion in recorded:
        return f"champion v{champion} replaced no earlier version; nothing to roll back to"
    return (f"champion v{champion} is not on the champion stack {recorded} (its alias was moved outside "
            "pipelines/promote.py and the gate, e.g. in the MLflow UI, or before the stack was kept), so what it "
            "replaced is unknown; nothing to roll back to: promote the version you want with --version")


def rollback(*, root: str, reason: str, by: str | None = None) -> str:
    """Pop the champion off the champion stack and give ``champion`` back to the version below.

    The version returned to keeps its promotion tags; the rollback is recorded beside them
    (``lafma.rolled_back_from``, ``_by``, ``_reason``, ``_at``) and in the champion log. Rolling
    back again goes one further down, until the stack's bottom.

    Returns:
        The version that is champion now.

    Raises:
        ValueError: no champion, nothing below it on the stack, or that version was deleted.
    """
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    champ = _alias_version(client, CHAMPION)
    if champ is None:
        raise ValueError("there is no champion to roll back")
    champ_v, recorded = str(champ.version), _read_list(client, STACK_TAG)
    stack = _replayable(recorded, champ_v)
    if len(stack) < 2:
        raise ValueError(_nothing_below(champ_v, recorded))
    target = stack[-2]
    try:
        client.get_model_version(MODEL_NAME, target)
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"cannot roll back from v{champ_v}: v{target}, below it on the champion stack, "
                         f"no longer exists ({e.message})") from e
    _write_list(client, STACK_TAG, stack[:-1])
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, target)
    who, now, seen = by or getpass.getuser(), _now(), verified_identity(root)
    _tag_version(client, target, {"lafma.rolled_back_from": champ_v, "lafma.rolled_back_by": who,
                                  "lafma.rolled_back_reason": reason, "lafma.rolled_back_at": now,
                                  **{f"lafma.rolled_back_by_{k}": v for k, v in seen.items()}})
    _log(client, {"action": "rollback", "version": target, "from": champ_v, "by": who, "verified": seen, "at": now,
                  "reason": reason})
    return target


def _bundle_artifact(uri: str, *, root: str, tracking_uri: str | None = None) -> str:
    """Where the bundle lies inside the logged model ``uri`` (e.g. ``<uri>/artifacts/bundle``),
    read from its ``MLmodel`` file alone."""
    from mlflow.models import Model

    tracking.configure(root, uri=tracking_uri)
    return f"{uri.rstrip('/')}/" + Model.load(uri).flavors["python_function"]["artifacts"]["bundle"]["path"]


def download_bundle(uri: str, *, root: str, dst: str, tracking_uri: str | None = None) -> str:
    """The bundle of the logged model ``uri`` (``models:/…``, ``runs:/…``) as a directory under ``dst``."""
    return mlflow.artifacts.download_artifacts(artifact_uri=_bundle_artifact(uri, root=root, tracking_uri=tracking_uri),
                                               dst_path=dst)


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


_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")


def _check_registered_manifest(uri: str, bundle: str, *, root: str, tracking_uri: str | None = None) -> None:
    """Raise :class:`~lafma.bundle.BundleError` if ``bundle``, downloaded for the registry
    version ``uri`` names, has another manifest than the one registered (:data:`MANIFEST_TAG`).
    Versions registered before the tag was kept, and ``runs:/`` URIs, have only the manifest's
    own per-file hashes."""
    from lafma.bundle import MANIFEST, BundleError, file_sha256

    m = _VERSION_URI.match(uri)
    if m is None:
        return
    client = mlflow.MlflowClient(tracking_uri or tracking.tracking_uri(root))
    mv = (client.get_model_version(m["name"], m["version"]) if m["version"]
          else client.get_model_version_by_alias(m["name"], m["alias"]))
    want = mv.tags.get(MANIFEST_TAG)
    if want and (found := file_sha256(os.path.join(bundle, MANIFEST))) != want:
        raise BundleError(f"{uri} (v{mv.version}): its bundle's {MANIFEST} has SHA-256 {found[:16]}…, the registry "
                          f"recorded {want[:16]}… when it was registered; refusing a model changed in the artifact store")


def load_pipeline(uri: str, *, root: str, device: str | None = None, tracking_uri: str | None = None):
    """The :class:`~lafma.pipeline.LafmaPipeline` behind ``uri``: a registry URI
    (``models:/lafma@champion``, ``models:/lafma/3``, ``runs:/<id>/model``), a downloaded pyfunc
    directory, or a bare bundle directory (no MLflow needed).

    No code from the artifact store runs: only the model's ``MLmodel`` file (YAML, for where
    the bundle lies) and the bundle's own files (safetensors, JSON, a tokenizer) are fetched,
    and :func:`lafma.bundle.load_bundle` checks each against the SHA-256 its manifest records.
    The pyfunc (``lafma_pyfunc.py``) is for ``mlflow models serve``, not for these loads.
    """
    import torch

    from lafma.bundle import MANIFEST, load_bundle

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if os.path.isfile(os.path.join(uri, MANIFEST)):
        return load_bundle(uri, device=device)
    if os.path.isdir(uri) or "://" in uri or uri.startswith("models:/"):
        tracking.configure(root, uri=tracking_uri)
        if os.path.isdir(uri):  # a downloaded pyfunc: its bundle is already here
            return load_bundle(_bundle_artifact(uri, root=root, tracking_uri=tracking_uri), device=device)
        with tempfile.TemporaryDirectory(prefix="lafma-bundle-") as tmp:
            bundle = download_bundle(uri, root=root, dst=tmp, tracking_uri=tracking_uri)
            _check_registered_manifest(uri, bundle, root=root, tracking_uri=tracking_uri)
            # Every weight is in memory once load_bundle returns; the copy can go.
            return load_bundle(bundle, device=device)
    raise FileNotFoundError(f"no model at {uri!r}: expected models:/..., runs:/... or a bundle directory")
