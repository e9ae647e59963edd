"""Stages 7-9: package the trained components as one registered model, gate its promotion,
and generate the demo captions with it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import torch

from lafma.bundle import load_bundle, write_bundle
from lafma.config import LafmaConfig, from_dict, model_sections
from lafma.flow import OTPath, heldout_fm_loss
from lafma.text import pad_embeddings
from pipelines.core import registry, storage
from pipelines.core.stage import Stage, StageContext, read_marker
from pipelines.stages.train import trained_weights
from pipelines.train.data import unflatten
from pipelines.train.jobs import JOBS
from pipelines.train.lfm import LATENT_DIMS

# The package stage's gate metric: the held-out flow-matching loss (``train/fm_loss`` when the
# dataset has no held-out split). Evaluation replaces it with its own when it runs.
PACKAGE_GATE_METRIC = "heldout/fm_loss"
# Held-out items per forward pass of the gate. Part of the gate's definition, not a speed knob:
# the noise is seeded per batch (lafma.flow.heldout_fm_loss), so another size would score other
# problems and a new version could no longer be compared with the champion scored before it.
HELDOUT_BATCH = 16


def heldout_rows(latents_dir: str, n: int) -> tuple[pa.Table, str]:
    """Up to ``n`` rows of the held-out split (validation, else test), first by id."""
    from pipelines.train.data import parquet_columns

    columns = ["id", "split", "mean", *LATENT_DIMS, "emb", "length"]
    if "valid_frames" in parquet_columns(storage.list_files(latents_dir, ".parquet")[0]):
        columns.append("valid_frames")  # absent from tables written before padding was masked
    table = storage.read_parquet_dir(latents_dir, columns=columns)
    for split in ("validation", "test", "train"):
        part = table.filter(pc.equal(table.column("split"), split))
        if part.num_rows:
            return part.sort_by("id").slice(0, n), split
    raise ValueError(f"no latents under {latents_dir}")


def heldout_batches(rows: pa.Table, cfg: LafmaConfig,
                    device: torch.device) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The latents table's rows as :func:`~lafma.flow.heldout_fm_loss` batches of
    :data:`HELDOUT_BATCH`: ``(x1 (B, C, T, F), {"context": (B, L, D), "context_mask": (B, L)})``,
    each latent shaped by its row's own shape columns, each caption batch padded to its own
    longest caption, and ``"duration"`` (B,) the whole clip's seconds for a UNet conditioned on
    duration. ``cfg`` is the LFM's: its latent scale, context width and UNet."""
    records = rows.to_pylist()
    for start in range(0, len(records), HELDOUT_BATCH):
        part = records[start : start + HELDOUT_BATCH]
        x1 = unflatten([r["mean"] for r in part], *([r[c] for r in part] for c in LATENT_DIMS))  # (B, C, T, F)
        x1 = x1 * cfg.vae.scale_factor  # the posterior mean: no sampling noise in the score
        ctx, mask = pad_embeddings([r["emb"] for r in part], [r["length"] for r in part], cfg.context_dim)
        cond = {"context": ctx.to(device), "context_mask": mask.to(device)}
        if cfg.unet.duration_embedding:
            cond["duration"] = torch.full((x1.shape[0],), x1.shape[2] * cfg.latent_seconds, device=device)
        yield x1.to(device), cond


def heldout_frame_masks(rows: pa.Table) -> list[torch.Tensor] | None:
    """Per :func:`heldout_batches` batch, (B, T') True on the latent frames of real audio; None
    for a latents table without ``valid_frames`` (every frame real)."""
    if "valid_frames" not in rows.column_names:
        return None
    from lafma.train.objectives import valid_mask

    valid = rows.column("valid_frames").to_pylist()
    frames = rows.column("latent_frames").to_pylist()
    return [valid_mask(torch.as_tensor(valid[i : i + HELDOUT_BATCH]), frames[i]) for i in range(0, len(valid), HELDOUT_BATCH)]


def packaged_model_uri(package_marker: dict) -> str:
    """What to load for a finished package stage: its bundle directory on a local root (no
    registry round trip), else its registry URI (a bundle on s3:// is not a directory
    :func:`pipelines.core.registry.load_pipeline` can read in place)."""
    bundle = package_marker["bundle"]
    return bundle if not storage.is_remote(bundle) else package_marker["model_uri"]


