"""The LFM job with train_lfm.variable_duration, in one process (no Ray, no DeepSpeed): each
step trains the crop drawn from the seed and the step, and the UNet is told its duration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lafma.config import ConfigError
from lafma.train.duration import draw_crop
from pipelines.config import load_pipeline_config
from pipelines.train.data import RankRows
from pipelines.train.engines import PlainEngine
from pipelines.train.lfm import lfm_job
from pipelines.train.loop import JobInputs

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
ON = ["unet.duration_embedding=true", "train_lfm.variable_duration=true", "train_lfm.batch_size=2"]


class Table:
    """A latents table as a dataset every worker reads whole (what RankRows iterates)."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns = columns

    def iter_batches(self, **_):
        yield self.columns


def objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A list column as Ray Data's numpy batches hold it: an object array of arrays."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def latents_table(cfg, n: int = 4) -> Table:
    g = np.random.default_rng(0)
    c, t, f = cfg.latent_shape()
    length = 3  # caption tokens

    def flat(size: int, shift: float = 0.0) -> np.ndarray:
        return objects([g.standard_normal(size).astype(np.float32) + shift for _ in range(n)])

    return Table({"id": np.array([f"clip{i}" for i in range(n)]), "caption_key": np.array([f"k{i}" for i in range(n)]),
                  "mean": flat(c * t * f), "logvar": flat(c * t * f, -4.0), "latent_channels": np.full(n, c),
                  "latent_frames": np.full(n, t), "latent_bins": np.full(n, f), "emb": flat(length * cfg.context_dim),
                  "length": np.full(n, length), "valid_frames": np.array([t, t, 9, t])})


def told(overrides, steps) -> list[tuple[tuple[int, ...], torch.Tensor, float]]:
    """(latent shape, duration) of each step's UNet call, and its loss."""
    cfg = load_pipeline_config(CONFIG, overrides)
    torch.manual_seed(0)
    shard = RankRows(latents_table(cfg), rank=0, world=1, order=("id", "caption_key"))
    job = lfm_job(JobInputs(cfg, shard, torch.device("cpu"), bf16=False, extra={"null_emb": [0.0] * 2 * cfg.context_dim},
                            engine=PlainEngine))
    seen = []
    job.engines["unet"].module.register_forward_pre_hook(
        lambda m, args, kw: seen.append((tuple(args[0].shape), kw.get("duration"))), with_kwargs=True)
    out = []
    for i in steps:
        loss = job.step(next(job.batches), i)["loss/fm"]
        (shape, duration), = seen[-1:]
        out.append((shape, duration, loss))
    return out


def test_each_step_trains_its_drawn_crop_told_its_duration_whenever_it_runs():
    cfg = load_pipeline_config(CONFIG, ON)
    _, frames, _ = cfg.latent_shape()
    steps = (1, 2)
    first = told(ON, steps)
    for i, (shape, duration, loss) in zip(steps, first):
        crop = draw_crop(cfg.train_lfm.seed, i, 2, frames, cfg.unet.downsample)
        assert shape[2] == crop.grid and np.isfinite(loss)
        # mask_padding is off for the LFM by default: every item is told the whole crop.
        torch.testing.assert_close(duration, torch.full((2,), crop.length * cfg.latent_seconds))
    assert first[0][0] != first[1][0]  # the steps cut different lengths
    # A job that starts at step 2 (resumed there) cuts step 2's batch as the first run did.
    (shape, duration, _), = told(ON, steps=(2,))
    assert shape == first[1][0] and torch.equal(duration, first[1][1])


def test_without_variable_duration_the_job_trains_whole_clips():
    cfg = load_pipeline_config(CONFIG)
    (shape, duration, loss), = told([], steps=(1,))
    assert shape[2] == cfg.latent_shape()[1] and duration is None and np.isfinite(loss)
    # The embedding alone: whole clips, told their whole duration.
    (shape, duration, _), = told(["unet.duration_embedding=true"], steps=(1,))
    assert shape[2] == cfg.latent_shape()[1]
    torch.testing.assert_close(duration, torch.full((shape[0],), cfg.audio.clip_seconds))


def test_the_package_gate_scores_a_duration_model_on_whole_clips_told_their_duration():
    from lafma.flow import OTPath, heldout_fm_loss
    from lafma.models import build_unet
    from pipelines.stages.release import heldout_batches

    cfg = load_pipeline_config(CONFIG, ON)
    rows = pa.table({k: list(v) for k, v in latents_table(cfg).columns.items()})
    (x1, cond), = heldout_batches(rows, cfg, torch.device("cpu"))
    torch.testing.assert_close(cond["duration"], torch.full((x1.shape[0],), cfg.audio.clip_seconds))
    assert heldout_fm_loss(build_unet(cfg).eval(), [(x1, cond)], OTPath(), times=1) > 0
    (_, plain), = heldout_batches(rows, load_pipeline_config(CONFIG), torch.device("cpu"))
    assert "duration" not in plain


def test_a_job_fine_tuned_from_a_bundle_gets_its_duration_embedding_and_an_older_one_none(tmp_path):
    import json

    from pipelines.train.sources import resolve_sources
    from tests.lafma.test_bundle import duration_bundle

    (tmp_path / "on").mkdir()
    on = duration_bundle(tmp_path / "on", ["unet.duration_embedding=true"])
    cfg, _ = resolve_sources(load_pipeline_config(CONFIG, [f"train_lfm.init_from={on}"]), str(tmp_path))
    assert cfg.unet.duration_embedding and cfg.max_duration == cfg.audio.clip_seconds
    (tmp_path / "old").mkdir()
    old = Path(duration_bundle(tmp_path / "old"))
    manifest = json.loads((old / "lafma.json").read_text())
    for entry in (manifest["config"], manifest["components"]["unet"]["config"]):
        del entry["unet"]["duration_embedding"]  # as a bundle written before the key existed
    (old / "lafma.json").write_text(json.dumps(manifest))
    cfg, _ = resolve_sources(load_pipeline_config(CONFIG, [f"train_lfm.init_from={old}"]), str(tmp_path))
    assert not cfg.unet.duration_embedding and cfg.max_duration is None


@pytest.mark.parametrize("overrides, key", [
    (["train_lfm.variable_duration=true"], "train_lfm.variable_duration"),  # no embedding to tell
    (["unet.duration_embedding=true", "train_vae.variable_duration=true"], "train_vae.variable_duration"),
    (["unet.duration_embedding=true", "sampler.duration=2.56"], "sampler.duration"),  # past the clips it learns
])
def test_duration_settings_that_cannot_work_fail_at_load(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(CONFIG, overrides)
    assert e.value.key == key
