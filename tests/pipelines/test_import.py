"""``lafma import``: published-layout files → a bundle that loads, registers with its sources'
SHA-256, is not promoted without a gate value, and generates through the batch job."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="module")
def imported_bundle(published, tmp_path_factory):
    files, _ = published
    out = tmp_path_factory.mktemp("imported") / "bundle"
    assert run_import(files, out, out.parent / "store") == 0
    return out


def test_pretrained_sources_are_refused_when_trained_on_other_mels(imported_bundle, tmp_path):
    from lafma.config import ConfigError
    from pipelines.config import load_pipeline_config
    from pipelines.train.sources import resolve_sources

    cfg = load_pipeline_config(CONFIG, [f"vocoder.pretrained={imported_bundle}", "mel.f_max=7000"])
    with pytest.raises(ConfigError, match="vocoder.pretrained.*mel config"):
        resolve_sources(cfg, str(tmp_path))
    cfg = load_pipeline_config(CONFIG, [f"vae.pretrained={tmp_path / 'missing.ckpt'}"])
    with pytest.raises(ConfigError, match="vae.pretrained.*no such file"):
        resolve_sources(cfg, str(tmp_path))
    # The architecture comes from the weights: the config's VAE has mid attention, the file none.
    cfg = load_pipeline_config(CONFIG, [f"vae.pretrained={imported_bundle}"])
    resolved, sources = resolve_sources(cfg, str(tmp_path))
    assert cfg.vae.mid_attention and not resolved.vae.mid_attention
    assert sources["vae.pretrained"]["format"] == "bundle"


def test_dag_with_imported_vae_and_vocoder_fine_tunes_only_the_lfm(imported_bundle, tmp_path, ray_local):
    from safetensors.torch import load_file

    from pipelines.config import load_pipeline_config
    from pipelines.core.dag import run_dag
    from pipelines.stages import STAGES

    root = tmp_path / "root"
    base = [f"storage.root={root}", f"vae.pretrained={imported_bundle}", f"vocoder.pretrained={imported_bundle}",
            f"train_lfm.init_from={imported_bundle}", "train_lfm.checkpoint_every=2", "train_lfm.sample_every=100",
            "train_lfm.lr=1e-7", "train_lfm.warmup_steps=0", "train_lfm.ema_decay=0.5"]
    reports = {r.name: r for r in run_dag(load_pipeline_config(CONFIG, [*base, "train_lfm.steps=2"]), STAGES,
                                          until="train_lfm")}
    for stage in ("train_vae", "train_vocoder"):
        assert reports[stage].info["imported"] is True and "final_metrics" not in reports[stage].info  # not trained
    bundle = {c: load_file(str(imported_bundle / f"{c}.safetensors")) for c in ("unet", "vae", "vocoder")}
    exported_vae = load_file(reports["train_vae"].info["weights"])
    assert all(torch.equal(exported_vae[k], v) for k, v in bundle["vae"].items())
    # A near-zero learning rate: the LFM's weights are still the imported ones, not a random init.
    lfm = load_file(reports["train_lfm"].info["weights"])
    assert max((lfm[k] - v).abs().max().item() for k, v in bundle["unet"].items()) < 1e-3
    assert reports["train_lfm"].info["steps"] == 2

    # More steps: the same stage resumes from its checkpoint, then packages and registers.
    reports = {r.name: r for r in run_dag(load_pipeline_config(CONFIG, [*base, "train_lfm.steps=4"]), STAGES,
                                          until="package")}
    assert reports["train_lfm"].info["resumed_from"] == 2 and reports["train_lfm"].info["steps"] == 4
    assert reports["train_vae"].status == reports["train_vocoder"].status == "skipped"
    client = mlflow.MlflowClient(tracking.tracking_uri(str(root)))
    version = client.get_model_version(registry.MODEL_NAME, reports["package"].info["model_version"])
    assert version.tags["lafma.vae.pretrained"] == str(imported_bundle)
    assert version.tags["lafma.train_lfm.init_from.sha256"] == file_sha256(str(imported_bundle / "unet.safetensors"))
    assert version.tags["lafma.vocoder.pretrained.format"] == "bundle"
    # ...and, through the imported bundle, the published file it came from.
    assert version.tags["lafma.train_lfm.init_from.origin"].startswith("lafma.ckpt sha256:")

    # Zero steps: the imported LFM as it is, packaged and registered (what evaluating it needs).
    reports = {r.name: r for r in run_dag(load_pipeline_config(CONFIG, [*base, "train_lfm.steps=0"]), STAGES,
                                          until="package")}
    assert reports["train_lfm"].status == "ran" and reports["train_lfm"].info["init_only"] is True
    lfm = load_file(reports["train_lfm"].info["weights"])
    assert all(torch.equal(lfm[k], v) for k, v in bundle["unet"].items())
    assert reports["package"].info["model_version"] != version.version


@pytest.mark.parametrize("job", ["vae", "vocoder", "lfm"])
def test_every_job_starts_from_its_init_weights(job, imported_bundle, tmp_path):
    """train_<job>.init_from reaches the job: its exported weights before any step are the
    source's (for the LFM, its EMA's too)."""
    from safetensors.torch import load_file

    from pipelines.config import load_pipeline_config
    from pipelines.train.engines import PlainEngine
    from pipelines.train.jobs import JOBS
    from pipelines.train.loop import JobInputs
    from pipelines.train.sources import resolve_sources

    spec = JOBS[job]
    cfg, _ = resolve_sources(load_pipeline_config(CONFIG, [f"{spec.section}.init_from={imported_bundle}"]), str(tmp_path))
    weights = load_file(str(imported_bundle / spec.weights_file))
    extra = {"init_weights": str(imported_bundle / spec.weights_file), "null_emb": [0.0] * 32}
    built = spec.build(JobInputs(cfg, shard=None, device=torch.device("cpu"), bf16=False, extra=extra,
                                 engine=PlainEngine))
    final = built.final_weights()
    assert final.keys() == weights.keys()
    assert all(torch.equal(final[k].float(), v) for k, v in weights.items())
    # and without init_from the job starts elsewhere (so the check above could fail)
    fresh = spec.build(JobInputs(cfg, shard=None, device=torch.device("cpu"), bf16=False,
                                 extra={"null_emb": [0.0] * 32}, engine=PlainEngine)).final_weights()
    assert any(not torch.equal(fresh[k].float(), v) for k, v in weights.items())


def test_a_champion_without_a_gate_value_is_beaten_by_an_evaluated_candidate(imported_bundle, tmp_path):
    root = str(tmp_path / "store")
    tracking.configure(root)
    imported = registry.register_imported(str(imported_bundle), root=root, sources={})
    registry.promote(imported.version, root=root, reason="listening test", by="test")
    run_id = tracking.start_run(root=root, experiment="t", run_name="pkg")
    trained = registry.register(str(imported_bundle), root=root, run_id=run_id, gate_metric="fd/aisfx-0.1.2",
                                gate_value=12.5)
    decision = registry.gate(root=root)
    assert decision.promoted and decision.champion == imported.version and "no gate value" in decision.reason
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    assert str(client.get_model_version_by_alias(registry.MODEL_NAME, registry.CHAMPION).version) == trained.version


def test_a_truncated_or_foreign_file_is_not_called_unsafe(tmp_path):
    from lafma.convert.checkpoint import CheckpointError, load_checkpoint

    html = tmp_path / "lafma.ckpt"
    html.write_bytes(b"<html><body>404 Not Found</body></html>")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as err:
        load_checkpoint(str(html))
    assert "arbitrary pickle" not in str(err.value)
    torch.save({"model": {"w": torch.zeros(3)}}, good := tmp_path / "good.ckpt")
    (cut := tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(str(cut))
    os.mkfifo(fifo := tmp_path / "fifo.ckpt")  # opening it for reading would block forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(str(fifo))
    (bad := tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(str(bad))


def test_new_config_fields_at_their_defaults_leave_stage_hashes_unchanged():
    from pipelines.core.stage import digest

    old = {"vae": {"ch": 32}, "train_vae": {"steps": 5}, "sampler": {"steps": 4}}
    new = {"vae": {"ch": 32, "mid_attention": True, "pretrained": ""}, "train_vae": {"steps": 5, "init_from": ""},
           "sampler": {"steps": 4, "grid": "uniform", "null_caption": "masked", "peak": 0.95}}
    assert digest(old) == digest(new)
    assert digest(old) != digest({**new, "vae": {"ch": 32, "mid_attention": False}})
    assert digest(old) != digest({**new, "sampler": {"steps": 4, "grid": "released"}})
    # The real sections, as the stages hash them: the fields added since, at their defaults, vanish.
    from lafma.config import TextConfig, UNetConfig, to_dict

    for section, added in ((TextConfig(), "layers"), (UNetConfig(), "position_channels")):
        fields = to_dict(section)
        assert digest(fields) == digest({k: v for k, v in fields.items() if k != added})
    assert digest(to_dict(TextConfig(layers=(0, -1)))) != digest(to_dict(TextConfig()))
    assert digest(to_dict(UNetConfig(position_channels=True))) != digest(to_dict(UNetConfig()))


def test_a_registered_model_is_a_source_too(published, tmp_path):
    """train_lfm.init_from=models:/lafma/<v>: the version's bundle is downloaded and read."""
    from safetensors.torch import load_file

    from pipelines.config import load_pipeline_config
    from pipelines.train.sources import resolve_sources, source_weights

    files, _ = published
    root = tmp_path / "store"
    assert run_import(files, tmp_path / "bundle", root, "--register") == 0
    cfg = load_pipeline_config(CONFIG, [f"storage.root={root}", "train_lfm.init_from=models:/lafma/1"])
    resolved, sources = resolve_sources(cfg, str(root))
    assert sources["train_lfm.init_from"]["sha256"] == file_sha256(str(tmp_path / "bundle" / "unet.safetensors"))
    assert sources["train_lfm.init_from"]["origin"].startswith("lafma.ckpt sha256:")
    assert resolved.unet.extra_attention and resolved.unet.num_heads == 32 and not cfg.unet.extra_attention
    want = load_file(str(tmp_path / "bundle" / "unet.safetensors"))
    got = source_weights(resolved, "train_lfm.init_from", str(root))
    assert all(torch.equal(got[k], v) for k, v in want.items())
