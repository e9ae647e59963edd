import hashlib

import pytest
import torch

from lafma.config import UNetConfig
from lafma.flow import OTPath, flow_matching_loss, solve
from lafma.unet import UNet, positions


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("extra, expected", [(False, 188e6), (True, 273e6)])
def test_paper_unet_parameter_count(extra, expected):
    with torch.device("meta"):  # shapes only: no memory, no init time
        unet = UNet.from_config(UNetConfig(extra_attention=extra), context_dim=1024, time_scale=999.0)
    assert abs(count(unet) / expected - 1) < 0.05, count(unet)


def tiny_unet(**kw) -> UNet:
    args = dict(in_channels=8, out_channels=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(1, 2), num_head_channels=16, context_dim=12)
    args.update(kw)
    return UNet(**args)


def randomise(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # The zero-initialised output layers would hide every effect of attention: undo them.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def test_shapes_and_divisibility():
    unet = tiny_unet().eval()
    x = torch.randn(2, 8, 16, 8)
    assert unet(x, torch.rand(2), torch.randn(2, 3, 12)).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        unet(torch.randn(1, 8, 15, 8), torch.rand(1), torch.randn(1, 3, 12))


def test_masked_text_tokens_do_not_change_the_output():
    unet = randomise(tiny_unet()).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 8, 8, 8, generator=g), torch.rand(1, generator=g)
    ctx = torch.randn(1, 3, 12, generator=g)
    mask = torch.ones(1, 3, dtype=torch.bool)
    # The same caption padded with 5 garbage tokens that the mask hides.
    padded = torch.cat([ctx, 100 * torch.randn(1, 5, 12, generator=g)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        ref = unet(x, t, ctx, mask)
        torch.testing.assert_close(unet(x, t, padded, padded_mask), ref, atol=1e-5, rtol=1e-5)
        # ...while a visible token does matter, and so would the garbage without the mask.
        assert (unet(x, t, ctx + 0.5, mask) - ref).abs().max() > 1e-3
        assert (unet(x, t, padded, torch.ones(1, 8, dtype=torch.bool)) - ref).abs().max() > 1e-3


def test_pooled_context_reaches_every_block_without_cross_attention():
    """With ``pooled_context`` the caption conditions the res blocks through the time embedding:
    with every cross-attention silenced the output still depends on the caption (and not on
    masked padding); without it, silenced cross-attention leaves the caption no way in."""
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 8, 8, 8, generator=g), torch.rand(1, generator=g)
    ctx, other = torch.randn(1, 3, 12, generator=g), torch.randn(1, 3, 12, generator=g)
    mask = torch.ones(1, 3, dtype=torch.bool)
    padded = torch.cat([ctx, 100 * torch.randn(1, 4, 12, generator=g)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)], dim=1)
    for pooled, depends in ((True, True), (False, False)):
        unet = randomise(tiny_unet(pooled_context=pooled)).eval()
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if ".attn2.to_out" in name:  # no cross-attention output at all
                    p.zero_()
            ref = unet(x, t, ctx, mask)
            assert ((unet(x, t, other, mask) - ref).abs().max() > 1e-3) == depends
            torch.testing.assert_close(unet(x, t, padded, padded_mask), ref, atol=1e-5, rtol=1e-5)
    assert not any("context_embed" in k for k in tiny_unet().state_dict())  # the paper's layout is unchanged


def test_without_the_duration_embedding_the_unet_is_the_one_before_it():
    """Its layers, initial weights and outputs, recorded before the embedding existed: bundles
    and published weights load and generate as they did."""
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    keys = list(unet.state_dict())
    assert len(keys) == 286 and count(unet) == 1_043_272
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] == "02810fe4fcbe8c7a"
    with torch.no_grad():
        assert abs(sum(float(p.double().sum()) for p in unet.parameters()) - 2478.9215487773968) < 1e-6
    unet = randomise(tiny_unet()).eval()
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 8, 8, 8, generator=g), torch.rand(2, generator=g), torch.randn(2, 3, 12, generator=g)
    with torch.no_grad():
        out = unet(x, t, ctx, torch.ones(2, 3, dtype=torch.bool)).double()
    recorded = (-46.17252739147807, 98.21201976457087, 13.914728751796197)  # sum, |sum|, sum of squares
    torch.testing.assert_close((out.sum().item(), out.abs().sum().item(), out.pow(2).sum().item()), recorded,
                               rtol=1e-5, atol=1e-5)
    assert not unet.takes_duration
    with pytest.raises(ValueError, match="no duration embedding"):
        unet(x, t, ctx, duration=torch.ones(2))


