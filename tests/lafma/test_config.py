import dataclasses
from pathlib import Path

import pytest

from lafma.config import (
    ConfigError,
    LafmaConfig,
    MelConfig,
    from_dict,
    load_config,
    model_sections,
    to_dict,
)
from pipelines.config import PipelineConfig, load_pipeline_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"lafma_audiocaps.yaml", "demo.yaml", "test.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_pipeline_config(path)
    assert isinstance(cfg, PipelineConfig) and isinstance(cfg, LafmaConfig)
    assert from_dict(PipelineConfig, to_dict(cfg)) == cfg
    # The model alone, as a bundle stores it, rebuilds the same model sections.
    model = from_dict(LafmaConfig, model_sections(to_dict(cfg)))
    assert all(getattr(model, f.name) == getattr(cfg, f.name) for f in dataclasses.fields(LafmaConfig))


def test_paper_config_shapes():
    cfg = load_pipeline_config(Path(__file__).parents[2] / "configs" / "lafma_audiocaps.yaml")
    assert cfg.mel_shape() == (1024, 64)
    assert cfg.latent_shape() == (8, 256, 16)
    assert cfg.context_dim == 1024


def test_misspelt_key_names_itself_with_its_dotted_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "unet:\n  model_chanels: 64\n"))
    assert e.value.key == "unet.model_chanels"
    assert "model_channels" in str(e.value)  # suggests the near miss


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "vocodr: {}\n"))
    assert e.value.key == "vocodr"


@pytest.mark.parametrize("text, key", [
    ("mel:\n  n_mels: sixty-four\n", "mel.n_mels"),
    ("unet:\n  channel_mult: [1, two]\n", "unet.channel_mult[1]"),
    ("sampler:\n  solver: leapfrog\n", "sampler.solver"),
    ("flow:\n  sigma_min: true\n", "flow.sigma_min"),
    ("text:\n  max_length: 1.5\n", "text.max_length"),
])
def test_wrong_type_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert e.value.key == key


@pytest.mark.parametrize("override, key", [
    ("mel.hop_length=0", "mel.hop_length"),
    ("mel.f_max=9000", "mel.f_max"),
    ("flow.sigma_min=1.5", "flow.sigma_min"),
    ("sampler.steps=0", "sampler.steps"),
    ("vocoder.upsample_rates=[4,4,2,2,2]", "vocoder.upsample_rates"),
    ("unet.in_channels=4", "unet.in_channels"),
    ("unet.attention_resolutions=[16]", "unet.attention_resolutions[0]"),
])
def test_impossible_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.key == key


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["sampler.steps=25", "unet.channel_mult=[1,2,2,4]", "text.kind=tiny_t5"])
    assert cfg.sampler.steps == 25
    assert cfg.unet.channel_mult == (1, 2, 2, 4)
    assert cfg.text.kind == "tiny_t5"


def test_mel_hash_is_stable_and_sensitive():
    assert MelConfig().config_hash() == MelConfig().config_hash()
    assert MelConfig().config_hash() != MelConfig(n_mels=80).config_hash()


def test_a_partial_section_keeps_the_fields_own_defaults(tmp_path):
    cfg = load_pipeline_config(write(tmp_path, "train_vae:\n  steps: 7\n"))
    assert cfg.train_vae.steps == 7
    assert cfg.train_vae.lr == 1e-5 and cfg.train_vae.betas == (0.5, 0.9)  # the VAE's, not TrainConfig's
    assert load_pipeline_config(None, ["train_vocoder.batch_size=3"]).train_vocoder.lr == 2e-4


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    assert load_pipeline_config(write(tmp_path, "train_lfm:\n  lr: 3e-4\n")).train_lfm.lr == 3e-4
    assert load_pipeline_config(None, ["flow.sigma_min=1e-4"]).flow.sigma_min == 1e-4
    with pytest.raises(ConfigError):
        load_pipeline_config(None, ["flow.sigma_min=small"])


@pytest.mark.parametrize("override, key", [
    ("audio.clip_seconds=2.0", "audio.clip_seconds"),  # 200 frames: not a multiple of 4 x 8
    ("train_vae.crop_frames=30", "train_vae.crop_frames"),
    ("train_lfm.zero_stage=3", "train_lfm.zero_stage"),
])
def test_settings_that_would_fail_hours_later_fail_at_load(override, key):
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(None, [override])
    assert e.value.key == key


