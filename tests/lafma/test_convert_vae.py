"""Published mel VAEs → MelVAE, checked against diffusers' AutoencoderKL as the reference.

diffusers is an independent implementation of the same network, and its
``convert_ldm_vae_checkpoint`` is its own reading of LDM's key names; so equal outputs check
both the layout mapping and the architecture inferred from the tensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import diffusers  # the reference: a dev dependency, so a missing one fails here rather than skips
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from lafma.convert.checkpoint import CheckpointError
from lafma.convert.vae import convert_vae
from lafma.vae import MelVAE, mel_to_image
from lafma.vae.model import image_to_mel

SMALL = dict(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8)
TOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast on a shared runner and bitwise deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value, so that norms (1, 0) and biases (0) matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _random_melvae(seed: int = 0, **arch) -> MelVAE:
    torch.manual_seed(seed)
    vae = MelVAE(**{**SMALL, **arch})
    _perturb(vae, seed + 1)
    return vae.eval()


def _diffusers_vae(arch: dict, mid_attention: bool = True, scaling_factor: float = 0.9227):
    n = len(arch["ch_mult"])
    return diffusers.AutoencoderKL(
        in_channels=arch["in_channels"], out_channels=arch["in_channels"],
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(arch["ch"] * m for m in arch["ch_mult"]),
        layers_per_block=arch["num_res_blocks"], latent_channels=arch["z_channels"], norm_num_groups=32,
        mid_block_add_attention=mid_attention, scaling_factor=scaling_factor,
    ).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _assert_same(vae: MelVAE, ref, seed: int = 3) -> None:
    """MelVAE on mels (B, n_mels, T) against diffusers on the images AudioLDM feeds it."""
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(2, 16, 24, generator=g)  # (B, n_mels, T)
    z = torch.randn(2, vae.z_channels, 24 // vae.downsample, 16 // vae.downsample, generator=g)
    with torch.no_grad():
        mean = vae.encode(mel).mean
        ref_mean = ref.encode(mel_to_image(mel)).latent_dist.mean
        recon = vae.decode(z)
        ref_recon = image_to_mel(ref.decode(z).sample)
    assert _rel(mean, ref_mean) <= TOL, _rel(mean, ref_mean)
    assert _rel(recon, ref_recon) <= TOL, _rel(recon, ref_recon)


def _from_ldm_names(sd: dict, arch: dict, mid_attention: bool):
    ref = _diffusers_vae(arch, mid_attention)
    ref.load_state_dict(convert_ldm_vae_checkpoint(sd, dict(ref.config)), strict=True)
    return ref


def test_diffusers_directory_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    ref = _diffusers_vae(SMALL)
    _perturb(ref, 1)
    ref.save_pretrained(tmp_path / "vae")  # a pipeline directory's vae/ folder

    out = convert_vae(tmp_path)

    assert out.source == "diffusers"
    assert out.config == {**SMALL, "mid_attention": True, "scale_factor": pytest.approx(0.9227)}
    _assert_same(out.build(), ref)


def test_ldm_checkpoint_matches_diffusers_reading_of_ldm_names(tmp_path):
    vae = _random_melvae()
    sd = vae.state_dict()
    full = {"first_stage_model." + k: v for k, v in sd.items()}
    full["first_stage_model.vocoder.conv_pre.weight"] = torch.zeros(4, 64, 7)  # AudioLDM's HiFi-GAN
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 8, 3, 3)
    full["scale_factor"] = torch.tensor(0.5)
    torch.save({"state_dict": full, "global_step": 7}, tmp_path / "audioldm.ckpt")

    out = convert_vae(tmp_path / "audioldm.ckpt")

    assert out.source == "ldm-checkpoint"
    assert out.config == {**SMALL, "mid_attention": True, "scale_factor": 0.5}
    _assert_same(out.build(), _from_ldm_names(sd, SMALL, mid_attention=True))


def test_released_vaegan_has_no_mid_attention_and_matches_diffusers(tmp_path):
    vae = _random_melvae(mid_attention=False)
    sd = vae.state_dict()
    assert not any(".attn_1." in k for k in sd)
    autoencoder = {**sd, "loss.discriminator.main.0.weight": torch.zeros(8, 1, 4, 4)}
    torch.save({"autoencoder": autoencoder, "discriminator": {"main.0.weight": torch.zeros(8, 1, 4, 4)}},
               tmp_path / "vaegan.pt")

    out = convert_vae(tmp_path / "vaegan.pt")

    assert out.source == "lafma-vaegan"
    assert out.config == {**SMALL, "mid_attention": False, "scale_factor": 1.0}
    # diffusers' convert_ldm_vae_checkpoint takes a mid without attn_1 as it is.
    _assert_same(out.build(), _from_ldm_names(sd, SMALL, mid_attention=False))


def test_mid_attention_false_drops_only_attn_1():
    with_attn, without = MelVAE(**SMALL).state_dict(), MelVAE(**SMALL, mid_attention=False).state_dict()
    attn = {k for k in with_attn if ".attn_1." in k}
    assert {k.split(".attn_1.")[0] for k in attn} == {"encoder.mid", "decoder.mid"}
    assert set(without) == set(with_attn) - attn


@pytest.mark.parametrize("arch", [
    dict(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4),
    dict(in_channels=2, ch=64, ch_mult=(1, 1, 2), num_res_blocks=2, z_channels=8),
])
def test_architecture_is_read_off_the_tensors(tmp_path, arch):
    torch.save(MelVAE(**arch).state_dict(), tmp_path / "vae.pt")
    out = convert_vae(tmp_path / "vae.pt")
    assert out.source == "vae-state-dict"
    assert out.config == {**arch, "mid_attention": True, "scale_factor": 1.0}


@dataclass
class _NotATensor:
    value: int


def test_a_pickled_object_is_refused(tmp_path):
    torch.save({"autoencoder": _NotATensor(1)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="arbitrary pickle"):
        convert_vae(tmp_path / "evil.pt")


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.__setitem__("encoder.mid.extra.weight", torch.zeros(3)), "encoder.mid.extra.weight"),
    (lambda sd: sd.pop("decoder.conv_out.bias"), "decoder.conv_out.bias"),
    (lambda sd: sd.pop("decoder.mid.attn_1.q.weight"), "decoder.mid.attn_1.q.weight"),
])
def test_a_stray_or_missing_key_is_refused_by_name(tmp_path, edit, named):
    sd = MelVAE(**SMALL).state_dict()
    edit(sd)
    torch.save({"autoencoder": sd}, tmp_path / "vae.pt")
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        convert_vae(tmp_path / "vae.pt")


def test_diffusers_norm_groups_other_than_32_are_refused(tmp_path):
    _diffusers_vae(SMALL).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "norm_num_groups": 16}))
    with pytest.raises(CheckpointError, match="norm_num_groups=16"):
        convert_vae(tmp_path)


def test_diffusers_config_that_disagrees_with_the_weights_is_refused(tmp_path):
    _diffusers_vae(SMALL).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    with pytest.raises(CheckpointError, match="describes"):
        convert_vae(tmp_path)


def test_diffusers_bin_with_old_attention_names_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    ref = _diffusers_vae(SMALL)
    _perturb(ref, 1)
    ref.save_pretrained(tmp_path, safe_serialization=False)
    # diffusers before 0.14 saved the attention as query/key/value/proj_attn.
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{old[m.group(1)]}.", k): v
          for k, v in ref.state_dict().items()}
    assert any(".proj_attn." in k for k in sd)
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")

    _assert_same(convert_vae(tmp_path).build(), ref)