def test_the_duration_embedding_conditions_every_block_and_adds_only_its_own_layers():
    torch.manual_seed(0)
    plain = tiny_unet().eval()
    torch.manual_seed(0)
    timed = tiny_unet(duration_embedding=True).eval()
    own = {k: v for k, v in timed.state_dict().items() if not k.startswith("duration_embed.")}
    # Built last: every other layer has the weights it has without the embedding.
    assert list(own) == list(plain.state_dict()) and len(own) < len(timed.state_dict())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in own.items())
    randomise(timed)
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 8, 8, 8, generator=g), torch.rand(2, generator=g), torch.randn(2, 3, 12, generator=g)
    with torch.no_grad():
        short, long = timed(x, t, ctx, duration=torch.full((2,), 2.5)), timed(x, t, ctx, duration=torch.full((2,), 10.0))
        assert (short - long).abs().max() > 1e-3
        # Per item: each one's duration shapes its own output only.
        mixed = timed(x, t, ctx, duration=torch.tensor([2.5, 10.0]))
        torch.testing.assert_close(mixed[0], short[0])
        torch.testing.assert_close(mixed[1], long[1])
        # One value for the batch is everyone's.
        torch.testing.assert_close(timed(x, t, ctx, duration=torch.tensor(2.5)), short)
        # It enters through the time embedding alone: silenced, the UNet is the plain one.
        plain.load_state_dict(own)
        timed.duration_embed[-1].weight.zero_()
        timed.duration_embed[-1].bias.zero_()
        torch.testing.assert_close(timed(x, t, ctx, duration=torch.full((2,), 2.5)), plain(x, t, ctx))
    with pytest.raises(ValueError, match="pass duration"):
        timed(x, t, ctx)


def test_position_channels_tell_the_middle_of_a_clip_from_its_other_places():
    """On an input that is the same everywhere, a UNet's output far from the edges is the same
    at every frame (convolutions, GroupNorm and attention are blind to place there), so it
    cannot put low notes first and high notes last; with the position channels it differs
    frame to frame and band to band."""
    torch.manual_seed(0)
    x, t, ctx = torch.full((1, 8, 128, 64), 0.3), torch.tensor([0.5]), torch.randn(1, 3, 12)
    for placed in (False, True):
        unet = randomise(tiny_unet(position_channels=placed)).eval()
        with torch.no_grad():
            out = unet(x, t, ctx)[0]  # (C, T', F')
        frames, bands = out[:, 60:68:2, 28:36], out[:, 60, 28:36:2]  # the interior, a downsample step apart
        steps = [(frames - frames[:, :1]).abs().max(), (bands - bands[:, :1]).abs().max()]
        assert all(s > 1e-3 for s in steps) if placed else all(s < 1e-5 for s in steps), steps
    # The two channels: time, then frequency, from -1 at the start (lowest band) to 1.
    pos = positions(torch.zeros(2, 8, 4, 3))
    assert pos.shape == (2, 2, 4, 3)
    torch.testing.assert_close(pos[1, 0, :, 2], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    torch.testing.assert_close(pos[0, 1, 3], torch.tensor([-1.0, 0.0, 1.0]))
    # Only the first convolution changes: two more input channels.
    torch.manual_seed(0)
    plain = tiny_unet().state_dict()
    torch.manual_seed(0)
    placed = tiny_unet(position_channels=True).state_dict()
    assert list(placed) == list(plain)
    assert [k for k in plain if placed[k].shape != plain[k].shape] == ["input_blocks.0.0.weight"]
    assert placed["input_blocks.0.0.weight"].shape[1] == plain["input_blocks.0.0.weight"].shape[1] + 2


def test_time_scale_is_applied():
    unet = randomise(tiny_unet(time_scale=999.0)).eval()
    unscaled = randomise(tiny_unet(time_scale=1.0)).eval()
    x, ctx, t = torch.randn(1, 8, 8, 8), torch.randn(1, 2, 12), torch.tensor([0.5])
    with torch.no_grad():
        assert (unet(x, t, ctx) - unscaled(x, t, ctx)).abs().max() > 1e-3
        unscaled.time_scale = 999.0
        torch.testing.assert_close(unet(x, t, ctx), unscaled(x, t, ctx))


@pytest.mark.slow
def test_lfm_overfits_one_latent_and_samples_it_from_noise():
    torch.manual_seed(0)
    unet = tiny_unet(attention_resolutions=(2,))
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 8, 8, 8, generator=g).repeat(8, 1, 1, 1)  # one latent, a batch of 8 draws
    ctx, mask = torch.randn(1, 3, 12, generator=g).repeat(8, 1, 1), torch.ones(8, 3, dtype=torch.bool)
    path = OTPath(0.0)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        loss = flow_matching_loss(unet, x1, path, generator=g, context=ctx, context_mask=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first / 5, (first, last)
    unet.eval()
    noise = torch.randn(2, 8, 8, 8, generator=g)
    sample = solve(unet, noise, method="euler", steps=20, context=ctx[:2], context_mask=mask[:2]).x
    rel = ((sample - x1[:2]).norm() / x1[:2].norm()).item()
    start = ((noise - x1[:2]).norm() / x1[:2].norm()).item()
    assert rel < 0.25 and rel < start / 5, (rel, start)
