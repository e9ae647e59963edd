"""A bundle holds a whole generator and refuses components trained on other mels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lafma.bundle import BundleError, check_bundle, file_hashes, load_bundle, write_bundle
from lafma.config import to_dict
from lafma.models import build_pipeline, build_unet, build_vae, build_vocoder
from pipelines.config import load_pipeline_config

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
BUILD = {"unet": build_unet, "vae": build_vae, "vocoder": build_vocoder}


def export(tmp: Path, overrides=()) -> tuple[dict, dict, dict]:
    """Random-weight components exported as the training jobs export them."""
    cfg = load_pipeline_config(CONFIG, list(overrides))
    torch.manual_seed(0)
    modules, weights = {}, {}
    for name, build in BUILD.items():
        modules[name] = build(cfg).eval()
        weights[name] = str(tmp / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in modules[name].state_dict().items()}, weights[name],
                  metadata={"mel_hash": cfg.mel.config_hash(), "component": name})
    return {n: to_dict(cfg) for n in BUILD}, weights, modules


def test_a_bundle_generates_what_its_components_generate(tmp_path):
    components, weights, modules = export(tmp_path)
    manifest = write_bundle(str(tmp_path / "bundle"), components=components, weights=weights, lineage={"run": "x"})
    assert manifest["lineage"] == {"run": "x"} and manifest["text_encoder"]["bundled"] is False  # tiny_t5: rebuilt
    pipe = load_bundle(str(tmp_path / "bundle"))
    cfg = load_pipeline_config(CONFIG)
    direct = build_pipeline(cfg, **modules)
    a = pipe.generate(["a bell rings"], seeds=[3], steps=2).audio
    b = direct.generate(["a bell rings"], seeds=[3], steps=2).audio
    assert torch.allclose(a, b, atol=1e-5)


def duration_bundle(tmp: Path, overrides=()) -> str:
    """A bundle of configs/test.yaml's generator (with ``overrides``), its UNet's weights stirred
    so that its velocity (zero at init) follows the caption and the duration."""
    components, weights, modules = export(tmp, overrides)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in modules["unet"].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cfg = load_pipeline_config(CONFIG, list(overrides))
    save_file({k: v.contiguous() for k, v in modules["unet"].state_dict().items()}, weights["unet"],
              metadata={"mel_hash": cfg.mel.config_hash(), "component": "unet"})
    write_bundle(str(tmp / "bundle"), components=components, weights=weights)
    return str(tmp / "bundle")


def test_a_bundle_with_the_duration_embedding_generates_any_duration_up_to_its_clip_length(tmp_path):
    bundle = duration_bundle(tmp_path, ["unet.duration_embedding=true"])
    assert json.loads((Path(bundle) / "lafma.json").read_text())["config"]["unet"]["duration_embedding"] is True
    pipe = load_bundle(bundle)
    longest = load_pipeline_config(CONFIG).audio.clip_seconds  # 1.28 s: latents of 32 frames
    assert pipe.unet.takes_duration and pipe.max_duration == longest
    told: list[torch.Tensor] = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kw: told.append(kw["duration"]), with_kwargs=True)
    for share, frames in ((0.25, 8), (1.0, 32)):
        told.clear()
        seconds = share * longest
        out = pipe.generate(["a bell rings"], seeds=[3], steps=2, guidance=3.0, duration=seconds)
        assert out.audio.shape == (1, round(seconds * pipe.sample_rate)) and torch.isfinite(out.audio).all()
        assert out.latents.shape[2] == frames == pipe.latent_shape(seconds)[1]
        # Every UNet call, both halves of guidance, is told the duration asked for.
        assert len(told) == 2 and all(torch.equal(d, torch.full((2,), seconds)) for d in told)
    # The duration shapes the clip: two durations on the same latent grid give two clips.
    a = pipe.generate(["a bell rings"], seeds=[3], steps=2, duration=0.30).latents
    b = pipe.generate(["a bell rings"], seeds=[3], steps=2, duration=0.32).latents
    assert a.shape == b.shape and (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"1.5 s is longer than this model's trained maximum, 1.28 s"):
        pipe.generate(["a bell rings"], seeds=[3], steps=2, duration=1.5)


def test_a_bundle_written_before_the_duration_embedding_loads_and_generates_as_before(tmp_path):
    bundle = Path(duration_bundle(tmp_path))
    manifest = json.loads((bundle / "lafma.json").read_text())
    del manifest["config"]["unet"]["duration_embedding"]  # as an older bundle records its UNet
    del manifest["components"]["unet"]["config"]["unet"]["duration_embedding"]
    (bundle / "lafma.json").write_text(json.dumps(manifest))
    pipe = load_bundle(str(bundle))
    assert not pipe.unet.takes_duration and pipe.max_duration is None
    assert not any(k.startswith("duration_embed") for k in pipe.unet.state_dict())
    for seconds in (1.28, 2.56):  # its fixed length, and longer as ever
        assert pipe.generate(["a bell rings"], seeds=[3], steps=2, duration=seconds).audio.shape == (1, round(seconds * 16000))


def test_a_bundle_with_position_channels_builds_them_and_an_older_one_does_not(tmp_path):
    bundle = Path(duration_bundle(tmp_path, ["unet.position_channels=true"]))
    first_conv = "input_blocks.0.0.weight"
    pipe = load_bundle(str(bundle))
    assert pipe.unet.position_channels and pipe.unet.state_dict()[first_conv].shape[1] == 8 + 2
    out = pipe.generate(["a bell rings"], seeds=[3], steps=2).audio
    assert torch.isfinite(out).all() and out.abs().max() > 0
    manifest = json.loads((bundle / "lafma.json").read_text())
    for entry in (manifest["config"], manifest["components"]["unet"]["config"]):
        del entry["unet"]["position_channels"]  # as a bundle written before the key existed
    (bundle / "lafma.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="size mismatch"):  # its weights are not a plain UNet's
        load_bundle(str(bundle))


def test_components_trained_on_other_mels_are_refused_when_written(tmp_path):
    components, weights, _ = export(tmp_path)
    (tmp_path / "b").mkdir()
    other, other_weights, _ = export(tmp_path / "b", ["mel.f_max=7000"])
    with pytest.raises(BundleError, match="vocoder"):
        write_bundle(str(tmp_path / "bundle"), components={**components, "vocoder": other["vocoder"]},
                     weights={**weights, "vocoder": other_weights["vocoder"]})


def test_a_tampered_bundle_is_refused_when_loaded(tmp_path):
    components, weights, _ = export(tmp_path)
    (tmp_path / "c").mkdir()
    _, other_weights, _ = export(tmp_path / "c", ["mel.f_max=7000"])
    bundle = tmp_path / "bundle"
    write_bundle(str(bundle), components=components, weights=weights)
    check_bundle(str(bundle))
    (bundle / "vocoder.safetensors").write_bytes(Path(other_weights["vocoder"]).read_bytes())  # swapped by hand
    with pytest.raises(BundleError, match="vocoder.safetensors has SHA-256"):
        load_bundle(str(bundle))
    # Even with the manifest's hashes rewritten to match, the mels do not.
    manifest = json.loads((bundle / "lafma.json").read_text())
    manifest["files"] = file_hashes(str(bundle))
    manifest["components"]["vocoder"]["sha256"] = manifest["files"]["vocoder.safetensors"]
    (bundle / "lafma.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="vocoder was trained on other mels"):
        load_bundle(str(bundle))
    del manifest["components"]["unet"]
    (bundle / "lafma.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no unet"):
        check_bundle(str(bundle))


def test_a_bundle_written_before_per_file_hashes_is_checked_by_its_components_hashes(tmp_path):
    components, weights, _ = export(tmp_path)
    bundle = tmp_path / "bundle"
    write_bundle(str(bundle), components=components, weights=weights)
    manifest = json.loads((bundle / "lafma.json").read_text())
    assert set(manifest.pop("files")) == {"unet.safetensors", "vae.safetensors", "vocoder.safetensors"}
    (bundle / "lafma.json").write_text(json.dumps(manifest))
    load_bundle(str(bundle))
    data = bytearray((bundle / "unet.safetensors").read_bytes())
    data[-1] ^= 1
    (bundle / "unet.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="unet.safetensors has SHA-256"):
        load_bundle(str(bundle))


def test_a_directory_that_is_not_a_bundle_says_so(tmp_path):
    with pytest.raises(BundleError, match="not a LAFMA bundle"):
        load_bundle(str(tmp_path))


def small_t5_dir(path: Path) -> Path:
    """A 32-wide T5 encoder and the byte tokenizer, as ``save_pretrained`` lays them out."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_bundled_text_encoder_is_copied_whole_and_is_all_the_bundle_needs(tmp_path):
    encoder = small_t5_dir(tmp_path / "t5")
    files = {p.relative_to(encoder): p.read_bytes() for p in encoder.rglob("*") if p.is_file()}
    components, weights, _ = export(tmp_path, ["text.kind=t5", f"text.name_or_path={encoder}"])
    manifest = write_bundle(str(tmp_path / "bundle"), components=components, weights=weights)
    assert manifest["text_encoder"]["bundled"] and manifest["text_encoder"]["source"] == str(encoder)
    copied = tmp_path / "bundle" / "text_encoder"
    assert {p.relative_to(copied): p.read_bytes() for p in copied.rglob("*") if p.is_file()} == files
    # With the source gone, the bundle's copy is what the text encoder and the UNet's width come from.
    encoder.rename(tmp_path / "moved")
    pipe = load_bundle(str(tmp_path / "bundle"))
    assert pipe.text_encoder.dim == 32
    gen = pipe.generate(["a bell rings"], seeds=[3], steps=2)
    assert gen.audio.shape[0] == 1 and torch.isfinite(gen.audio).all()


def test_a_file_slipped_into_a_bundled_text_encoder_is_refused(tmp_path):
    encoder = small_t5_dir(tmp_path / "t5")
    components, weights, _ = export(tmp_path, ["text.kind=t5", f"text.name_or_path={encoder}"])
    bundle = tmp_path / "bundle"
    manifest = write_bundle(str(bundle), components=components, weights=weights)
    assert {f for f in manifest["files"] if f.startswith("text_encoder/")} == {
        f"text_encoder/{p.relative_to(encoder)}" for p in encoder.rglob("*") if p.is_file()}
    # transformers would read custom code or a pickled checkpoint it found there.
    (bundle / "text_encoder" / "modeling_evil.py").write_text("raise SystemExit\n")
    with pytest.raises(BundleError, match="text_encoder/modeling_evil.py is not in the manifest"):
        load_bundle(str(bundle))
    (bundle / "text_encoder" / "modeling_evil.py").unlink()
    del manifest["files"]  # as an older bundle: an unverifiable encoder is refused, and says why
    (bundle / "lafma.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no recorded hashes"):
        load_bundle(str(bundle))
