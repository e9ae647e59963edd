import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lafma.config import load_yaml, model_sections

ROOT = Path(__file__).parents[2]


def run(*args):
    """The installed `lafma` command (pipelines.lafma_cli: describe reads pipeline configs)."""
    return subprocess.run([sys.executable, "-m", "pipelines.lafma_cli", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_describe_paper_config_json():
    out = run("describe", "--config", "configs/lafma_audiocaps.yaml", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["mel_shape"] == [1024, 64]
    assert info["latent_shape"] == [8, 256, 16]
    comp = info["components"]
    assert abs(comp["vae"]["params"] / 53e6 - 1) < 0.05
    assert abs(comp["unet"]["params"] / 188e6 - 1) < 0.05
    assert comp["text_encoder"]["dim"] == 1024


@pytest.mark.slow
def test_describe_extra_attention_override():
    out = run("describe", "--config", "configs/lafma_audiocaps.yaml", "--json", "unet.extra_attention=true")
    assert abs(json.loads(out.stdout)["components"]["unet"]["params"] / 273e6 - 1) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("config", ["demo.yaml", "test.yaml"])
def test_describe_small_configs_as_text(config):
    out = run("describe", "--config", f"configs/{config}")
    assert out.returncode == 0, out.stderr
    assert "latent" in out.stdout and "unet" in out.stdout


def test_config_error_is_reported_with_its_key():
    out = run("describe", "--config", "configs/test.yaml", "unet.model_chanels=64")
    assert out.returncode == 2
    assert "unet.model_chanels" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_the_library_cli_describes_a_model_config_and_names_a_pipeline_section(tmp_path):
    """``python -m lafma.cli`` reads only the model's sections (lafma/ knows no pipeline)."""
    lib = [sys.executable, "-m", "lafma.cli", "describe", "--json", "--config"]
    # The paper config's model sections alone (the file also holds the training recipe).
    model = tmp_path / "paper_model.yaml"
    model.write_text(yaml.safe_dump(model_sections(load_yaml(ROOT / "configs" / "lafma_audiocaps.yaml"))))
    out = subprocess.run([*lib, str(model)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["latent_shape"] == [8, 256, 16]
    for config in ("configs/demo.yaml", "configs/lafma_audiocaps.yaml"):
        out = subprocess.run([*lib, config], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 2 and "unknown key" in out.stderr, config
