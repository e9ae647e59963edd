"""The one full DAG run the pipeline tests share (tiny config, real Ray Train, DeepSpeed, MLflow)."""

from __future__ import annotations

from pathlib import Path

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
STEPS = 30
# A GAN vocoder needs more updates than the VAE or the LFM before its mel loss moves clearly.
VOCODER_STEPS = 150
# The VAE job fails once at step 8; its last checkpoint before that is step 5.
FAIL_AT, CKPT_EVERY = 8, 5
# The VAE trains longer on bigger batches (its loss swings with the clips in a batch); its
# discriminator starts at DISC_START: the loss is judged before, the GAN phase after.
VAE_STEPS, VAE_BATCH, DISC_START = 50, 4, 40


def overrides(root: Path, steps: int = STEPS) -> list[str]:
    out = [f"storage.root={root}"]
    for job in ("train_vae", "train_vocoder", "train_lfm"):
        out += [f"{job}.steps={steps}", f"{job}.checkpoint_every={CKPT_EVERY}", f"{job}.sample_every=15"]
    return [*out, f"train_vae.fail_at_step={FAIL_AT}", "train_vae.lr=2e-3", "train_lfm.lr=2e-3",
            f"vae_loss.disc_start={DISC_START}", f"train_vae.steps={VAE_STEPS}", f"train_vae.batch_size={VAE_BATCH}",
            f"train_vocoder.steps={VOCODER_STEPS}", "train_vocoder.sample_every=75", "train_vocoder.checkpoint_every=75",
            "train_vocoder.lr=2e-3", "train_vocoder.crop_frames=32", "evaluate.sweep_steps=[1,2]"]
