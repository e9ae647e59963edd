"""The text-audio scorer best-of-N generation ranks by: its folder, where a model finds it, and
fitting one for an evaluation that ran before scorers were saved.

A scorer is a folder (local or ``s3://``)::

    projection.safetensors   the evaluation's fitted text-audio projection (projection scorers)
    scorer.json              written last: what it is and what it needs, with hashes

``scorer.json`` names the audio embedder (kind, name, the SHA-256 of its weights and where
they were read), and which caption embedding the projection expects: the generator's own
text encoder (its config), mean-pooled over real tokens. A CLAP scorer names the LAION-CLAP
checkpoint and tokenizer instead. Loading checks every hash, and refuses a scorer fitted on
another text encoder than the model's.

The ``evaluate`` stage writes one into ``<its output>/scorer`` and tags the model version it
evaluated with the folder's URI (:data:`SCORER_TAG`), so ``--model models:/lafma@champion
--candidates 4`` finds it; ``--scorer`` overrides. For an evaluation that ran before this,
``python pipelines/scoring.py fit --evaluate <its output> --out DIR`` fits the same projection
from the same inputs (same clips, embedder and seed) without touching the stage's output;
``python pipelines/scoring.py clap --checkpoint F --tokenizer DIR --out DIR`` makes a CLAP one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from pipelines.core import storage  # noqa: E402

SCORER_TAG = "lafma.scorer_uri"  # model-version tag: the URI of the scorer its evaluation fitted
SCORER_FILE, PROJECTION_FILE, FORMAT = "scorer.json", "projection.safetensors", 1
TEXT_POOLING = "mean over the real tokens of the generator's own text encoder"


class ScorerError(ValueError):
    """A scorer that cannot be used: missing, of another format, changed since it was written,
    or fitted for another text encoder than the model's."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_projection_scorer(out: str, *, projection, embedder, embedder_kind: str, embedder_weights: str,
                           text_config: dict, fitted_on: dict[str, Any], embedder_extra: dict | None = None) -> str:
    """Write a projection scorer to the folder ``out``; returns ``out``.

    Args:
        projection: the fitted :class:`~lafma.metrics.text_audio.TextAudioProjection`.
        embedder: the :class:`~lafma.metrics.embedders.AudioEmbedder` it was fitted on.
        embedder_kind, embedder_weights, embedder_extra: how to build that embedder again
            (:func:`lafma.metrics.embedders.build_embedder`'s kind, weight file and keywords).
        text_config: the text encoder's config (``lafma.config.TextConfig`` as a dict) whose
            mean-pooled caption embeddings it was fitted on.
        fitted_on: where its training pairs came from, recorded as they are.
    """
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in projection.state_dict().items()})
    storage.write_bytes(storage.join(out, PROJECTION_FILE), data)
    audio_dim, text_dim = projection.audio_proj.in_features, projection.text_proj.in_features
    meta = {"format": FORMAT, "kind": "projection",
            "projection": {"file": PROJECTION_FILE, "sha256": _sha256(data), "dim": projection.audio_proj.out_features,
                           "audio_dim": audio_dim, "text_dim": text_dim},
            "embedder": {"kind": embedder_kind, "name": embedder.name, "sha256": embedder.weights_sha256,
                         "weights": str(embedder_weights), "extra": embedder_extra or {}},
            "text": {"encoder": text_config, "pooling": TEXT_POOLING}, "fitted_on": fitted_on}
    storage.write_json(storage.join(out, SCORER_FILE), meta)  # last: a folder without it is no scorer
    return out


def save_clap_scorer(out: str, *, checkpoint: str, tokenizer: str) -> str:
    """Write a CLAP scorer to the folder ``out``: LAION-CLAP's checkpoint (local, hashed) and
    the local directory of its ``roberta-base`` tokenizer."""
    from lafma.metrics.embedders import sha256_file

    storage.write_json(storage.join(out, SCORER_FILE), {
        "format": FORMAT, "kind": "clap", "clap": {"checkpoint": os.path.abspath(checkpoint),
                                                   "sha256": sha256_file(checkpoint),
                                                   "tokenizer": os.path.abspath(tokenizer)}})
    return out


