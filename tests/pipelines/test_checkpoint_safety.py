"""Resuming never unpickles code: DeepSpeed's files are read weights-only (issue 15)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from pipelines.core.checkpointing import WeightsOnlyCheckpointEngine


class _Payload:
    """What a writer of the storage root could leave in a checkpoint: unpickling it runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_callable_in_a_deepspeed_file_is_refused_not_run(tmp_path):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "ran"
    path = str(tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"module": {"w": torch.ones(2)}, "evil": _Payload(str(marker))}, path)

    with pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL io.open"):
        WeightsOnlyCheckpointEngine(None).load(path, map_location="cpu")
    assert not marker.exists()
    # DeepSpeed's own engine runs it: the threat the replacement removes.
    TorchCheckpointEngine(None).load(path, map_location="cpu")
    assert marker.exists()


# A real engine in a process of its own (a one-rank gloo group on an in-memory store), so this test's process keeps
# no torch.distributed state: train a step, save, change the weights, resume, compare.
RESUME = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # no port to bind
    from pipelines.core.checkpointing import _load_weights_only
    from pipelines.core.training import deepspeed_config, init_engine

    def engine():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        cfg = deepspeed_config(micro_batch_per_gpu=2, grad_accum=1, zero_stage=int(sys.argv[2]),
                               grad_clip=1.0, bf16=False)
        return init_engine(m, opt, None, cfg)

    e = engine()
    e.backward(e(torch.ones(2, 4)).sum()); e.step()
    saved = {k: v.clone() for k, v in e.module.state_dict().items()}
    e.save_checkpoint(sys.argv[1], tag="t")
    e.backward(e(torch.ones(2, 4)).sum()); e.step()
    fresh = engine()
    _load_weights_only(fresh)
    path, _ = fresh.load_checkpoint(sys.argv[1], tag="t")
    assert path is not None, "nothing loaded"
    assert type(fresh.checkpoint_engine).__name__ == "WeightsOnlyCheckpointEngine"
    for k, v in fresh.module.state_dict().items():
        assert torch.equal(v, saved[k]), k
    print("resumed", fresh.global_steps)
""")


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_a_zero_checkpoint_resumes_weights_only(tmp_path, zero_stage):
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "ck"), str(zero_stage)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed 1" in out.stdout
