"""Variable-duration training: the crop each step draws, the batch it cuts, the loss it counts."""

from __future__ import annotations

from pathlib import Path

import torch

from lafma.flow import OTPath
from lafma.models import build_unet
from lafma.train import lfm_loss
from lafma.train.duration import Crop, crop_latents, draw_crop, mask_seconds
from pipelines.config import load_pipeline_config

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"


def test_the_crop_is_drawn_from_the_seed_and_the_step_and_stays_inside_the_clip():
    frames, multiple, b = 32, 2, 4
    valid = torch.tensor([32, 20, 5, 0])  # latent frames of real audio per clip
    crops = [draw_crop(7, step, b, frames, multiple, valid) for step in range(400)]
    again = [draw_crop(7, step, b, frames, multiple, valid) for step in range(400)]
    assert all(c.length == d.length and torch.equal(c.starts, d.starts) for c, d in zip(crops, again))
    other_seed = [draw_crop(8, step, b, frames, multiple, valid).length for step in range(400)]
    assert other_seed != [c.length for c in crops]
    assert len({c.length for c in crops[:20]}) > 5  # each step its own length
    assert {c.length for c in crops} == set(range(1, frames + 1))  # every length up to the whole clip
    for c in crops:
        assert c.grid % multiple == 0 and c.length <= c.grid < c.length + multiple
        assert ((c.starts >= 0) & (c.starts + c.grid <= frames)).all()
        # Inside the real audio when the clip holds the crop; from 0 when it does not.
        fits = valid >= c.length
        assert (c.starts[fits] + c.length <= valid[fits]).all() and (c.starts[~fits] == 0).all()
    # Starts are drawn too: a long clip is cut at many places.
    assert len({int(c.starts[0]) for c in crops if c.length == 4}) > 3


def test_a_cropped_batch_holds_the_crop_only_and_the_loss_counts_its_real_frames():
    cfg = load_pipeline_config(CONFIG, ["unet.duration_embedding=true"])
    torch.manual_seed(0)
    unet = build_unet(cfg)
    with torch.no_grad():  # a fresh UNet's output layer is zero: its loss would not see its input
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(3, 8, 32, 16, generator=g)  # (B, C, T', F')
    ctx, mask = torch.randn(3, 4, cfg.context_dim, generator=g), torch.ones(3, 4, dtype=torch.bool)
    frame_mask = torch.arange(32) < torch.tensor([32, 32, 9])[:, None]  # the third clip: 9 real frames
    crop = Crop(11, 12, torch.tensor([5, 20, 0]))  # a length the grid (2 frames) must pad, at known places

    def loss(latents: torch.Tensor, seconds: torch.Tensor | None = None) -> torch.Tensor:
        x, m = crop_latents(latents, crop, frame_mask)
        told = mask_seconds(m, cfg.latent_seconds) if seconds is None else seconds
        return lfm_loss(unet, x, ctx, mask, path=OTPath(), null_context=ctx[:1], null_mask=mask[:1], cond_dropout=0.0,
                        generator=torch.Generator().manual_seed(2), frame_mask=m, duration=told)[0]

    x, m = crop_latents(x1, crop, frame_mask)
    assert x.shape == (3, 8, 12, 16) and torch.equal(x[1, :, :11], x1[1, :, 20:31])
    assert (x[:, :, 11:] == 0).all() and (x[2, :, 9:] == 0).all()  # past the crop or the real audio: zeros
    assert m.sum(1).tolist() == [11, 11, 9]  # the third clip's real audio ends inside the crop
    torch.testing.assert_close(mask_seconds(m, cfg.latent_seconds), torch.tensor([0.44, 0.44, 0.36]))
    ref = loss(x1)
    # Whatever lies outside each crop, or past a clip's real audio, changes nothing ...
    outside = x1.clone()
    outside[0, :, :5], outside[0, :, 16:] = 50.0, -50.0
    outside[1, :, :20], outside[1, :, 31:] = 50.0, -50.0
    outside[2, :, 9:] = 50.0
    assert torch.equal(loss(outside), ref)
    # ... while a frame inside does, and so does the duration the UNet is told.
    inside = x1.clone()
    inside[1, :, 25] += 1.0
    assert not torch.equal(loss(inside), ref)
    assert not torch.equal(loss(x1, torch.full((3,), 1.28)), ref)


def test_a_crop_of_the_whole_clip_is_the_clip():
    x1 = torch.randn(2, 8, 16, 4)
    crop = Crop(16, 16, torch.zeros(2, dtype=torch.long))
    x, m = crop_latents(x1, crop)
    assert torch.equal(x, x1) and m.all()
