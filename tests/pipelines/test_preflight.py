"""The preflight: each problem it exists for stops the run before any stage, naming the key;
``run_all.py --check`` prints the plan and exits 0 when the run would go ahead."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipelines.config import load_pipeline_config
from pipelines.core.dag import check_dag, run_dag
from pipelines.core.preflight import PreflightError
from pipelines.stages import STAGES
from tests.pipelines.dag_run import CONFIG

REPO = Path(__file__).parents[2]


def _manifest(folder: Path, n: int = 12, split: str | None = None, rate: int = 16000) -> Path:
    """``n`` short tones as a generic CSV with relative paths (and a split column if given)."""
    (folder / "audio").mkdir(parents=True)
    lines = ["audio,caption" + (",split" if split else "")]
    for i in range(n):
        t = np.arange(rate) / rate
        sf.write(folder / "audio" / f"t{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), rate)
        lines.append(f"audio/t{i}.wav,a tone number {i}" + (f",{split}" if split else ""))
    (path := folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return path


def _cfg(tmp_path: Path, *overrides: str):
    return load_pipeline_config(CONFIG, [f"storage.root={tmp_path / 'root'}", *overrides])


def _refused(cfg, key: str, match: str = "") -> PreflightError:
    """run_dag stops before any stage (nothing under the root's data/), naming ``key`` first."""
    with pytest.raises(PreflightError) as info:
        run_dag(cfg, STAGES)
    assert info.value.key == key, str(info.value)
    assert key in str(info.value) and match in str(info.value)
    assert not (Path(cfg.storage.root) / "data").exists()  # not even ingest ran
    return info.value


def test_the_plan_of_a_fresh_run_lists_every_stage_and_its_requests(tmp_path):
    pf = check_dag(_cfg(tmp_path), STAGES)
    assert pf.ok, [str(f) for f in pf.findings]
    plan = {p.name: p for p in pf.plan}
    assert list(plan) == [s.name for s in STAGES] and all(p.action == "run" for p in pf.plan)
    (workers,) = plan["train_lfm"].requests
    assert (workers.count, workers.cpus, workers.count_key) == (2, 0.5, "train_lfm.num_workers")
    assert plan["package"].requests == [] and plan["evaluate"].requests[0].count_key == "generate.actors"
    assert pf.cluster is not None and pf.cluster.cpus >= 1


def test_too_few_held_out_clips_stop_before_ingest(tmp_path):
    # A split column that puts every clip in train: evaluation would fail after all training.
    manifest = _manifest(tmp_path / "in", split="train")
    err = _refused(_cfg(tmp_path, f"data.manifest={manifest}"), "data.splits", "0 held-out clips")
    assert "data.splits=hash" in str(err)
    # Without the evaluate stage nothing needs them: the run may go ahead.
    assert check_dag(_cfg(tmp_path, f"data.manifest={manifest}"), STAGES, until="train_lfm").ok
    # data.splits=hash draws them instead (12 clips: 3 each for validation and test).
    assert check_dag(_cfg(tmp_path, f"data.manifest={manifest}", "data.splits=hash"), STAGES).ok


def test_a_corpus_too_small_to_hold_out_enough_names_the_fraction(tmp_path):
    # No split column: at most half of 6 clips is held out, always fewer than evaluation's 4. How
    # many exactly depends on the hash of each clip's absolute path, i.e. on tmp_path.
    manifest = _manifest(tmp_path / "in", n=6)
    err = _refused(_cfg(tmp_path, f"data.manifest={manifest}"), "data.heldout_fraction",
                   "held-out clips (validation + test), and evaluation needs at least 4")
    assert int(re.search(r"(\d+) held-out clips", str(err)).group(1)) <= 3


def test_audio_paths_that_resolve_nowhere_name_audio_dir(tmp_path):
    manifest = _manifest(tmp_path / "in")
    _refused(_cfg(tmp_path, f"data.manifest={manifest}", f"data.audio_dir={tmp_path / 'elsewhere'}"),
             "data.audio_dir", "none of the first")


def test_low_rate_audio_is_a_warning_not_a_stop(tmp_path):
    manifest = _manifest(tmp_path / "in", rate=8000)
    pf = check_dag(_cfg(tmp_path, f"data.manifest={manifest}"), STAGES)
    assert pf.ok and [f.key for f in pf.findings] == ["mel.f_max"]


def test_a_text_encoder_of_another_width_than_the_unet_stops(tmp_path):
    _refused(_cfg(tmp_path, "unet.context_dim=48"), "unet.context_dim", "32-d text embeddings")


def test_a_hub_encoder_that_is_not_there_offline_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _refused(_cfg(tmp_path, "text.kind=t5", "text.name_or_path=google/flan-t5-not-a-model"), "text.name_or_path",
             "Hugging Face cache")


def test_an_unwritable_storage_root_stops(tmp_path):
    cfg = load_pipeline_config(CONFIG, ["storage.root=/proc/lafma-cannot-be-here"])
    with pytest.raises(PreflightError) as info:
        run_dag(cfg, STAGES)
    assert info.value.key == "storage.root" and "cannot write" in str(info.value)


def test_an_unreachable_tracking_server_stops(tmp_path, monkeypatch):
    with socket.socket() as s:  # bound, never listening: a connection is refused at once
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{s.getsockname()[1]}")
        _refused(_cfg(tmp_path), "MLFLOW_TRACKING_URI", "does not answer")


@pytest.mark.parametrize(("override", "key"), [
    ("train_lfm.num_workers=64", "train_lfm.num_workers"),  # the gang cannot be placed
    ("train_vae.cpus_per_worker=512", "train_vae.cpus_per_worker"),  # one worker fits no node
    ("generate.actor_gpus=64", "generate.actor_gpus"),
    ("compute.text_actors=256", "compute.text_actors"),
])
def test_a_request_the_cluster_cannot_hold_stops_naming_its_key(tmp_path, override, key):
    _refused(_cfg(tmp_path, override), key, "lower")


def test_workers_that_leave_no_cpu_for_their_readers_stop(tmp_path):
    cpus = int(check_dag(_cfg(tmp_path), STAGES).cluster.cpus)
    # Exactly every CPU for the workers: they fit, and would wait forever for their data.
    _refused(_cfg(tmp_path, f"train_lfm.num_workers={cpus}", "train_lfm.cpus_per_worker=1"), "train_lfm.num_workers",
             "wait forever")


def test_an_autoscaling_cluster_reports_what_it_will_request(tmp_path):
    pf = check_dag(_cfg(tmp_path, "compute.autoscaling=true", "train_lfm.num_workers=64"), STAGES)
    assert pf.ok
    (finding,) = pf.findings
    assert not finding.fatal and finding.key == "train_lfm.num_workers" and "autoscaler" in finding.message


def _check(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "run_all.py"), "--config", str(CONFIG), "--check",
                           f"storage.root={tmp_path / 'root'}", *overrides], capture_output=True, text=True,
                          env=env, timeout=300)