@pytest.mark.parametrize("overrides, key", [
    (["train_lfm.decay=exponential"], "train_lfm.decay_gamma"),  # gamma 1: it would never decay
    (["train_lfm.decay=exponential", "train_lfm.decay_gamma=1.5"], "train_lfm.decay_gamma"),
    (["train_vae.decay_gamma=0"], "train_vae.decay_gamma"),
    (["train_vocoder.decay=exponential", "train_vocoder.decay_gamma=0.999", "train_vocoder.decay_every=0"],
     "train_vocoder.decay_every"),
    (["train_lfm.decay=step"], "train_lfm.decay"),
])
def test_an_exponential_decay_that_cannot_decay_names_its_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(None, overrides)
    assert e.value.key == key


PROFILES = sorted((Path(__file__).parents[2] / "configs" / "cluster").glob("*.yaml"))


def test_configs_layer_section_by_section_and_overrides_come_last(tmp_path):
    (tmp_path / "model.yaml").write_text("unet:\n  model_channels: 64\n  channel_mult: [1, 2, 4]\n"
                                         "train_lfm:\n  lr: 3.0e-4\n  steps: 50\n")
    (tmp_path / "hw.yaml").write_text("unet:\n  channel_mult: [1, 2, 2, 2]\n"
                                      "train_lfm:\n  num_workers: 4\n  steps: 60\n")
    cfg = load_pipeline_config([tmp_path / "model.yaml", tmp_path / "hw.yaml"], ["train_lfm.steps=70"])
    assert cfg.unet.model_channels == 64 and cfg.unet.channel_mult == (1, 2, 2, 2)  # lists replace, not append
    assert cfg.train_lfm.lr == 3e-4 and cfg.train_lfm.num_workers == 4
    assert cfg.train_lfm.steps == 70
    # The other order: the model file's keys win where both set them.
    flipped = load_pipeline_config([tmp_path / "hw.yaml", tmp_path / "model.yaml"], ["unet.attention_resolutions=[2]"])
    assert flipped.unet.channel_mult == (1, 2, 4) and flipped.train_lfm.steps == 50


def test_a_misspelt_key_in_a_layered_file_names_itself(tmp_path):
    (tmp_path / "hw.yaml").write_text("train_lfm:\n  gpus_per_wroker: 1\n")
    with pytest.raises(ConfigError) as e:
        load_pipeline_config([CONFIGS[0], tmp_path / "hw.yaml"])
    assert e.value.key == "train_lfm.gpus_per_wroker"
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_pipeline_config([CONFIGS[0], tmp_path / "nope.yaml"])


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_hardware_profiles_put_the_paper_model_on_gpus_and_change_nothing_else(profile):
    paper = load_pipeline_config(Path(__file__).parents[2] / "configs" / "lafma_audiocaps.yaml")
    cfg = load_pipeline_config([Path(__file__).parents[2] / "configs" / "lafma_audiocaps.yaml", profile])
    for job in ("train_vae", "train_vocoder", "train_lfm"):
        assert getattr(cfg, job).gpus_per_worker >= 1
        assert dataclasses.replace(getattr(cfg, job), num_workers=1, gpus_per_worker=0, cpus_per_worker=1) == \
            dataclasses.replace(getattr(paper, job), num_workers=1, gpus_per_worker=0, cpus_per_worker=1)
    assert cfg.compute.text_actor_gpus >= 1 and cfg.generate.actor_gpus >= 1
    for section in ("mel", "audio", "text", "vae", "vae_loss", "unet", "flow", "sampler", "vocoder", "data"):
        assert getattr(cfg, section) == getattr(paper, section), section


def test_the_model_config_knows_no_pipeline_section(tmp_path):
    """lafma/ holds the model; training, data and machines are the pipeline's (and named as such)."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train_lfm:\n  steps: 7\n"))
    assert e.value.key == "train_lfm"
    assert load_pipeline_config(write(tmp_path, "train_lfm:\n  steps: 7\n")).train_lfm.steps == 7


def test_a_kl_gate_on_an_embedder_without_classes_fails_at_load():
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(None, ["evaluate.embedder=clap", "evaluate.embedder_weights=/x.pt", "evaluate.gate_metric=kl"])
    assert e.value.key == "evaluate.gate_metric"
    assert load_pipeline_config(None, ["evaluate.embedder=clap", "evaluate.embedder_weights=/x.pt"]).evaluate.embedder == "clap"