class PackageStage(Stage):
    """Bundle the LFM, VAE and vocoder (mel hashes checked), score the gate metric, register
    the bundle as a new version of ``lafma`` with the ``candidate`` alias."""

    name = "package"
    needs = ("text", "latents", "train_vae", "train_vocoder", "train_lfm")

    def key(self, ctx: StageContext) -> dict:
        g = ctx.cfg.generate
        return {**{n: ctx.hashes[n] for n in self.needs}, "gate": [g.gate_clips, g.gate_times]}

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        with tempfile.TemporaryDirectory(prefix="lafma-package-") as tmp:
            weights, components = {}, {}
            for job in JOBS.values():  # each trained component, from the stage that trained it
                weights[job.component] = os.path.join(tmp, f"src-{job.weights_file}")
                with open(weights[job.component], "wb") as f:
                    f.write(storage.read_bytes(trained_weights(ctx, job)))
                components[job.component] = storage.read_json(storage.join(ctx.outputs[job.stage], "config.json"))["config"]
            lineage = {"dataset": ctx.dataset, "storage_root": ctx.root,
                       # A training stage's hash here also counts its steps; its path is where it lives.
                       **{f"{n}_hash": ctx.hashes[n] for n in ("ingest", "audio", "text", *self.needs)},
                       **{f"{n}_path": ctx.outputs[n] for n in ("ingest", "audio", "text", *self.needs)},
                       **{f"{job.stage}_run": ctx.run_ids.get(job.stage, "") for job in JOBS.values()},
                       # Weights from elsewhere (vae.pretrained, train_lfm.init_from, ...): what and which.
                       **{f"{key}{suffix}": src[field] for key, src in ctx.sources.items()
                          for suffix, field in (("", "uri"), (".sha256", "sha256"), (".format", "format"),
                                                (".origin", "origin")) if field in src}}
            bundle = os.path.join(tmp, "bundle")
            manifest = write_bundle(bundle, components=components, weights=weights, lineage=lineage)
            pipe = load_bundle(bundle)  # proves the bundle loads before anyone can promote it
            rows, split = heldout_rows(ctx.outputs["latents"], ctx.cfg.generate.gate_clips)
            # The LFM's own config: it holds the latent scale it was trained with.
            unet_cfg = from_dict(LafmaConfig, model_sections(components["unet"]))
            batches = heldout_batches(rows, unet_cfg, next(pipe.unet.parameters()).device)
            # Scored on the real frames only: a model that (rightly) never learned the padding
            # of short clips is not charged for what it generates there.
            value = heldout_fm_loss(pipe.unet, batches, OTPath(unet_cfg.flow.sigma_min),
                                    times=ctx.cfg.generate.gate_times, frame_masks=heldout_frame_masks(rows))
            metric = PACKAGE_GATE_METRIC if split != "train" else "train/fm_loss"
            tags = {f"lafma.{k}": v for k, v in lineage.items()}
            tags |= {"lafma.mel_hash": manifest["mel_hash"], "lafma.config_hash": ctx.hashes.get("config", ""),
                     "lafma.text_encoder": manifest["text_encoder"].get("name_or_path") or manifest["text_encoder"]["kind"],
                     "lafma.gate.split": split, "lafma.gate.clips": rows.num_rows}
            reg = registry.register(bundle, root=ctx.root, run_id=ctx.run_ids[self.name], gate_metric=metric,
                                    gate_value=value, tags=tags)
            # Also beside the stage, whole (a bundled text encoder is a sub-folder): servable
            # without the registry, and what generate and evaluate load on a local root.
            storage.copy_tree(bundle, storage.join(out_dir, "bundle"))
        print(f"[package] registered {registry.MODEL_NAME} v{reg.version} ({reg.uri}) as {registry.CANDIDATE}; "
              f"{metric} = {value:.5f} on {rows.num_rows} {split} clips", flush=True)
        return {"model_version": reg.version, "model_uri": reg.uri, "gate_metric": metric, "gate_value": value,
                "gate_clips": rows.num_rows, "gate_split": split, "bundle": storage.join(out_dir, "bundle"),
                "metrics": {metric: value}}

    def summary(self, info: dict) -> list[str]:
        if "model_version" not in info:
            return []
        where = f" on {info['gate_clips']} {info['gate_split']} clips" if "gate_split" in info else ""
        return [f"registered {info.get('model_uri')} ({info.get('gate_metric')} = {info.get('gate_value', 0):.5g}{where})"]


class PromoteStage(Stage):
    """``champion`` moves to the new version only if its gate metric beats the champion's."""

    name = "promote"
    needs = ("package", "evaluate")

    def key(self, ctx: StageContext) -> dict:
        return {n: ctx.hashes[n] for n in self.needs}

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        version = read_marker(ctx.outputs["package"])["model_version"]
        d = registry.gate(root=ctx.root, version=version)
        print(f"[promote] v{d.candidate} {d.outcome}: {d.reason}", flush=True)
        return {"model_version": d.candidate, "promoted": d.promoted, "outcome": d.outcome, "reason": d.reason,
                "previous_champion": d.champion}

    def summary(self, info: dict) -> list[str]:
        if "promoted" not in info:
            return []
        return [("champion -> v" if info["promoted"] else "champion stays; v") + f"{info['model_version']}: {info['reason']}"]


