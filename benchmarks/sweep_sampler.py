"""Score a trained LFM under other sampling settings (guidance, steps), with the evaluate stage's code.

Loads a finished run's EMA weights (``<root>/data/<dataset>/train_lfm-*/unet.safetensors``)
and, for each ``guidance,steps`` pair, generates the held-out captions with the run's VAE and
vocoder and scores them as ``benchmarks/recipe.py lfm --load … --evaluate`` does (FD, fd_half
against real vs real, text-audio score, attribute accuracy), one JSON line a setting. Nothing is
trained; the held-out clips are embedded once for all settings.

    python benchmarks/sweep_sampler.py --root .lafma 3,10 1,10 2,10 5,10 3,25
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.recipe when run as a script


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT / ".lafma"), help="a finished run's storage root")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--unet", default="", help="EMA weights to score; default: the root's train_lfm stage's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("settings", nargs="+", metavar="guidance,steps")
    args = p.parse_args()

    import torch
    from safetensors.torch import load_file

    from benchmarks.recipe import score, stage_dir
    from lafma.models import build_unet
    from pipelines.config import load_pipeline_config
    from pipelines.core import storage

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    unet_path = args.unet or f"{stage_dir(root, 'train_lfm')}/unet.safetensors"
    latent_std = storage.read_json(f"{stage_dir(root, 'latents')}/_SUCCESS.json")["latent_std"]
    unet = build_unet(load_pipeline_config(args.config))  # sampling settings do not change the network
    unet.load_state_dict(load_file(unet_path))
    unet.eval()
    for setting in args.settings:
        guidance, steps = setting.split(",")
        cfg = load_pipeline_config(args.config, [f"sampler.guidance={guidance}", f"sampler.steps={steps}"])
        # The package stage's scale: the latents stage measured it (vae.scale_factor 0).
        cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scale_factor=cfg.vae.scale_factor or 1 / latent_std))
        start = time.perf_counter()
        out = score(cfg, root, unet, "")
        print(json.dumps({"guidance": float(guidance), "steps": int(steps),
                          "seconds": round(time.perf_counter() - start, 1), **out}), flush=True)


if __name__ == "__main__":
    main()
