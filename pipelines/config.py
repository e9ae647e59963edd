"""The pipeline's configuration: the model (:class:`lafma.config.LafmaConfig`) plus how it is
trained, on what data, where it is stored and on which machines it runs.

The YAML keys are the same flat sections as ever (``data``, ``storage``, ``compute``,
``generate``, ``evaluate``, ``train_vae``, ``train_vocoder``, ``train_lfm`` beside the model's
own); only their home moved out of ``lafma/``, which knows nothing of Ray, storage or jobs.
Loading is :func:`lafma.config.load_config` with ``cls=PipelineConfig``: just as strict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lafma.config import LafmaConfig, load_config, require
from lafma.data.manifest import scheme_refusal


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how raw audio becomes clips.

    ``manifest`` empty means: generate the built-in demo corpus (``demo_clips`` clips).
    """

    dataset: str = ""
    manifest: str = ""
    # Layout of the manifest (a file) or of the folder it names: auto-detected unless given.
    layout: Literal["auto", "generic", "audiocaps", "clotho", "audiofolder", "textfiles"] = "auto"
    # Where relative audio paths resolve (default: the manifest's directory).
    audio_dir: str = ""
    # AudioCaps rows name a YouTube clip; this is its file name under audio_dir.
    audiocaps_pattern: str = "{youtube_id}.wav"
    demo_clips: int = 240
    demo_seed: int = 0
    # A file longer than the clip is cropped to its start, or cut into up to max_segments clips.
    long_clips: Literal["crop", "segment"] = "segment"
    max_segments: int = 8
    # Longer than this is not audio we want (a mis-labelled podcast, a corrupt length field).
    max_seconds: float = 3600.0
    # Bounds on one input file, checked before it is read or decoded, so no file can exhaust a
    # worker's memory: its size (MiB, from the filesystem), and from its header the sample rate
    # (192 kHz is the highest rate studio formats use) and the channels (7.1 surround is 8).
    max_file_mb: float = 512.0
    max_sample_rate: int = 192000
    max_channels: int = 8
    # Schemes a manifest, audio_dir and each manifest row may name: "file" is a local path. A
    # manifest is data, not configuration: with http allowed, a row could make a worker fetch
    # any address its network reaches (a cloud metadata endpoint, an internal service).
    allowed_schemes: tuple[str, ...] = ("file", "s3")
    # Seconds one remote file may take to read (fsspec's async filesystems, s3 among them):
    # longer is a reject ("timeout"), so a stalled connection cannot hold a shard forever.
    read_timeout: float = 120.0
    # Seconds one input file may take from the start of its read to the end of its decode, on
    # any filesystem (a stalled network mount, a decoder that never ends): longer is a reject
    # ("timeout") and the rest of the shard still comes out (pipelines.core.deadline).
    file_timeout: float = 300.0
    # A clip whose RMS is below this (dBFS) is silent: rejected.
    silence_db: float = -70.0
    # Captions longer than this many characters are truncated, not rejected.
    max_caption_chars: int = 512
    # Rows per output shard: the unit of resumption after a crash.
    shard_size: int = 64
    # Clips the manifest gives no split get one by a hash of the clip (lafma.data.splits):
    # this share each for validation and test, and at least heldout_min clips each (evaluation
    # scores the held-out clips; the gate and generation read them).
    heldout_fraction: float = 0.05
    heldout_min: int = 8
    # "manifest": a split column, split sub-folders or the manifest's file name decide where
    # they exist; "hash": ignore them and draw validation and test by the hash for every clip.
    splits: Literal["manifest", "hash"] = "manifest"

    def validate(self, prefix: str = "data") -> None:
        require(self.demo_clips >= 0, f"{prefix}.demo_clips", "must be >= 0")
        require(self.max_segments >= 1, f"{prefix}.max_segments", "must be >= 1")
        require(self.max_seconds > 0, f"{prefix}.max_seconds", "must be positive")
        require(self.max_file_mb > 0, f"{prefix}.max_file_mb", "must be positive")
        require(self.max_sample_rate >= 1, f"{prefix}.max_sample_rate", "must be >= 1 (Hz)")
        require(self.max_channels >= 1, f"{prefix}.max_channels", "must be >= 1")
        require(bool(self.allowed_schemes) and all(s.isascii() and s.isalnum() and s == s.lower()
                                                   for s in self.allowed_schemes), f"{prefix}.allowed_schemes",
                "must be a non-empty list of lower-case scheme names (file, s3, ...)")
        for key in ("manifest", "audio_dir"):
            uri = getattr(self, key)
            why = scheme_refusal(uri, self.allowed_schemes) if uri else None
            require(why is None, f"{prefix}.{key}", f"{why}: add its scheme to {prefix}.allowed_schemes to read it")
        require(self.read_timeout > 0, f"{prefix}.read_timeout", "must be positive (seconds)")
        require(self.file_timeout > 0, f"{prefix}.file_timeout", "must be positive (seconds)")
        require(self.silence_db < 0, f"{prefix}.silence_db", "must be negative (dBFS)")
        require(self.max_caption_chars > 0, f"{prefix}.max_caption_chars", "must be positive")
        require(self.shard_size >= 1, f"{prefix}.shard_size", "must be >= 1")
        require(0 <= self.heldout_fraction < 0.5, f"{prefix}.heldout_fraction",
                "must be in [0, 0.5) (the share of clips for each of validation and test)")
        require(self.heldout_min >= 0, f"{prefix}.heldout_min", "must be >= 0")
        require("/" not in self.dataset and ".." not in self.dataset, f"{prefix}.dataset",
                 "must be a plain name")