def demo_captions(ctx: StageContext) -> list[dict]:
    """The held-out (test and validation) captions of the dataset, alternating with training
    captions for comparison; at most ``generate.max_captions``."""
    manifest = storage.read_parquet_dir(ctx.outputs["ingest"], columns=["id", "caption", "split"])
    rows = sorted(manifest.to_pylist(), key=lambda r: r["id"])
    n = ctx.cfg.generate.max_captions
    held = list({r["caption"]: r for r in rows if r["split"] in ("test", "validation")}.values())
    train = list({r["caption"]: r for r in rows if r["split"] == "train"}.values())
    # Every other slot a held-out caption while both last (held-out first).
    picked, seen = [], set()
    for r in [x for pair in zip(held, train) for x in pair] + held + train:
        if r["caption"] not in seen and len(picked) < n:
            seen.add(r["caption"])
            picked.append({"id": f"{r['split']}-{len(picked):03d}", "caption": r["caption"]})
    return picked


class GenerateStage(Stage):
    """Generate the demo captions with the packaged model (batch generation on Ray Data) and
    log their spectrograms and audio to the stage's MLflow run."""

    name = "generate"
    needs = ("ingest", "package")

    def key(self, ctx: StageContext) -> dict:
        g = ctx.cfg.generate
        return {"ingest": ctx.hashes["ingest"], "package": ctx.hashes["package"], "sampler": ctx.cfg.sampler,
                "captions": g.captions, "max_captions": g.max_captions, "seed": g.seed}

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        from pipelines.generation import GenerationSettings, run_generation

        g, s = ctx.cfg.generate, ctx.cfg.sampler
        captions = g.captions
        if not captions:
            captions = storage.join(out_dir, "captions.jsonl")
            lines = "".join(json.dumps(r) + "\n" for r in demo_captions(ctx))
            storage.write_bytes(captions, lines.encode())
        model = packaged_model_uri(read_marker(ctx.outputs["package"]))
        settings = GenerationSettings(model=model, steps=s.steps, guidance=s.guidance, solver=s.solver,
                                      duration=s.duration, seed=g.seed, batch_size=g.batch_size, actors=g.actors,
                                      actor_cpus=g.actor_cpus, actor_gpus=g.actor_gpus)
        summary = run_generation(captions, out_dir, settings, root=ctx.root,
                                 defaults={"steps": s.steps, "guidance": s.guidance, "solver": s.solver,
                                           "duration": s.duration})
        log_generations(ctx, out_dir)
        return {"rows": summary["rows"], "rejected": summary["rejected"], "reasons": summary["reasons"],
                "audio_dir": storage.join(out_dir, "wavs"), "clips_per_second": summary["clips_per_second"],
                "rtf": summary["rtf"]}

    def summary(self, info: dict) -> list[str]:
        return [f"generated audio: {info['audio_dir']}"] if "audio_dir" in info else []

    def resources(self, ctx: StageContext) -> list:
        return [generation_actors(ctx)]


def generation_actors(ctx: StageContext):
    """The actor pool ``generate.actors`` sizes (the generate and evaluate stages run one)."""
    from pipelines.core.preflight import Request

    g = ctx.cfg.generate
    return Request("generation actors", g.actors, g.actor_cpus, g.actor_gpus, "generate.actors", "generate.actor_cpus",
                   "generate.actor_gpus")


def log_generations(ctx: StageContext, out_dir: str, limit: int = 8) -> None:
    """Spectrograms (one image, one colour scale) and audio of the first clips, to MLflow."""
    import io

    import soundfile as sf

    from lafma.audio.mel import MelSpectrogram
    from pipelines.core.tracking import RunLogger, mel_image, tracking_uri

    # The root's store, named: mlflow's current URI is that store only once an earlier stage in
    # this process set it; `run_all.py --only generate` set none and looked for the run elsewhere.
    logger = RunLogger(ctx.run_ids.get("generate"), tracking=tracking_uri(ctx.root))
    if not logger.enabled:
        return
    manifest = storage.read_parquet_file(storage.join(out_dir, "manifest.parquet")).to_pylist()
    # In caption order (held-out and training captions alternate), not in id order.
    manifest = sorted(manifest, key=lambda r: r["id"].rsplit("-", 1)[-1])[:limit]
    mel = MelSpectrogram.from_config(ctx.cfg.mel)
    panels = []
    for r in manifest:
        wav, sr = sf.read(io.BytesIO(storage.read_bytes(storage.join(out_dir, r["path"]))), dtype="float32")
        panels.append((r["caption"][:90], mel(torch.from_numpy(wav)[None])[0].numpy()))
        logger.log_audio(wav, sr, f"generated/{r['path'].rsplit('/', 1)[-1]}")
    if panels:
        logger.log_image(mel_image(panels, sample_rate=ctx.cfg.mel.sample_rate, hop_length=ctx.cfg.mel.hop_length),
                         "generated/spectrograms.png")