def test_check_prints_the_plan_and_exits_0_or_2(tmp_path):
    ok = _check(tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "train_lfm     run" in ok.stdout and "2 training workers x (0.5 CPU)" in ok.stdout
    assert ok.stdout.rstrip().endswith("preflight: ok")
    bad = _check(tmp_path, "train_lfm.num_workers=64")
    assert bad.returncode == 2 and "error: train_lfm.num_workers" in bad.stdout
    assert not (tmp_path / "root" / "data").exists()


def test_a_vocoder_trained_on_other_mels_than_the_data_stops(tmp_path):
    from lafma.config import ConfigError
    from lafma.vocoder.hifigan import HiFiGANGenerator
    from tests.published import write_audioldm_hifigan

    shape = dict(rates=(5, 4, 2, 2, 2), kernels=(16, 16, 8, 4, 4), initial=32, rk=(3,), rd=((1, 3),))
    voc = HiFiGANGenerator(upsample_rates=shape["rates"], upsample_kernel_sizes=shape["kernels"],
                           upsample_initial_channel=32, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),))
    ckpt = write_audioldm_hifigan(tmp_path / "hifigan_16k_64bins.ckpt", voc, **shape)  # its JSON: f_max 8000
    cfg = _cfg(tmp_path, f"vocoder.pretrained={ckpt}", "mel.f_max=7000")
    with pytest.raises(ConfigError, match="mel") as info:
        run_dag(cfg, STAGES)
    assert info.value.key == "vocoder.pretrained"
    assert not (tmp_path / "root" / "data").exists()


def test_a_fifo_among_the_probed_audio_does_not_hang_the_preflight(tmp_path):
    manifest = _manifest(tmp_path / "in", n=2)
    os.mkfifo(tmp_path / "in" / "audio" / "fifo.wav")  # opening it to read would block forever
    with manifest.open("a") as f:
        f.write("audio/fifo.wav,a pipe\n")
    pf = check_dag(_cfg(tmp_path, f"data.manifest={manifest}", "data.heldout_min=0"), STAGES, until="audio")
    assert pf.ok


def test_a_ray_address_nothing_listens_on_stops_at_once(tmp_path):
    # ray.init would retry the GCS connection for many minutes: the run would look hung. In a
    # fresh process (--check), so no Ray this test session started counts as connected.
    with socket.socket() as s:  # bound, never listening: a connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        by_env = _check(tmp_path, env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
        by_key = _check(tmp_path, f"compute.ray_address=ray://127.0.0.1:{port}")
    assert by_env.returncode == 2 and "error: RAY_ADDRESS: nothing answers at 127.0.0.1:" in by_env.stdout
    assert by_key.returncode == 2 and "error: compute.ray_address: nothing answers" in by_key.stdout
    bad = _check(tmp_path, env={"RAY_ADDRESS": "not-an-address"})
    assert bad.returncode == 2 and "is not a Ray address" in bad.stdout


def test_a_store_only_the_driver_can_reach_stops_a_multi_node_run(tmp_path, monkeypatch):
    from pipelines.core.preflight import Cluster, _check_shared

    two, one = Cluster([(1.0, 0.0), (1.0, 0.0)], "the Ray cluster (2 node(s))"), Cluster([(2.0, 0.0)], "one node")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: sqlite under the root
    (sqlite, root), = [_check_shared(str(tmp_path), two)]
    assert (sqlite.key, sqlite.fatal) == ("MLFLOW_TRACKING_URI", True) and "tracking server" in sqlite.message
    assert (root.key, root.fatal) == ("storage.root", False) and "mount" in root.message
    assert _check_shared(str(tmp_path), one) == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert _check_shared("s3://bucket/store", two) == []
