"""The paper recipe at full width on a CPU: every stage of the DAG, its wall time and peak memory.

    python benchmarks/rehearsal.py [--root /tmp/rehearsal] [--stages ingest,audio,...] [key=value ...]

Runs ``pipelines/run_all.py --config configs/lafma_audiocaps.yaml --config configs/rehearsal.yaml``
one stage at a time (``--only``), each in its own process with its own local Ray, and samples
the memory of that process tree — the driver, Ray's daemons and every worker it started —
twice a second. Per stage it prints the stage's own seconds (its ``_SUCCESS.json``), the wall
time of the whole process (Ray's start-up and shutdown included), the peak RSS of the largest
single process (a training worker holds the model, its optimiser state and activations: what
one node must fit) and the peak sum over the tree (an upper bound: pages shared between
processes, Ray's object store among them, count once per process).

First it writes the FLAN-T5-Large-shaped encoder the config names, when it is missing: random
weights in the published shape (no model hub is reachable here) with the file-free byte
tokenizer, so the text stage runs a 24-layer, 1024-wide encoder on every caption.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "configs" / "lafma_audiocaps.yaml", REPO / "configs" / "rehearsal.yaml"]
STAGES = ["ingest", "audio", "text", "train_vae", "train_vocoder", "latents", "train_lfm", "package", "evaluate",
          "promote", "generate"]


def write_t5_large_shaped(path: Path, seed: int = 0, num_layers: int = 24) -> Path:
    """A T5 encoder in google/flan-t5-large's published shape, randomly initialised, saved with
    ``save_pretrained`` beside a byte-level tokenizer (ids < 384, inside T5's vocabulary).

    Shape from flan-t5-large's config.json: d_model 1024, 24 layers, 16 heads of 64, gated-GELU
    feed-forward of 2816, 32 relative-position buckets up to distance 128, vocabulary 32 128.
    ``num_layers`` shortens it (the test's shortened rehearsal) at the same width.
    """
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    if (path / "config.json").is_file():
        return path
    config = T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=num_layers, num_heads=16,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    tmp = path.with_name(path.name + ".partial")  # a crash mid-write leaves no half encoder behind
    model.save_pretrained(tmp)
    ByT5Tokenizer().save_pretrained(tmp)
    tmp.rename(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"[rehearsal] wrote a FLAN-T5-Large-shaped encoder ({n / 1e6:.0f} M parameters) to {path}", flush=True)
    return path


class TreeMemory:
    """Peak RSS of a process and all its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.root, self.interval = psutil.Process(pid), interval
        self.peak_sum = self.peak_max = 0
        self.peak_name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:  # it exited between the listing and the read
                    continue
                total += rss
                if rss > self.peak_max:
                    self.peak_max, self.peak_name = rss, _name(p)
            self.peak_sum = max(self.peak_sum, total)
            self._stop.wait(self.interval)


def _name(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    # Ray names its workers by what they run (ray::TrainWorker, ray::MapBatches(...)).
    return (cmd[0] if cmd and cmd[0].startswith("ray::") else p.name())[:48]


def stage_seconds(root: str, name: str, since: float) -> float | None:
    """The ``seconds`` of ``name``'s marker written after ``since`` (None if it did not run)."""
    for marker in glob.glob(f"{root}/**/{name}-*/_SUCCESS.json", recursive=True):
        if os.path.getmtime(marker) >= since:
            return json.loads(Path(marker).read_text()).get("seconds")
    return None


def run_stage(name: str, root: str, overrides: list[str], log: Path) -> dict:
    cmd = [sys.executable, str(REPO / "pipelines" / "run_all.py"), *[a for c in CONFIGS for a in ("--config", str(c))],
           "--only", name, f"storage.root={root}", *overrides]
    env = {**os.environ, "LAFMA_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.time()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        with TreeMemory(proc.pid) as mem:
            rc = proc.wait()
    wall = time.time() - start
    return {"stage": name, "rc": rc, "seconds": stage_seconds(root, name, start), "wall": round(wall, 1),
            "peak_process_gib": round(mem.peak_max / 2**30, 2), "peak_process": mem.peak_name,
            "peak_tree_gib": round(mem.peak_sum / 2**30, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/rehearsal", help="storage root (a fresh one re-runs every stage)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. unet.extra_attention=true or train_lfm.precision=bf16_forced")
    args = p.parse_args()
    write_t5_large_shaped(REPO / ".cache" / "flan-t5-large-shaped")
    Path(args.root).mkdir(parents=True, exist_ok=True)
    log = Path(args.root) / "rehearsal.log"
    print(f"[rehearsal] stage logs in {log}", flush=True)
    rows = []
    print(f"{'stage':<14}{'rc':>3}{'stage s':>9}{'wall s':>8}{'peak proc GiB':>15}{'peak tree GiB':>15}  largest process")
    for name in args.stages.split(","):
        row = run_stage(name, args.root, args.overrides, log)
        rows.append(row)
        secs = "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
        print(f"{name:<14}{row['rc']:>3}{secs:>9}{row['wall']:>8.1f}{row['peak_process_gib']:>15.2f}"
              f"{row['peak_tree_gib']:>15.2f}  {row['peak_process']}", flush=True)
        if row["rc"] != 0:
            print(f"[rehearsal] {name} failed: see {log}", file=sys.stderr)
            break
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": args.overrides, "stages": rows}, indent=2))
    sys.exit(0 if all(r["rc"] == 0 for r in rows) else 1)


if __name__ == "__main__":
    main()