def read_meta(uri: str) -> tuple[dict, str]:
    """``(scorer.json, its digest)``; the digest (16 hex of its SHA-256) identifies the scorer
    in a batch job's plan."""
    file = storage.join(uri, SCORER_FILE)
    try:
        data = storage.read_bytes(file)
    except FileNotFoundError:
        raise ScorerError(f"no scorer at {uri}: {SCORER_FILE} is missing") from None
    try:
        meta = json.loads(data)
    except ValueError as e:
        raise ScorerError(f"{file} is not JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") not in ("projection", "clap"):
        raise ScorerError(f"{file}: not a scorer this version reads (format {FORMAT}, kind projection or clap)")
    return meta, _sha256(data)[:16]


def check_fits(meta: dict, text_config: dict | None, uri: str = "") -> None:
    """Raise :class:`ScorerError` when a projection scorer was fitted on captions of another
    text encoder than ``text_config`` (the model's): its text projection would read noise."""
    if meta["kind"] != "projection" or text_config is None:
        return
    fitted = meta["text"]["encoder"]
    if fitted != text_config:
        diff = sorted(k for k in {*fitted, *text_config} if fitted.get(k) != text_config.get(k))
        raise ScorerError(f"the scorer {uri} was fitted on captions of another text encoder than the model's "
                          f"(differs in {', '.join(diff)}): fit one for this model, or give another --scorer")


def default_weights_dir(root: str | None = None) -> str:
    """Where converted embedder weights are cached: ``<root>/weights`` for a local storage root
    (as the evaluate stage does), else ``~/.cache/lafma/weights``."""
    if root and not storage.is_remote(root):
        return os.path.join(root, "weights")
    return os.path.expanduser(os.path.join("~", ".cache", "lafma", "weights"))


def _embedder(spec: dict, weights_dir: str):
    from lafma.metrics.embedders import build_embedder
    from lafma.metrics.embedders.aisfx import ensure_aisfx_weights

    if spec["kind"] == "aisfx":  # its weights ship in the aisfx wheel: converted once, then cached
        os.makedirs(weights_dir, exist_ok=True)
        path = str(ensure_aisfx_weights(weights_dir))
    else:
        path = spec["weights"]
        if not os.path.isfile(path):
            raise ScorerError(f"the scorer's {spec['name']} embedder needs its weights at {path} (SHA-256 "
                              f"{spec['sha256'][:16]}...): not found on this machine")
    embedder = build_embedder(spec["kind"], path, **spec.get("extra", {}))
    if spec.get("sha256") and embedder.weights_sha256 != spec["sha256"]:
        raise ScorerError(f"the {spec['name']} weights at {path} have SHA-256 {embedder.weights_sha256[:16]}..., the "
                          f"scorer was fitted with {spec['sha256'][:16]}...: not the same embedder")
    return embedder.eval()


def load_scorer(uri: str, *, text_encoder, text_config: dict | None, weights_dir: str | None = None,
                device: str = "cpu"):
    """The :class:`~lafma.metrics.scoring.TextAudioScorer` in the folder ``uri``.

    Args:
        text_encoder: the model's (captions → embeddings, mask): a projection scorer embeds
            captions with it.
        text_config: the model's text-encoder config; a projection scorer fitted on another
            one is refused. None: not checked.
        weights_dir: where aisfx's converted weights are cached (:func:`default_weights_dir`).

    Raises:
        ScorerError: see :class:`ScorerError`.
    """
    import torch
    from safetensors.torch import load

    from lafma.metrics.scoring import ClapScorer, ProjectionScorer
    from lafma.metrics.text_audio import TextAudioProjection

    meta, _ = read_meta(uri)
    if meta["kind"] == "clap":
        from lafma.metrics.embedders import ClapModel, sha256_file

        spec = meta["clap"]
        for what in ("checkpoint", "tokenizer"):
            if not os.path.exists(spec[what]):
                raise ScorerError(f"the CLAP scorer {uri} needs its {what} at {spec[what]}: not found on this machine")
        if sha256_file(spec["checkpoint"]) != spec["sha256"]:
            raise ScorerError(f"{spec['checkpoint']} changed since the scorer {uri} was made (SHA-256 differs)")
        return ClapScorer(ClapModel(spec["checkpoint"], tokenizer=spec["tokenizer"])).to(device)
    check_fits(meta, text_config, uri)
    spec = meta["projection"]
    data = storage.read_bytes(storage.join(uri, spec["file"]))
    if _sha256(data) != spec["sha256"]:
        raise ScorerError(f"{storage.join(uri, spec['file'])} changed since the scorer was written (SHA-256 differs)")
    state = load(data)
    projection = TextAudioProjection(spec["audio_dim"], spec["text_dim"], spec["dim"])
    projection.load_state_dict(state)
    embedder = _embedder(meta["embedder"], weights_dir or default_weights_dir())
    with torch.no_grad():
        return ProjectionScorer(embedder.to(device), projection.eval().to(device), text_encoder)


