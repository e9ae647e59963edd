"""``lafma import``: published-layout files → a bundle that loads, registers with its sources'
SHA-256, is not promoted without a gate value, and generates through the batch job."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from lafma.bundle import file_sha256, load_bundle
from lafma.unet import UNet
from lafma.vae.model import MelVAE
from lafma.vocoder.hifigan import HiFiGANGenerator
from pipelines import lafma_cli
from pipelines.core import registry, tracking
from pipelines.generation import GenerationSettings, run_generation
from tests.published import (
    perturbed,
    save_tiny_t5,
    write_audioldm_hifigan,
    write_released_lfm,
    write_released_vae,
)

CONFIG = str(Path(__file__).parents[2] / "configs" / "test.yaml")
VOCODER = dict(rates=(5, 4, 2, 2, 2), kernels=(16, 16, 8, 4, 4), initial=32, rk=(3,), rd=((1, 3),))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    d = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    unet = perturbed(UNet(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                          context_dim=32, num_heads=32, extra_attention=True))
    vae = perturbed(MelVAE(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=8, mid_attention=False), seed=1)
    voc = HiFiGANGenerator(upsample_rates=VOCODER["rates"], upsample_kernel_sizes=VOCODER["kernels"],
                           upsample_initial_channel=32, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),),
                           upsample_padding="reference")
    files = {"lfm": write_released_lfm(d / "lafma.ckpt", unet), "vae": write_released_vae(d / "vaegan.ckpt", vae),
             "vocoder": write_audioldm_hifigan(d / "hifigan_16k_64bins.ckpt", voc, **VOCODER),
             "text": save_tiny_t5(d / "flan-t5")}
    return files, {"unet": unet, "vae": vae, "vocoder": voc}


def run_import(files, out: Path, root: Path, *extra: str) -> int:
    return lafma_cli.main(["import", "--lfm", str(files["lfm"]), "--vae", str(files["vae"]), "--vocoder",
                           str(files["vocoder"]), "--text-encoder", str(files["text"]), "--out", str(out),
                           "--config", CONFIG, "--root", str(root), *extra])


def test_import_register_and_generate(published, tmp_path, ray_local):
    files, modules = published
    bundle, root = tmp_path / "bundle", tmp_path / "store"
    assert run_import(files, bundle, root, "--register") == 0

    pipe = load_bundle(str(bundle))
    assert (pipe.grid, pipe.null_caption, pipe.peak) == ("released", "released", 0.8)
    mel = torch.randn(1, 64, 32) - 5
    x, t = torch.randn(2, 8, 16, 16), torch.tensor([0.2, 0.7])
    context = torch.randn(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, context), modules["unet"](x, t, context))
        torch.testing.assert_close(pipe.vae.encode(mel).mean, modules["vae"].encode(mel).mean)
        torch.testing.assert_close(pipe.vocoder(mel), modules["vocoder"](mel))

    client = mlflow.MlflowClient(tracking.tracking_uri(str(root)))
    version = client.get_model_version_by_alias(registry.MODEL_NAME, registry.CANDIDATE)
    assert version.tags["lafma.imported"] == "true"
    assert version.tags["lafma.source.lfm"] == "lafma.ckpt"
    assert version.tags["lafma.source.lfm.sha256"] == file_sha256(str(files["lfm"]))
    assert version.tags["lafma.source.vocoder_config.sha256"] == file_sha256(str(files["vocoder"].with_suffix(".json")))
    decision = registry.gate(root=str(root))
    assert not decision.promoted and "no" in decision.reason and "value" in decision.reason

    captions = tmp_path / "captions.txt"
    captions.write_text("a dog barks twice\nrain on a tin roof\n")
    out = tmp_path / "gen"
    summary = run_generation(str(captions), str(out), GenerationSettings(
        model=f"models:/{registry.MODEL_NAME}/{version.version}", steps=2, batch_size=2, actor_cpus=0.5),
        root=str(root))
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert summary["rows"] == 2 and len(rows) == 2
    for r in rows:
        audio, sr = sf.read(out / r["path"])
        assert sr == 16000 and abs(abs(audio).max() - 0.8) < 1e-3  # the released output peak


def test_import_refuses_a_text_encoder_of_the_wrong_width(published, tmp_path, capsys):
    files, _ = published
    wrong = {**files, "text": save_tiny_t5(tmp_path / "t5-48", dim=48)}
    assert run_import(wrong, tmp_path / "bundle", tmp_path / "store") == 2
    err = capsys.readouterr().err
    assert "unet.context_dim" in err and "48" in err and not (tmp_path / "bundle" / "lafma.json").exists()


def test_import_refuses_a_vocoder_trained_on_other_mels(published, tmp_path, capsys):
    files, _ = published
    assert run_import(files, tmp_path / "bundle", tmp_path / "store", "mel.hop_length=256",
                      "vocoder.upsample_rates=[4,4,4,2,2]") == 2
    assert "mel.hop_length" in capsys.readouterr().err
