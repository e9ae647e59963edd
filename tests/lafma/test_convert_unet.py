"""The released LAFMA UNet layout imports exactly: checked against diffusers' own reading of
LDM's ``openaimodel`` keys (``convert_ldm_unet_checkpoint`` → ``UNet2DConditionModel``)."""

from __future__ import annotations

import re

import diffusers  # the reference: a dev dependency, so a missing one fails here rather than skips
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from lafma.convert.checkpoint import CheckpointError
from lafma.convert.unet import convert_unet
from lafma.unet import UNet
from tests.published import ldm_unet_keys as ldm_keys

ARCH = dict(in_channels=8, out_channels=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(2,), context_dim=16)
HEADS = 4


def random_unet(extra: bool = False, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(**ARCH, num_heads=HEADS, extra_attention=extra, time_scale=999.0)
    with torch.no_grad():
        for p in unet.parameters():  # zero-initialised output convs would hide a wrong mapping
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def released_file(tmp_path, unet: UNet, name: str = "lfm.ckpt") -> str:
    path = str(tmp_path / name)
    torch.save({"model": {"unet." + k: v for k, v in ldm_keys(unet.state_dict()).items()}}, path)
    return path


def diffusers_unet(ldm_sd: dict) -> torch.nn.Module:
    config = dict(sample_size=None, in_channels=8, out_channels=8, layers_per_block=1,
                  block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                  attention_head_dim=HEADS,  # diffusers' name for LDM's (legacy) number of heads
                  flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32)
    model = diffusers.UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm_sd.items()}, config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 8, 4, generator=g)
    t = torch.tensor([0.3, 0.9])
    context = torch.randn(2, 5, 16, generator=g)
    return x, t, context


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_released_unet_imports_and_matches_diffusers(tmp_path):
    source = random_unet()
    converted = convert_unet(released_file(tmp_path, source), num_heads=HEADS)
    assert converted.source == "lafma-released"
    assert converted.config == {**ARCH, "transformer_depth": 1, "use_scale_shift_norm": False,
                                "extra_attention": False, "num_heads": HEADS}
    unet = UNet(**converted.config, time_scale=999.0).eval()
    unet.load_state_dict(converted.state_dict, strict=True)
    reference = diffusers_unet(ldm_keys(source.state_dict()))
    x, t, context = inputs()
    with torch.no_grad():
        ours = unet(x, t, context, torch.ones(2, 5, dtype=torch.bool))
        want = reference(x, t * 999, encoder_hidden_states=context).sample
    assert rel_err(ours, want) <= 1e-5
    # The mask is this project's addition: with padding masked the output changes.
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        assert rel_err(unet(x, t, context, mask)[0], want[0]) > 1e-3


def test_head_split_is_part_of_the_contract(tmp_path):
    """The legacy split (32 heads, whatever the width) is not in the shapes: a wrong
    num_heads loads without error and gives another function."""
    source = random_unet()
    path = released_file(tmp_path, source)
    wrong = convert_unet(path, num_heads=1)
    unet = UNet(**wrong.config, time_scale=999.0).eval()
    unet.load_state_dict(wrong.state_dict, strict=True)
    reference = diffusers_unet(ldm_keys(source.state_dict()))
    x, t, context = inputs()
    with torch.no_grad():
        assert rel_err(unet(x, t, context), reference(x, t * 999, encoder_hidden_states=context).sample) > 1e-3


def test_extra_attention_layer_is_read_and_runs_before_the_main_transformer(tmp_path):
    source = random_unet(extra=True)
    converted = convert_unet(released_file(tmp_path, source), num_heads=HEADS)
    assert converted.config["extra_attention"] is True
    unet = UNet(**converted.config, time_scale=999.0).eval()
    unet.load_state_dict(converted.state_dict, strict=True)
    # With the extra transformers' residual branch zeroed they are the identity, and the rest
    # is diffusers' reading of the same file without them (the main transformer moved to .1).
    ldm = ldm_keys(source.state_dict())
    sites = {m.group(1) for k in ldm if (m := re.match(r"((?:input|output)_blocks\.\d+|middle_block)\.2\.norm", k))}
    assert len(sites) == 4  # ARCH attends at ds 2: input block 3, the middle, output blocks 0 and 1
    silenced = {}
    for k, v in ldm.items():
        site = next((s for s in sites if k.startswith(s + ".1.")), None)
        silenced[k] = torch.zeros_like(v) if site and ".1.proj_out." in k else v
    unet.load_state_dict(convert_unet_from(tmp_path, silenced).state_dict, strict=True)
    without = {}
    for k, v in silenced.items():
        site = next((s for s in sites if k.startswith(s + ".")), None)
        if site:
            index, rest = k[len(site) + 1:].split(".", 1)
            if index == "1":
                continue
            k = f"{site}.{int(index) - (int(index) > 1)}.{rest}"  # later layers move up one
        without[k] = v
    reference = diffusers_unet(without)
    x, t, context = inputs()
    with torch.no_grad():
        assert rel_err(unet(x, t, context), reference(x, t * 999, encoder_hidden_states=context).sample) <= 1e-5
        # and with its own weights the extra layer changes the output
        unet.load_state_dict(converted.state_dict, strict=True)
        assert rel_err(unet(x, t, context), reference(x, t * 999, encoder_hidden_states=context).sample) > 1e-3


def convert_unet_from(tmp_path, ldm_sd: dict):
    path = str(tmp_path / "silenced.ckpt")
    torch.save({"model": {"unet." + k: v for k, v in ldm_sd.items()}}, path)
    return convert_unet(path, num_heads=HEADS)


def test_architecture_is_read_from_shapes(tmp_path):
    torch.manual_seed(0)
    arch = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 3), num_res_blocks=2,
                attention_resolutions=(4, 2), context_dim=24, transformer_depth=2, use_scale_shift_norm=True)
    unet = UNet(**arch, num_heads=2)
    path = str(tmp_path / "ldm.ckpt")
    sd = {"model.diffusion_model." + k: v for k, v in ldm_keys(unet.state_dict()).items()}
    torch.save({"state_dict": {**sd, "first_stage_model.encoder.conv_in.weight": torch.zeros(1)}}, path)
    converted = convert_unet(path, num_heads=2)
    assert converted.source == "ldm"
    assert converted.config == {**arch, "extra_attention": False, "num_heads": 2}
    UNet(**converted.config).load_state_dict(converted.state_dict, strict=True)


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_a_pickle_with_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.ckpt")
    torch.save({"model": {"unet.input_blocks.0.0.weight": torch.zeros(1)}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="arbitrary pickle"):
        convert_unet(path)


def test_not_a_unet_is_refused(tmp_path):
    path = str(tmp_path / "vae.ckpt")
    torch.save({"autoencoder": {"encoder.conv_in.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="expected a state dict under 'model'"):
        convert_unet(path)
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="no UNet"):
        convert_unet(path)