@dataclass(frozen=True)
class StorageConfig:
    """One root for everything the pipeline writes: a local path or ``s3://bucket/prefix``.

    Credentials (and a custom endpoint, ``AWS_ENDPOINT_URL``) come from the environment,
    never from configs.
    """

    root: str = ".lafma"

    def validate(self, prefix: str = "storage") -> None:
        require(bool(self.root), f"{prefix}.root", "must not be empty")


@dataclass(frozen=True)
class ComputeConfig:
    """Ray resources. Fractional CPUs let a 2-core machine run readers and actors together."""

    # "" starts (or joins, under `ray job submit`) the local/default cluster.
    ray_address: str = ""
    # The cluster adds nodes on demand (the cluster launcher, KubeRay with autoscaling): the
    # preflight reports what each job will request instead of refusing what today's nodes
    # cannot hold. On a fixed cluster such a request would wait forever, so it is refused.
    autoscaling: bool = False
    # Audio tasks are CPU-bound and single-threaded: one per core beats two per core.
    audio_task_cpus: float = 1.0
    text_actors: int = 1
    text_actor_cpus: float = 0.5
    text_actor_gpus: float = 0.0
    text_batch_size: int = 32

    def validate(self, prefix: str = "compute") -> None:
        require(self.audio_task_cpus > 0, f"{prefix}.audio_task_cpus", "must be positive")
        require(self.text_actors >= 1, f"{prefix}.text_actors", "must be >= 1")
        require(self.text_actor_cpus > 0, f"{prefix}.text_actor_cpus", "must be positive")
        require(self.text_actor_gpus >= 0, f"{prefix}.text_actor_gpus", "must be >= 0")
        require(self.text_batch_size >= 1, f"{prefix}.text_batch_size", "must be >= 1")


