"""``lafma import`` at the published sizes: stand-ins for the released files, imported and run.

    python benchmarks/import_published.py [--dir /dev/shm/lafma-published] [--steps 10]

No real released weights can be downloaded here, so this writes files in the exact published
layouts at full width with random weights: the 273 M LFM (extra attention, 32 heads, 1024-d
context), the VAEGAN (no mid attention), AudioLDM's 16 kHz HiFi-GAN + JSON, and a T5 encoder
FLAN-T5-Large wide (1024-d; 2 layers instead of 24, and the byte tokenizer: the text width is
what the import checks). It then times, in one process: the import (conversion, strict loads,
safetensors, bundle), loading the bundle, and generating one 10.24 s clip with the released
sampler. It prints what the import read (the architecture), parameter counts, seconds and the
peak RSS. Results: benchmarks/results/import_paper_cpu2.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/dev/shm/lafma-published" if Path("/dev/shm").is_dir() else "/tmp/lafma-published")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from lafma.bundle import load_bundle
    from lafma.unet import UNet
    from lafma.vae.model import MelVAE
    from lafma.vocoder.hifigan import HiFiGANGenerator
    from pipelines import lafma_cli
    from tests.published import (
        save_tiny_t5,
        write_audioldm_hifigan,
        write_released_lfm,
        write_released_vae,
    )

    torch.set_num_threads(args.threads)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet(model_channels=128, channel_mult=(1, 2, 3, 5), num_res_blocks=2, attention_resolutions=(8, 4, 2),
                context_dim=1024, num_heads=32, extra_attention=True)
    vae = MelVAE(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=8, mid_attention=False)
    voc = HiFiGANGenerator(upsample_padding="reference")
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("unet", unet), ("vae", vae), ("vocoder", voc))}
    files = {"lfm": write_released_lfm(d / "lafma.ckpt", unet), "vae": write_released_vae(d / "vaegan.ckpt", vae),
             "vocoder": write_audioldm_hifigan(d / "hifigan_16k_64bins.ckpt", voc, rates=(5, 4, 2, 2, 2),
                                               kernels=(16, 16, 8, 4, 4), initial=1024, rk=(3, 7, 11),
                                               rd=((1, 3, 5),) * 3),
             "text": save_tiny_t5(d / "flan-t5-large-shaped", dim=1024)}
    del unet, vae, voc
    write_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    rc = lafma_cli.main(["import", "--lfm", str(files["lfm"]), "--vae", str(files["vae"]), "--vocoder",
                         str(files["vocoder"]), "--text-encoder", str(files["text"]), "--out", str(d / "bundle")])
    import_s = time.perf_counter() - t0
    if rc:
        return rc
    manifest = json.loads((d / "bundle" / "lafma.json").read_text())
    unet_cfg = manifest["components"]["unet"]["config"]["unet"]
    t0 = time.perf_counter()
    pipe = load_bundle(str(d / "bundle"))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = pipe.generate(["a dog barks twice"], seeds=[0], steps=args.steps)
    gen_s = time.perf_counter() - t0
    clip = out.audio.shape[-1] / out.sample_rate
    print(json.dumps({
        "threads": args.threads, "params_m": {k: round(v / 1e6, 1) for k, v in counts.items()},
        "read_from_shapes": {k: unet_cfg[k] for k in ("model_channels", "channel_mult", "attention_resolutions",
                                                      "context_dim", "extra_attention", "num_heads")},
        "vae_mid_attention": manifest["components"]["vae"]["config"]["vae"]["mid_attention"],
        "sampler": {k: manifest["config"]["sampler"][k] for k in ("grid", "null_caption", "peak", "steps", "guidance")},
        "seconds": {"write_stand_ins": round(write_s, 1), "import": round(import_s, 1), "load_bundle": round(load_s, 1),
                    f"generate_{clip:.2f}s_clip_{args.steps}_steps": round(gen_s, 1)},
        "nfe": out.nfe, "real_time_factor": round(clip / gen_s, 3), "peak_rss_gib": round(peak_rss_gib(), 2),
        "audio_peak": round(float(out.audio.abs().max()), 4),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
