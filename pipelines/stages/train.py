"""Stages 3-6: train the VAE, train the vocoder, encode latents, train the LFM."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

from lafma.config import to_dict
from pipelines.config import PipelineConfig
from pipelines.core import storage
from pipelines.core.stage import (
    Stage,
    StageContext,
    arrow_table,
    rejects_table,
    run_shards,
    write_shard,
)
from pipelines.stages.text import EmbeddingLookup, caption_key, encoder_actors, recorded_width
from pipelines.train.jobs import JOBS, JobSpec

if TYPE_CHECKING:
    import torch

# One row per (clip, caption). ``mean``/``logvar`` are the posterior's (C, T', F') moments
# flattened row-major; ``latent_channels``/``latent_frames``/``latent_bins`` are that shape,
# which every reader reshapes by (as the audio stage's ``n_mels``/``frames``). ``valid_frames``
# counts the latent frames that hold real audio (the rest is the padding of a short clip).
LATENT_SCHEMA = pa.schema([
    ("id", pa.string()), ("caption", pa.string()), ("caption_key", pa.string()), ("split", pa.string()),
    ("mean", pa.list_(pa.float32())), ("logvar", pa.list_(pa.float32())),
    ("latent_channels", pa.int32()), ("latent_frames", pa.int32()), ("latent_bins", pa.int32()),
    ("emb", pa.list_(pa.float32())), ("length", pa.int32()), ("valid_frames", pa.int32()),
])


# How long and how observably a job runs, not what it learns: left out of the stage hash so
# that raising ``steps`` resumes the same run instead of starting a new one.
OPERATIONAL = ("steps", "log_every", "sample_every", "checkpoint_every", "max_failures", "fail_at_step",
               "cpus_per_worker")


def _model_section(ctx: StageContext, *names: str) -> dict:
    """The named config sections as a stage key; a training section without its operational
    fields, with ``init_from`` hashed by the weights it names (:func:`_init_key`) and
    ``mask_padding`` by what it changes (:func:`_padding_key`)."""
    out = {}
    for n in names:
        value = getattr(ctx.cfg, n)
        out[n] = ({**{k: v for k, v in to_dict(value).items() if k not in (*OPERATIONAL, "mask_padding")},
                   **_init_key(ctx, n), **_padding_key(ctx, n)}
                  if n.startswith("train_") else value)
    return out


def _padding_key(ctx: StageContext, section: str) -> dict:
    """``mask_padding`` is part of the hash only where it changes the training: on data with
    padded clips. Data without (the demo corpus, AudioCaps' full-length clips) keeps the stages
    trained before the option existed; padded data trained unmasked before is trained again."""
    from pipelines.stages.audio import padded_clips

    if not getattr(ctx.cfg, section).mask_padding or "audio" not in ctx.outputs:
        return {}
    return {"mask_padding": True} if padded_clips(ctx) else {}


def trained_weights(ctx: StageContext, job: JobSpec) -> str:
    """Where ``job``'s stage exported its weights."""
    return storage.join(ctx.outputs[job.stage], job.weights_file)


def _init_key(ctx: StageContext, section: str) -> dict:
    """``train_<job>.init_from`` hashes by the weights it names, not by their path."""
    source = ctx.sources.get(f"{section}.init_from")
    if not source:
        return {}
    # steps is left out of the hash (more steps resume); 0 steps is another output: the source as it is.
    return {"init_from": source["sha256"], **({"as_is": True} if getattr(ctx.cfg, section).steps == 0 else {})}


class _TrainStage(Stage):
    """A stage that runs one training job: its row of :data:`~pipelines.train.jobs.JOBS`
    names the stage, its config section and its export.

    With ``<component>.pretrained`` set it trains nothing: it exports the named weights (the
    stage is "imported", hashed by their SHA-256 and the mel config); with
    ``train_<job>.init_from`` the job starts from the named weights."""

    job: JobSpec
    pretrained_key: str = ""

    def done(self, marker: dict, ctx: StageContext) -> bool:
        """Finished only if it reached the configured number of steps (or imported its weights)."""
        return bool(marker.get("imported")) or int(marker.get("steps") or 0) >= self.job.train_config(ctx.cfg).steps

    def imported_key(self, ctx: StageContext) -> dict | None:
        source = ctx.sources.get(self.pretrained_key)
        if source is None:
            return None
        return {"imported": source["sha256"], "mel": ctx.cfg.mel}

    def export_imported(self, ctx: StageContext, out_dir: str) -> dict:
        from pipelines.train.sources import source_weights
        from pipelines.train.weights import export_weights

        source = ctx.sources[self.pretrained_key]
        export_weights(source_weights(ctx.cfg, self.pretrained_key, ctx.root), ctx.cfg, out_dir, self.job.component)
        print(f"[{self.name}] {self.pretrained_key} = {source['uri']}: nothing to train, exported "
              f"({source['format']}, sha256 {source['sha256'][:12]})", flush=True)
        return {"imported": True, "source": source, "steps": 0,
                "weights": storage.join(out_dir, self.job.weights_file)}

    def summary(self, info: dict) -> list[str]:
        if info.get("imported"):
            src = info["source"]
            return [f"imported, not trained: {src['uri']} ({src['format']}, sha256 {src['sha256'][:12]})"]
        if info.get("init_only"):
            return ["init_from exported as it is (steps 0)"]
        return []

    def train(self, ctx: StageContext, out_dir: str, cfg: PipelineConfig | None = None, extra: dict | None = None,
              data_dir: str | None = None) -> dict:
        """Run the job; with ``init_from``, its starting weights are written beside the output first."""
        from pipelines.train.launch import train_job

        cfg = cfg or ctx.cfg
        extra = dict(extra or {})
        key = f"{self.job.section}.init_from"
        if key in ctx.sources:
            from pipelines.train.sources import source_weights
            from pipelines.train.weights import export_weights

            weights = source_weights(cfg, key, ctx.root)
            if self.job.train_config(cfg).steps == 0:  # evaluate / package the source as it is
                export_weights(weights, cfg, out_dir, self.job.component)
                print(f"[{self.name}] {self.job.section}.steps is 0: {key} = {ctx.sources[key]['uri']} exported as it is",
                      flush=True)
                return {"steps": 0, "init_only": True, "weights": storage.join(out_dir, self.job.weights_file)}
            init_dir = storage.join(out_dir, "init")
            export_weights(weights, cfg, init_dir, self.job.component)
            extra["init_weights"] = storage.join(init_dir, self.job.weights_file)
            print(f"[{self.name}] starting from {key} = {ctx.sources[key]['uri']}", flush=True)
        return train_job(cfg, self.job.name, root=ctx.root, data_dir=data_dir or ctx.outputs[self.needs[0]],
                         out_dir=out_dir, stage_hash=ctx.hashes[self.name], extra=extra,
                         parent_run_id=ctx.parent_run_id)

    def version(self, marker: dict):
        """The steps reached: raising ``steps`` resumes in the same directory, with new weights."""
        return marker.get("steps")

    def resources(self, ctx: StageContext) -> list:
        """The job's worker gang, and a CPU beside it for the Ray Data readers that feed it;
        nothing when the stage only exports weights from elsewhere."""
        from pipelines.core.preflight import Request

        t, s = self.job.train_config(ctx.cfg), self.job.section
        if self.pretrained_key in ctx.sources or t.steps == 0:
            return []
        return [Request("training workers", t.num_workers, t.cpus_per_worker, t.gpus_per_worker, f"{s}.num_workers",
                        f"{s}.cpus_per_worker", f"{s}.gpus_per_worker", spare_cpus=1.0)]


class TrainVAEStage(_TrainStage):
    job = JOBS["vae"]
    name = job.stage
    needs = ("audio",)
    pretrained_key = "vae.pretrained"

    def key(self, ctx: StageContext) -> dict:
        # The latent scale only matters to the flow model: changing it must not retrain the VAE.
        vae = {k: v for k, v in to_dict(ctx.cfg.vae).items() if k not in ("scale_factor", "pretrained")}
        if (imported := self.imported_key(ctx)) is not None:
            return {**imported, "vae": vae}
        return {"audio": ctx.hashes["audio"], **_model_section(ctx, "mel", "vae_loss", self.job.section), "vae": vae}

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        if self.pretrained_key in ctx.sources:
            return self.export_imported(ctx, out_dir)
        return self.train(ctx, out_dir)


class TrainVocoderStage(_TrainStage):
    """HiFi-GAN training; with ``vocoder.kind: griffinlim`` there is nothing to learn and the
    stage exports the Griffin-Lim vocoder (its mel hash included) so that the rest of the DAG
    and the bundle treat it like any other."""

    job = JOBS["vocoder"]
    name = job.stage
    needs = ("audio",)
    pretrained_key = "vocoder.pretrained"

    def done(self, marker: dict, ctx: StageContext) -> bool:
        return marker.get("kind") == "griffinlim" or super().done(marker, ctx)

    def key(self, ctx: StageContext) -> dict:
        if (imported := self.imported_key(ctx)) is not None:
            return {**imported, "vocoder": {k: v for k, v in to_dict(ctx.cfg.vocoder).items() if k != "pretrained"}}
        return {"audio": ctx.hashes["audio"], **_model_section(ctx, "mel", "vocoder", "vocoder_loss", self.job.section)}

    def resources(self, ctx: StageContext) -> list:
        return [] if ctx.cfg.vocoder.kind == "griffinlim" else super().resources(ctx)

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        if self.pretrained_key in ctx.sources:
            return self.export_imported(ctx, out_dir)
        if ctx.cfg.vocoder.kind == "griffinlim":
            from lafma.models import build_vocoder
            from pipelines.train.weights import export_weights

            export_weights(build_vocoder(ctx.cfg).state_dict(), ctx.cfg, out_dir, self.job.component)
            print(f"[{self.name}] vocoder.kind is griffinlim: nothing to train, exported", flush=True)
            return {"kind": "griffinlim", "steps": 0, "weights": storage.join(out_dir, self.job.weights_file)}
        return self.train(ctx, out_dir)


class EncodeLatents:
    """Actor: the trained VAE's posterior for each clip, one row per (clip, caption) with the
    caption's embedding, so the LFM reads one table.

    Each shard fetches only its own captions' embeddings (:class:`EmbeddingLookup`): an actor's
    memory is one shard's, whatever the size of the text table (AudioCaps with FLAN-T5-Large
    is ~3 GB of embeddings, which every actor used to load whole)."""

    def __init__(self, cfg: dict, vae_weights: str, text_dir: str, out_dir: str, batch_size: int = 16):
        import torch

        from lafma.config import from_dict
        from lafma.models import build_vae
        from pipelines.train.weights import load_weights

        self.cfg = from_dict(PipelineConfig, cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = build_vae(self.cfg)
        self.vae.load_state_dict(load_weights(vae_weights))
        self.vae = self.vae.to(self.device).eval()
        self.text = EmbeddingLookup(text_dir)
        self.out_dir, self.batch_size = out_dir, batch_size

    def __call__(self, batch: pa.Table) -> dict:
        import numpy as np
        import torch

        shard = int(batch.column("shard")[0].as_py())
        uri = batch.column("rows")[0].as_py()[0]["file"]
        clips = storage.read_parquet_file(uri, ["id", "captions", "split", "mel", "n_mels", "frames", "valid_samples"])
        # The mels as one numpy view, not Python lists (to_pylist made 65 k floats a 10 s clip).
        records = clips.drop_columns(["mel"]).to_pylist()
        # Every clip of a stage has the same (n_mels, frames): one (N, n_mels, T) array.
        mels = clips.column("mel").combine_chunks().flatten().to_numpy().reshape(
            len(records), records[0]["n_mels"], records[0]["frames"]) if records else None  # (N·n_mels·T,) -> (N, n_mels, T)
        text = self.text.rows([c for r in records for c in r["captions"]])
        rows = []
        for start in range(0, len(records), self.batch_size):
            part = records[start : start + self.batch_size]
            mel = torch.from_numpy(np.array(mels[start : start + len(part)], np.float32))  # a writable copy
            with torch.no_grad():
                post = self.vae.encode(mel.to(self.device))
            channels, frames, bins = post.mean.shape[1:]
            means = post.mean.flatten(1).cpu().numpy()  # (B, C, T', F') -> (B, C·T'·F')
            logvars = post.logvar.flatten(1).cpu().numpy()
            valid = latent_valid_frames([r["valid_samples"] for r in part], self.cfg.mel.hop_length,
                                        mel.shape[-1], frames).tolist()
            for r, mean, logvar, n_valid in zip(part, means, logvars, valid):
                for caption in r["captions"]:
                    key = caption_key(caption)
                    emb, n = text[key]
                    rows.append({"id": r["id"], "caption": caption, "caption_key": key, "split": r["split"],
                                 "mean": mean, "logvar": logvar, "latent_channels": channels,
                                 "latent_frames": frames, "latent_bins": bins, "emb": emb, "length": n,
                                 "valid_frames": n_valid})
        write_shard(self.out_dir, shard, arrow_table(rows, LATENT_SCHEMA), rejects_table([]))
        return {"shard": [shard], "rows_out": [len(rows)], "rejected": [0]}


def latent_valid_frames(valid_samples: Sequence[int], hop: int, mel_frames: int, latent_frames: int) -> torch.Tensor:
    """(B,) real samples per clip → (B,) int64 latent frames that hold real audio.

    ceil(real mel frames / r), r = mel_frames / latent_frames the VAE's downsampling in time: a
    latent frame counts as real when any of the mel frames it encodes does.
    """
    from lafma.train.objectives import valid_frames

    mel = valid_frames(valid_samples, hop, mel_frames)  # (B,) real mel frames
    return valid_frames(mel, mel_frames // latent_frames, latent_frames)


# Version of the latents table's layout: 2 added each row's shape (latent_channels,
# latent_frames, latent_bins), which the LFM job reads; a cache without them is rebuilt.
# ``valid_frames`` came later without a new version: a table without it still reads, as "every
# frame is real" (pipelines.train.data.PADDING_COLUMNS), so finished runs keep their latents.
LATENTS_FORMAT = 2


class LatentsStage(Stage):
    name = "latents"
    needs = ("audio", "text", "train_vae")

    def key(self, ctx: StageContext) -> dict:
        return {**{n: ctx.hashes[n] for n in self.needs}, "format": LATENTS_FORMAT}

    def resources(self, ctx: StageContext) -> list:
        return [encoder_actors("VAE encoder actors", ctx)]

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        files = storage.list_files(ctx.outputs["audio"], ".parquet")
        c = ctx.cfg.compute
        run_shards(out_dir, [[{"file": f}] for f in files], EncodeLatents, label="latents",
                   num_cpus=c.text_actor_cpus, num_gpus=c.text_actor_gpus, actors=c.text_actors,
                   fn_kwargs={"cfg": to_dict(ctx.cfg), "vae_weights": trained_weights(ctx, JOBS["vae"]),
                              "text_dir": ctx.outputs["text"], "out_dir": out_dir})
        rows = storage.read_parquet_dir(out_dir, columns=["split"]).num_rows
        return {"rows_in": len(files), "rows": rows, "rejected": 0, **latent_stats(out_dir)}


def latent_stats(latents_dir: str) -> dict:
    """Mean and standard deviation of the training latents (posterior means), file by file."""
    import numpy as np

    n, total, squares = 0, 0.0, 0.0
    for uri in storage.list_files(latents_dir, ".parquet"):
        table = storage.read_parquet_file(uri, ["split", "mean"])
        for split, mean in zip(table.column("split").to_pylist(), table.column("mean").to_numpy(zero_copy_only=False)):
            if split == "train":
                m = np.asarray(mean, np.float64)
                n, total, squares = n + m.size, total + m.sum(), squares + (m * m).sum()
    if n == 0:
        return {}
    mu = total / n
    return {"latent_mean": mu, "latent_std": float(np.sqrt(max(squares / n - mu * mu, 1e-12)))}


def resolve_scale_factor(cfg: PipelineConfig, latents_marker: dict) -> PipelineConfig:
    """``vae.scale_factor: 0`` → 1 / std of the training latents; any other value is kept."""
    if cfg.vae.scale_factor > 0:
        return cfg
    std = latents_marker.get("latent_std")
    if not std:
        raise ValueError("vae.scale_factor is 0 (measure it) but the latents stage recorded no latent_std")
    return dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scale_factor=1.0 / std))


def empty_caption_embedding(text_dir: str) -> dict:
    """The empty caption's row, read without loading the other embeddings into Python.

    Captions are sorted before sharding, so "" is in the first shard; the search goes on
    through the others only if that ever changes.
    """
    import pyarrow.compute as pc

    key = caption_key("")
    for uri in storage.list_files(text_dir, ".parquet"):
        table = storage.read_parquet_file(uri, ["caption_key", "emb", "length"])
        hit = table.filter(pc.equal(table.column("caption_key"), key))
        if hit.num_rows:
            return hit.to_pylist()[0]
    raise FileNotFoundError(f"no embedding of the empty caption under {text_dir}")


class TrainLFMStage(_TrainStage):
    job = JOBS["lfm"]
    name = job.stage
    needs = ("latents", "text", "train_vae", "train_vocoder")

    def key(self, ctx: StageContext) -> dict:
        # Not the sampler (inference settings) nor the vocoder (it only renders sample audio):
        # changing them must not restart training.
        return {**{n: ctx.hashes[n] for n in ("latents", "text", "train_vae")},
                **_model_section(ctx, "unet", "flow", self.job.section), "scale_factor": ctx.cfg.vae.scale_factor}

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        from pipelines.core.stage import read_marker

        cfg = resolve_scale_factor(ctx.cfg, read_marker(ctx.outputs["latents"]) or {})
        # The width the text stage recorded, made explicit: the workers, the exported config and
        # so the bundle build the UNet that wide, whether or not they can see the encoder's files.
        cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, context_dim=recorded_width(ctx.outputs["text"])))
        null = empty_caption_embedding(ctx.outputs["text"])
        extra = {"vae_weights": trained_weights(ctx, JOBS["vae"]),
                 "vocoder_weights": trained_weights(ctx, JOBS["vocoder"]),
                 "null_emb": list(map(float, null["emb"]))}
        return self.train(ctx, out_dir, cfg=cfg, extra=extra, data_dir=ctx.outputs["latents"])