def as_written(scorer):
    """``scorer``, scoring each clip as the 16-bit PCM wav it is written as (batch jobs,
    ``lafma generate``), not the float audio before it: a score recomputed from the file, as the
    evaluation scores its clips, is then the manifest's. (aisfx's log front end hears the
    quantisation noise of near-silent passages: on the demo model's held-out clips the float
    audio scores 0.161 where its wav files score 0.168.)"""
    from lafma.metrics.scoring import TextAudioScorer

    class AsWritten(TextAudioScorer):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.name = inner, inner.name

        def score(self, audio, sample_rate, captions):
            return self.inner.score(pcm16(audio, sample_rate), sample_rate, captions)

    return AsWritten(scorer)


def pcm16(audio, sample_rate: int):
    """(B, N) float audio → what reading it back from 16-bit PCM wav files gives (soundfile both ways)."""
    import io

    import numpy as np
    import soundfile as sf
    import torch

    out = []
    for wav in audio:
        sf.write(buf := io.BytesIO(), wav.clamp(-1, 1).cpu().numpy(), sample_rate, "PCM_16", format="WAV")
        buf.seek(0)
        out.append(sf.read(buf, dtype="float32")[0])
    return torch.from_numpy(np.stack(out))


def registered_scorer(model: str, *, root: str, tracking_uri: str | None = None) -> str | None:
    """The scorer URI the model version's evaluation recorded (:data:`SCORER_TAG`), or None for
    a version without one, a ``runs:/`` URI or a bundle directory."""
    import mlflow

    from pipelines.core import tracking
    from pipelines.generation import _REGISTRY_URI

    m = _REGISTRY_URI.match(model)
    if m is None or (m["alias"] is None and (m["ref"] is None or not m["ref"].isdigit())):
        return None
    client = mlflow.MlflowClient(tracking_uri or tracking.tracking_uri(root))
    mv = (client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
          else client.get_model_version(m["name"], m["ref"]))
    return mv.tags.get(SCORER_TAG) or None


def resolve_scorer(model: str, override: str | None, *, root: str, tracking_uri: str | None = None) -> str:
    """``override``, or the scorer the model's evaluation recorded.

    Raises:
        ScorerError: neither: the message says how to get one.
    """
    if override:
        return storage.absolute(override)
    found = registered_scorer(model, root=root, tracking_uri=tracking_uri)
    if found is None:
        raise ScorerError(f"best-of-N ranks candidates with a text-audio scorer, and {model} has none recorded (its "
                          f"version has no {SCORER_TAG} tag: the evaluate stage writes one): give --scorer DIR "
                          "(python pipelines/scoring.py fit --evaluate <evaluate output> --out DIR makes one)")
    return found


def tag_scorer(version: str, uri: str, *, root: str, model_name: str = "lafma") -> None:
    """Record on a model version where its scorer lies."""
    import mlflow

    from pipelines.core import tracking

    mlflow.MlflowClient(tracking.tracking_uri(root)).set_model_version_tag(model_name, version, SCORER_TAG, uri)


# ---- fitting one for an evaluation that ran before scorers were saved -------------------------