@dataclass(frozen=True)
class GenerateConfig:
    """Generation after training (the DAG's ``generate`` stage) and its gate.

    ``captions`` empty: the dataset's held-out captions (test split), ``max_captions`` of them.
    """

    captions: str = ""
    max_captions: int = 16
    seed: int = 0
    batch_size: int = 8
    actors: int = 1
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    # Held-out clips the package stage scores the flow-matching loss on (the gate metric
    # until an evaluation stage provides better ones), and the t values it averages over.
    gate_clips: int = 64
    gate_times: int = 8

    def validate(self, prefix: str = "generate") -> None:
        require(self.max_captions >= 1, f"{prefix}.max_captions", "must be >= 1")
        require(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        require(self.actors >= 1, f"{prefix}.actors", "must be >= 1")
        require(self.actor_cpus > 0, f"{prefix}.actor_cpus", "must be positive")
        require(self.actor_gpus >= 0, f"{prefix}.actor_gpus", "must be >= 0")
        require(self.gate_clips >= 1, f"{prefix}.gate_clips", "must be >= 1")
        require(self.gate_times >= 1, f"{prefix}.gate_times", "must be >= 1")


# Embedders that give embeddings but no class logits (so no KL and no IS).
EMBEDDERS_WITHOUT_CLASSES = ("vggish", "clap")


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` stage: generated held-out captions against held-out real audio.

    ``embedder: aisfx`` works offline (weights inside the ``aisfx`` wheel, this project's own
    scale); ``panns_cnn14_16k`` and ``vggish`` are the literature's protocol and need the
    published checkpoint files (``embedder_weights``, and ``vggish_pca`` for VGGish); ``clap``
    is LAION-CLAP's audio tower (HTS-AT or PANN-14, read from the published checkpoint).
    """

    embedder: Literal["aisfx", "panns_cnn14_16k", "panns_cnn14_32k", "vggish", "clap"] = "aisfx"
    embedder_weights: str = ""
    vggish_pca: str = ""
    # Held-out clips (test and validation splits) scored, first by id.
    max_clips: int = 256
    # What the promotion gate compares: fd (lower is better), kl (lower), text_audio (higher).
    gate_metric: Literal["fd", "kl", "text_audio"] = "fd"
    # Also generate at each of these step counts and log quality and time against steps.
    sweep_steps: tuple[int, ...] = ()
    seed: int = 0

    def validate(self, prefix: str = "evaluate") -> None:
        require(self.max_clips >= 4, f"{prefix}.max_clips", "must be >= 4 (two halves of two clips for real vs real)")
        require(self.embedder == "aisfx" or bool(self.embedder_weights), f"{prefix}.embedder_weights",
                 f"is required for embedder {self.embedder!r} (a local checkpoint file)")
        require(all(s >= 1 for s in self.sweep_steps), f"{prefix}.sweep_steps", "must be >= 1")
        # KL needs class posteriors: an embedder without a classifier head measures none, and
        # the gate would find no value only after generating and scoring every clip.
        require(not (self.gate_metric == "kl" and self.embedder in EMBEDDERS_WITHOUT_CLASSES), f"{prefix}.gate_metric",
                f"kl needs an embedder with a classifier head; {self.embedder!r} has none (use fd or text_audio)")


@dataclass(frozen=True)
class TrainConfig:
    """One training job: optimisation, distribution and bookkeeping.

    ``steps`` counts micro-batches; the optimiser updates every ``grad_accum`` of them.
    ``fail_at_step`` makes the first attempt of the job raise at that step, to prove that a
    restarted worker group resumes from its last checkpoint (-1: off).
    """

    steps: int = 1000
    batch_size: int = 8  # per worker, per micro-step
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # After the warm-up: constant, linear or cosine to 0 at the last step, or exponential (the
    # lr times decay_gamma every decay_every steps, as torch's ExponentialLR; stepped once per
    # epoch, decay_every is that epoch's length). Warm-up and decay count optimiser steps.
    decay: Literal["constant", "linear", "cosine", "exponential"] = "constant"
    decay_gamma: float = 1.0
    decay_every: int = 1
    grad_clip: float = 1.0
    grad_accum: int = 1
    zero_stage: int = 2
    # "auto": bf16 on GPU, fp32 on CPU. "bf16" on a CPU: only where it has native bf16
    # (pipelines.train.engines.use_bf16). "bf16_forced": bf16 whatever the CPU, emulated (slowly)
    # where it is not native, to rehearse the bf16 path's dtypes before a GPU sees them
    # (configs/rehearsal.yaml). Weights stay fp32 either way (autocast).
    precision: Literal["auto", "fp32", "bf16", "bf16_forced"] = "auto"
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # How Ray places the workers (a placement group's strategy): PACK fills a node before the
    # next (fewest hops between ranks); SPREAD puts them on different nodes where it can, and
    # STRICT_SPREAD on different nodes or not at all (a worker per node, e.g. to use every
    # node's local disk bandwidth, or to prove a multi-node run: tests/pipelines/test_two_node.py).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 1
    checkpoint_every: int = 500
    log_every: int = 10
    sample_every: int = 500
    # Frames of mel per training example (random crop); 0 = the whole clip.
    crop_frames: int = 0
    # Clips shorter than audio.clip_seconds are zero-padded (the audio stage records their
    # valid_samples). True: crops start inside the real audio and the losses count real frames
    # only, so the model does not learn the padding as silence that belongs to the clip.
    # False: the padded clips are trained on as they are (the behaviour before this switch).
    mask_padding: bool = True
    # LFM only, with unet.duration_embedding: each batch cut to a length drawn from the seed and
    # the step, up to the whole clip, and the UNet told its duration (lafma.train.duration).
    variable_duration: bool = False
    # The discriminator's own learning rate (GAN jobs); 0 = lr.
    disc_lr: float = 0.0
    ema_decay: float = 0.9999
    seed: int = 0
    fail_at_step: int = -1
    # Start from these weights instead of a random init (fine-tuning): a bundle directory, a
    # models:/ or runs:/ URI, or a published checkpoint of the job's component
    # (pipelines.train.sources). A resumed run continues from its own checkpoint instead.
    init_from: str = ""

    def validate(self, prefix: str = "train") -> None:
        require(self.steps >= 1 or (self.steps == 0 and bool(self.init_from)), f"{prefix}.steps",
                "must be >= 1 (0 only with init_from: its weights, as they are)")
        require(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        require(self.lr > 0, f"{prefix}.lr", "must be positive")
        require(all(0 <= b < 1 for b in self.betas), f"{prefix}.betas", "must be in [0, 1)")
        require(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        require(0 < self.decay_gamma <= 1, f"{prefix}.decay_gamma", "must be in (0, 1] (the lr factor per decay_every steps)")
        require(self.decay != "exponential" or self.decay_gamma < 1, f"{prefix}.decay_gamma",
                "must be below 1 for decay: exponential (1 never decays: use decay: constant)")
        require(self.decay_every >= 1, f"{prefix}.decay_every", "must be >= 1 (optimiser steps per factor of decay_gamma)")
        require(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.grad_accum >= 1, f"{prefix}.grad_accum", "must be >= 1")
        # ZeRO-3 partitions the weights themselves; the jobs read whole weights (EMA, export,
        # samples) and would need gathering first.
        require(self.zero_stage in (0, 1, 2), f"{prefix}.zero_stage", "must be 0, 1 or 2 (ZeRO-3 is not supported yet)")
        require(self.num_workers >= 1, f"{prefix}.num_workers", "must be >= 1")
        require(self.cpus_per_worker > 0, f"{prefix}.cpus_per_worker", "must be positive")
        require(self.gpus_per_worker >= 0, f"{prefix}.gpus_per_worker", "must be >= 0")
        require(self.max_failures >= 0, f"{prefix}.max_failures", "must be >= 0")
        require(self.checkpoint_every >= 1, f"{prefix}.checkpoint_every", "must be >= 1")
        require(self.log_every >= 1 and self.sample_every >= 1, f"{prefix}.log_every", "must be >= 1")
        require(self.crop_frames >= 0, f"{prefix}.crop_frames", "must be >= 0")
        require(0 <= self.ema_decay < 1, f"{prefix}.ema_decay", "must be in [0, 1)")
        require(self.fail_at_step >= -1, f"{prefix}.fail_at_step", "must be >= -1 (-1: off)")


@dataclass(frozen=True)
class PipelineConfig(LafmaConfig):
    """A model (every :class:`LafmaConfig` section) and the pipeline that trains it."""

    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # The paper: VAE Adam 1e-5, betas (0.5, 0.9); HiFi-GAN AdamW 2e-4, (0.8, 0.99); LFM Adam 1e-4.
    train_vae: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, betas=(0.5, 0.9), crop_frames=1024))
    train_vocoder: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=2e-4, betas=(0.8, 0.99), weight_decay=0.01, crop_frames=32, batch_size=16))
    # The LFM learns the padding: it generates a fixed length, and with nothing to tell it where a
    # clip ends (no unet.duration_embedding) it must learn that short sounds end in silence. Masked,
    # it fills the untrained tail with noise: on 94 real recordings with the demo config, FD 376
    # vs 300 unmasked, text-audio -0.06 vs 0.11 (benchmarks/results/own_data_cpu2.md).
    train_lfm: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, warmup_steps=1000,
                                                                      mask_padding=False))

    def validate(self) -> None:
        super().validate()
        require(self.train_vae.crop_frames % self.vae.downsample == 0, "train_vae.crop_frames",
                 f"must be a multiple of the VAE's downsampling ({self.vae.downsample})")
        require(not self.train_lfm.variable_duration or self.unet.duration_embedding, "train_lfm.variable_duration",
                "needs unet.duration_embedding: true (the UNet must be told each crop's duration)")
        for job in ("train_vae", "train_vocoder"):
            require(not getattr(self, job).variable_duration, f"{job}.variable_duration",
                    "is for the LFM only (train_lfm.variable_duration)")


def load_pipeline_config(path: str | Path | Sequence[str | Path] | None = None,
                         overrides: Sequence[str] = ()) -> PipelineConfig:
    """:func:`lafma.config.load_config` for the whole pipeline (files layer in order)."""
    return load_config(path, overrides, cls=PipelineConfig)
