"""The training jobs, one row each: everything that tells the VAE, vocoder and LFM jobs apart.

The driver (:mod:`pipelines.train.launch`), the worker (:mod:`pipelines.train.worker`), the
DAG's training and release stages and the benchmark all look a job up here, so adding a job
or renaming its output is one edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipelines.config import PipelineConfig, TrainConfig
from pipelines.train.lfm import LATENT_DIMS, lfm_job
from pipelines.train.loop import Job, JobInputs
from pipelines.train.vae import vae_job
from pipelines.train.vocoder import vocoder_job


@dataclass(frozen=True)
class JobSpec:
    """One training job.

    Attributes:
        name: the job's name (``vae``, ``vocoder``, ``lfm``).
        section: its :class:`~pipelines.config.TrainConfig` section in the config.
        stage: the DAG stage that trains it.
        component: what it exports: ``<component>.safetensors``, and the bundle's component.
        columns: the Parquet columns it reads from its input stage (``split`` is always read).
        build: builds the job's engines, batch stream and step inside a worker.
        order: columns (also read) that put its rows in one order, whatever order they are read
            in (:class:`~pipelines.train.data.RankRows`).
    """

    name: str
    section: str
    stage: str
    component: str
    columns: tuple[str, ...]
    build: Callable[[JobInputs], Job]
    order: tuple[str, ...] = ("id",)

    @property
    def weights_file(self) -> str:
        """The exported weights' file name, in the stage's output directory."""
        return f"{self.component}.safetensors"

    def train_config(self, cfg: PipelineConfig) -> TrainConfig:
        return getattr(cfg, self.section)


JOBS: dict[str, JobSpec] = {spec.name: spec for spec in (
    JobSpec("vae", section="train_vae", stage="train_vae", component="vae",
            columns=("mel", "n_mels", "frames"), build=vae_job),
    JobSpec("vocoder", section="train_vocoder", stage="train_vocoder", component="vocoder",
            columns=("mel", "n_mels", "frames", "waveform"), build=vocoder_job),
    JobSpec("lfm", section="train_lfm", stage="train_lfm", component="unet",
            columns=("mean", "logvar", *LATENT_DIMS, "emb", "length"), build=lfm_job,
            order=("id", "caption_key")),
)}

