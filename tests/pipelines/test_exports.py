"""What the DAG exports is what it trained, and what it packages generates as configured.

* The LFM that leaves training (the ``train_lfm`` stage's safetensors, the bundle's UNet) is the
  EMA the job checkpointed last, not the raw weights DeepSpeed optimised.
* Every component rebuilds from the config saved with it, through the project's builders,
  with a strict load: no key left over, none missing, no shape guessed.
* At inference (:meth:`lafma.pipeline.LafmaPipeline.generate`), the guidance weight reaches the
  ODE, the empty caption is its own unconditional input, and the adaptive solver runs and
  counts its evaluations.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lafma.bundle import read_bundle_manifest
from lafma.config import LafmaConfig, from_dict, model_sections
from lafma.models import build_pipeline, build_unet, build_vae, build_vocoder
from lafma.text import build_text_encoder
from pipelines.config import load_pipeline_config
from pipelines.core.checkpointing import STATE_FILE

CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
BUILD = {"unet": build_unet, "vae": build_vae, "vocoder": build_vocoder}
STAGE_OF = {"unet": "train_lfm", "vae": "train_vae", "vocoder": "train_vocoder"}
EMA_PREFIX = "model."  # lafma.train.EMA keeps its copy as the sub-module ``model``


# --- (a) the exported LFM is the EMA -----------------------------------------------------------


def lfm_checkpoint(root: Path, lfm_dir: str, step: int) -> Path:
    """The train_lfm job's Ray Train checkpoint of ``step``: the run is named like the stage's
    output directory (``train_lfm-<stage hash>``)."""
    path = root / "ray_results" / Path(lfm_dir).name / f"checkpoint_{step:09d}"
    assert path.is_dir(), f"no step-{step} checkpoint of the LFM job: {sorted(path.parent.glob('checkpoint_*'))}"
    return path


def checkpointed_unet(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The EMA weights the job state holds, and the raw (optimised, not averaged) weights
    DeepSpeed saved for the same step."""
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    ema_state = state["extra"]["ema"]
    assert int(ema_state["num_updates"]) == state["step"]  # one EMA update per optimiser step
    ema = {k[len(EMA_PREFIX):]: v for k, v in ema_state.items() if k.startswith(EMA_PREFIX)}
    tag = (checkpoint / "unet" / "latest").read_text().strip()
    saved = torch.load(checkpoint / "unet" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    assert int(saved["global_steps"]) == state["step"]
    return ema, saved["module"]


def assert_is_ema(weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], raw: dict[str, torch.Tensor],
                  what: str) -> None:
    assert set(weights) == set(ema) == set(raw), what
    for k in ema:
        torch.testing.assert_close(weights[k], ema[k].float(), rtol=0, atol=0, msg=f"{what} != EMA at {k}")
    # ...and the EMA is not the raw weights: after 30 updates its warm-up decay (31/40) still
    # weighs the earlier weights in, so (nearly) every trained tensor differs.
    floats = [k for k in ema if ema[k].is_floating_point()]
    differs = [k for k in floats if not torch.equal(ema[k].float(), raw[k].float())]
    assert len(differs) >= 0.9 * len(floats), f"{what}: only {len(differs)} of {len(floats)} tensors differ from raw"
    gap = torch.sqrt(sum(((ema[k].float() - raw[k].float()) ** 2).sum() for k in floats))
    size = torch.sqrt(sum((raw[k].float() ** 2).sum() for k in floats))
    assert gap > 1e-3 * size, f"{what}: the EMA is within {float(gap / size):.2g} of the raw weights"