def fit_from_evaluation(evaluate_dir: str, out: str, *, root: str, seed: int = 0, embedder_kind: str = "aisfx",
                        embedder_weights: str = "", vggish_pca: str = "") -> dict:
    """Fit the projection an ``evaluate`` stage fitted, from its own inputs, into ``out``.

    The same training clips (the first ``TRAIN_CLIPS`` by id of the audio stage it read), the
    same embedder (its SHA-256 must match the one the stage recorded), the same caption
    embeddings (the text stage's) and seed give the same projection: its score of the stage's
    generated clips is the stage's ``eval/text_audio``, which is returned to compare.
    """
    import numpy as np
    import torch

    from lafma.metrics import fit_text_audio_projection
    from pipelines.config import EvaluateConfig, PipelineConfig
    from pipelines.stages import evaluate as ev

    marker = storage.read_json(storage.join(evaluate_dir, "_SUCCESS.json"))
    inputs = marker["inputs"]
    e = EvaluateConfig(embedder=embedder_kind, embedder_weights=embedder_weights, vggish_pca=vggish_pca, seed=seed)
    embedder = ev.evaluation_embedder(PipelineConfig(evaluate=e), root)
    if embedder.describe()["embedder_sha256"] != marker["embedder"]["embedder_sha256"]:
        raise ScorerError(f"{embedder.name} ({embedder.weights_sha256[:16]}...) is not the embedder {evaluate_dir} "
                          f"used ({marker['embedder']['embedder']}, {marker['embedder']['embedder_sha256'][:16]}...)")
    train = ev.load_clips(inputs["audio"], ("train",), ev.TRAIN_CLIPS)
    captions = [c["caption"] for c in train]
    cfg = bundle_config(inputs["package"])
    sr = cfg["mel"]["sample_rate"]
    audio = ev.embed(embedder, [c["waveform"] for c in train], sr).clips
    text = ev.caption_embeddings(inputs["text"], captions)
    projection = fit_text_audio_projection(torch.from_numpy(audio), torch.as_tensor(text), keys=captions, seed=seed)
    weights = embedder_weights or str(default_weights_dir(root))
    save_projection_scorer(out, projection=projection, embedder=embedder, embedder_kind=embedder_kind,
                           embedder_weights=weights, text_config=cfg["text"],
                           embedder_extra={"pca_params": vggish_pca} if embedder_kind == "vggish" else None,
                           fitted_on={"evaluate": evaluate_dir, "audio": inputs["audio"], "text": inputs["text"],
                                      "train_clips": len(train), "seed": seed})
    # Check: the stage's own generated held-out clips, scored again.
    metrics = storage.read_json(storage.join(evaluate_dir, "metrics.json"))
    generated = storage.read_parquet_file(storage.join(evaluate_dir, "generated", "manifest.parquet")).to_pylist()
    by_id = {r["id"]: r for r in generated}
    held = [by_id[i] for i in metrics["ids"]]
    import io

    import soundfile as sf

    waves = [sf.read(io.BytesIO(storage.read_bytes(storage.join(evaluate_dir, "generated", r["path"]))),
                     dtype="float32")[0] for r in held]
    held_text = ev.caption_embeddings(inputs["text"], [r["caption"] for r in held])
    gen = ev.embed(embedder, waves, sr).clips
    score = float(projection.score(torch.from_numpy(gen), torch.as_tensor(held_text)).mean())
    return {"scorer": out, "text_audio": score, "stage_text_audio": marker["metrics"].get("eval/text_audio", np.nan)}


def bundle_config(package_dir: str) -> dict:
    """The config (every section) of the bundle a finished package stage wrote."""
    from lafma.bundle import MANIFEST

    bundle = storage.read_json(storage.join(package_dir, "_SUCCESS.json"))["bundle"]
    return storage.read_json(storage.join(bundle, MANIFEST))["config"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit an evaluate stage's projection scorer again, from its own inputs")
    f.add_argument("--evaluate", required=True, help="the evaluate stage's output folder")
    f.add_argument("--out", required=True, help="the scorer folder to write (not inside the stage's output)")
    f.add_argument("--root", required=True, help="the storage root (for the embedder's cached weights)")
    f.add_argument("--seed", type=int, default=0, help="evaluate.seed of that run (default 0)")
    f.add_argument("--embedder", default="aisfx", help="evaluate.embedder of that run (default aisfx)")
    f.add_argument("--embedder-weights", default="", help="evaluate.embedder_weights of that run")
    f.add_argument("--vggish-pca", default="", help="evaluate.vggish_pca of that run")
    c = sub.add_parser("clap", help="a scorer from LAION-CLAP's checkpoint and tokenizer")
    c.add_argument("--checkpoint", required=True, help="e.g. 630k-audioset-best.pt (non-fusion)")
    c.add_argument("--tokenizer", required=True, help="local directory of the roberta-base tokenizer")
    c.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.command == "clap":
        print(save_clap_scorer(storage.absolute(args.out), checkpoint=args.checkpoint, tokenizer=args.tokenizer))
        return 0
    evaluate_dir, out = storage.absolute(args.evaluate), storage.absolute(args.out)
    if out.rstrip("/").startswith(evaluate_dir.rstrip("/") + "/") or out == evaluate_dir:
        print("scoring: --out must lie outside the stage's output (a finished stage is not rewritten)",
              file=sys.stderr)
        return 2
    result = fit_from_evaluation(evaluate_dir, out, root=storage.absolute(args.root), seed=args.seed,
                                 embedder_kind=args.embedder, embedder_weights=args.embedder_weights,
                                 vggish_pca=args.vggish_pca)
    print(f"scorer {result['scorer']}: text-audio of the stage's generated clips {result['text_audio']:.6f} "
          f"(the stage logged {result['stage_text_audio']:.6f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