@pytest.mark.slow
def test_the_exported_and_packaged_unet_is_the_checkpointed_ema_not_the_raw_weights(trained):
    root, cfg, reports = trained
    lfm_dir = reports["train_lfm"].path
    # The package was made from the export at the steps the DAG trained; the export itself is
    # at the steps its result.json records (more, should a test have resumed the job since).
    packaged_at = reports["train_lfm"].info["steps"]
    assert packaged_at == cfg.train_lfm.steps
    exported_at = json.loads(Path(lfm_dir, "result.json").read_text())["step"]
    ema, raw = checkpointed_unet(lfm_checkpoint(Path(root), lfm_dir, exported_at))
    assert_is_ema(load_file(os.path.join(lfm_dir, "unet.safetensors")), ema, raw, "train_lfm's export")
    ema, raw = checkpointed_unet(lfm_checkpoint(Path(root), lfm_dir, packaged_at))
    assert_is_ema(load_file(os.path.join(reports["package"].info["bundle"], "unet.safetensors")), ema, raw,
                  "the bundle's UNet")


# --- (b) every component rebuilds from its own config, strictly ---------------------------------


def strict_build(component: str, cfg: LafmaConfig, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    module = BUILD[component](cfg)
    result = module.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    own = module.state_dict()
    for k, v in weights.items():  # the load copied the file's values, not only its names
        assert torch.equal(own[k], v.to(own[k].dtype)), k
    return module


@pytest.mark.slow
@pytest.mark.parametrize("component", list(BUILD))
def test_each_trained_component_rebuilds_strictly_from_its_exported_config(trained, component):
    _, _, reports = trained
    out = reports[STAGE_OF[component]].path
    exported = json.loads(Path(out, "config.json").read_text())
    cfg = from_dict(LafmaConfig, model_sections(exported["config"]))
    file = os.path.join(out, f"{component}.safetensors")
    with safe_open(file, framework="pt") as f:
        meta = f.metadata()
    # The file, its config.json and the config it rebuilds from name the same mels.
    assert meta["component"] == component == exported["component"]
    assert meta["mel_hash"] == exported["mel_hash"] == cfg.mel.config_hash()
    strict_build(component, cfg, load_file(file))


@pytest.mark.slow
def test_each_bundled_component_rebuilds_strictly_from_the_bundle_manifest(trained):
    """The bundle's own record of each component (``lafma.json``) builds it, through the same
    builders, with a strict load; a tiny_t5 text encoder is not bundled but rebuilt from its seed,
    and must then give the very embeddings the text stage stored and the LFM trained on."""
    _, _, reports = trained
    bundle = reports["package"].info["bundle"]
    manifest = read_bundle_manifest(bundle)
    base = model_sections(manifest["config"])
    for component in BUILD:
        entry = manifest["components"][component]
        cfg = from_dict(LafmaConfig, {**base, **entry["config"]})
        strict_build(component, cfg, load_file(os.path.join(bundle, entry["file"])))
    text = manifest["text_encoder"]
    # The test config's tiny_t5 is referenced, not bundled (a bundled one: the test below).
    assert text["kind"] == "tiny_t5" and text["bundled"] is False
    cfg = from_dict(LafmaConfig, {**base, "text": {k: v for k, v in text.items() if k != "bundled"}})
    encoder = build_text_encoder(cfg.text)
    stored = pq.read_table(glob.glob(os.path.join(reports["text"].path, "*.parquet"))[0],
                           columns=["caption", "emb", "length"]).to_pylist()[:4]
    for row in stored:
        emb, mask = encoder([row["caption"]])
        n = int(mask.sum())
        assert n == row["length"], row["caption"]
        np.testing.assert_allclose(emb[0, :n].numpy().reshape(-1), np.asarray(row["emb"], np.float32),
                                   rtol=1e-5, atol=1e-5, err_msg=f"text encoder differs on {row['caption']!r}")


def bundle_with_a_text_encoder(tmp: Path) -> tuple[Path, Path]:
    """A bundle of random components whose (small, local) T5 text encoder is copied in, and the
    encoder's source directory."""
    from safetensors.torch import save_file
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    from lafma.bundle import write_bundle
    from lafma.config import to_dict

    source = tmp / "t5"
    config = T5Config(vocab_size=len(tokenizer := ByT5Tokenizer()), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                      num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T5EncoderModel(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    cfg = load_pipeline_config(CONFIG, ["text.kind=t5", f"text.name_or_path={source}"])
    weights = {}
    for name, build in BUILD.items():
        weights[name] = str(tmp / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in build(cfg).state_dict().items()}, weights[name],
                  metadata={"mel_hash": cfg.mel.config_hash(), "component": name})
    write_bundle(str(tmp / "bundle"), components={n: to_dict(cfg) for n in BUILD}, weights=weights)
    return tmp / "bundle", source


def test_a_bundled_text_encoder_loads_strictly_or_not_at_all(tmp_path):
    """``transformers`` fills a missing tensor with random values and only logs it: the bundle
    checks the encoder against its files, as ``load_state_dict(strict=True)`` would."""
    from safetensors.torch import save_file

    from lafma.bundle import BundleError, load_bundle

    bundle, source = bundle_with_a_text_encoder(tmp_path)
    reference = build_text_encoder(load_pipeline_config(CONFIG, ["text.kind=t5", f"text.name_or_path={source}"]).text)
    emb, mask = load_bundle(str(bundle)).text_encoder(["a bell rings"])
    want, want_mask = reference(["a bell rings"])
    assert torch.equal(mask, want_mask) and torch.equal(emb, want)  # tied embeddings and all
    file = bundle / "text_encoder" / "model.safetensors"
    good = load_file(file)
    dropped = "encoder.block.0.layer.0.SelfAttention.k.weight"
    save_file({k: v for k, v in good.items() if k != dropped}, file, metadata={"format": "pt"})
    with pytest.raises(BundleError, match="text_encoder/model.safetensors has SHA-256"):
        load_bundle(str(bundle))  # changed after the bundle was written
    # A bundle written from an encoder directory that was already incomplete: its hashes match.
    rehash(bundle)
    with pytest.raises(BundleError, match=f"{dropped} \\(missing from the files\\)"):
        load_bundle(str(bundle))
    save_file({**good, "encoder.extra.weight": torch.zeros(3)}, file, metadata={"format": "pt"})
    rehash(bundle)
    with pytest.raises(BundleError, match="encoder.extra.weight \\(not in the model\\)"):
        load_bundle(str(bundle))


def rehash(bundle) -> None:
    """Record the bundle's files as they are now, as write_bundle would have."""
    from lafma.bundle import MANIFEST, file_hashes

    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"] = file_hashes(str(bundle))
    (bundle / MANIFEST).write_text(json.dumps(manifest))


# --- (c) guidance and solvers at the pipeline level --------------------------------------------

CAPTION = "a cello plays a low note"
DURATION = 0.64
SEED = 7


@pytest.fixture(scope="module")
def random_pipe():
    """The test config's pipeline with every UNet weight random. A freshly built UNet's output
    convolution (and its attention projections) start at zero, as in LDM: its velocity is 0 for
    any caption, so guidance could change nothing and a guidance test would pass vacuously."""
    cfg = load_pipeline_config(CONFIG)
    torch.manual_seed(0)
    pipe = build_pipeline(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            # At 0.05 the caption moves the latents by ~1e-3 of their size; at 0.1 by ~3 %.
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pipe


def velocities(pipe, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's conditional and unconditional velocity at one (noise, t) point."""
    x = pipe.noise([SEED], pipe.latent_shape(DURATION))
    t = torch.full((1,), 0.5)
    ctx, mask = pipe.text_encoder([caption])
    null_ctx, null_mask = pipe.null_condition(mask)
    with torch.no_grad():
        return pipe.unet(x, t, context=ctx, context_mask=mask), pipe.unet(x, t, context=null_ctx, context_mask=null_mask)


def test_a_random_unet_tells_a_caption_from_the_empty_one(random_pipe):
    """What makes the guidance test below able to fail: u(c) and u(∅) differ for a caption."""
    v_cond, v_uncond = velocities(random_pipe, CAPTION)
    assert (v_cond - v_uncond).abs().max() > 0.05 * v_cond.abs().max()
    fresh = build_pipeline(load_pipeline_config(CONFIG))  # zero-initialised outputs: no signal at all
    v_cond, v_uncond = velocities(fresh, CAPTION)
    assert v_cond.abs().max() == 0 and v_uncond.abs().max() == 0


@pytest.mark.parametrize("null_caption", ["masked", "released"])
def test_guidance_changes_the_audio_except_for_the_empty_caption(random_pipe, null_caption):
    """u = w·u(c) + (1 − w)·u(∅): w = 1 and w = 3 differ for a caption, and coincide for "",
    whose conditional branch is the unconditional one (for both unconditional inputs: the
    masked empty caption, and the released sampler's "" padded to the caption's length)."""
    cfg = load_pipeline_config(CONFIG, [f"sampler.null_caption={null_caption}"])
    p = random_pipe
    pipe = build_pipeline(cfg, text_encoder=p.text_encoder, unet=p.unet, vae=p.vae, vocoder=p.vocoder)
    kw = dict(seeds=[SEED], duration=DURATION, steps=3, solver="euler")
    one, three = (pipe.generate([CAPTION], guidance=w, **kw) for w in (1.0, 3.0))
    assert three.nfe == 2 * one.nfe == 6  # guidance evaluates both branches
    moved_latents = (three.latents - one.latents).abs().max()
    moved_audio = (three.audio - one.audio).abs().max()
    assert moved_latents > 1e-2 * one.latents.abs().max()
    # A random HiFi-GAN renders mostly its own biases: the audio moves ~1e-3 (at peak 0.95).
    assert moved_audio > 1e-4
    v_cond, v_uncond = velocities(pipe, "")
    torch.testing.assert_close(v_cond, v_uncond, rtol=1e-5, atol=1e-6)
    empty_one, empty_three = (pipe.generate([""], guidance=w, **kw) for w in (1.0, 3.0))
    # 3·u(∅) − 2·u(∅) = u(∅) up to rounding (~5e-7 here): orders of magnitude below the
    # caption's change above, which is what a guidance that ignored w, or an unconditional
    # branch that was not the empty caption, would show.
    torch.testing.assert_close(empty_three.latents, empty_one.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(empty_three.audio, empty_one.audio, rtol=1e-5, atol=1e-5)
    assert (empty_three.latents - empty_one.latents).abs().max() < 1e-3 * moved_latents
    assert (empty_three.audio - empty_one.audio).abs().max() < 0.1 * moved_audio


def test_dopri5_through_generate_gives_finite_audio_and_counts_every_evaluation(random_pipe):
    pipe = random_pipe
    captions, seeds = [CAPTION, "rain on a tin roof"], [SEED, SEED + 1]
    out = pipe.generate(captions, seeds=seeds, duration=DURATION, steps=2, guidance=3.0, solver="dopri5")
    assert out.audio.shape == (2, round(DURATION * pipe.sample_rate)) and torch.isfinite(out.audio).all()
    assert out.audio.abs().max() > 0
    # One first stage, then six per attempted step (FSAL), each a guided pair of evaluations.
    assert out.nfe > 0 and out.nfe % 2 == 0 and (out.nfe // 2 - 1) % 6 == 0, out.nfe
    # It solved the same ODE a fine fixed-step solver does (tolerance 1e-4 on the latents).
    fine = pipe.generate(captions, seeds=seeds, duration=DURATION, steps=64, guidance=3.0, solver="rk4")
    scale = fine.latents.abs().max()
    assert (out.latents - fine.latents).abs().max() < 1e-2 * scale
    coarse = pipe.generate(captions, seeds=seeds, duration=DURATION, steps=1, guidance=3.0, solver="euler")
    assert (coarse.latents - fine.latents).abs().max() > (out.latents - fine.latents).abs().max()

