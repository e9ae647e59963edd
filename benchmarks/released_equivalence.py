"""The import contract against the released LAFMA code itself (not in CI: it needs a checkout).

    git clone https://github.com/gwh22/LAFMA /tmp/LAFMA      # or: git archive of a mirror
    pip install --target /tmp/relpkgs einops omegaconf         # what its model modules import
    python benchmarks/released_equivalence.py --released /tmp/LAFMA --extra-path /tmp/relpkgs

Builds the released ``AudioLDM`` (extra attention, 32 legacy heads), ``AutoencoderKL`` and
HiFi-GAN ``Generator`` classes at small widths with random weights, saves their state dicts in
the released file layouts, runs ``lafma import`` on them, and prints the relative error of each
part of the contract (README, "Start from the published LAFMA"). The released code is imported
from the checkout at run time, never copied here; its autoencoder module imports taming's losses,
which the model classes do not use, so an empty stand-in module is registered for it.
"""
import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
p = argparse.ArgumentParser()
p.add_argument("--released", required=True, help="checkout of gwh22/LAFMA")
p.add_argument("--extra-path", default="", help="where einops and omegaconf are installed, if not in this venv")
p.add_argument("--out", default="/tmp/released-small")
args = p.parse_args()
sys.path.insert(0, args.released)
if args.extra_path:
    sys.path.append(args.extra_path)
sys.modules["taming"] = types.ModuleType("taming")
for name in ("taming.modules", "taming.modules.losses", "taming.modules.losses.vqperceptual"):
    sys.modules[name] = types.ModuleType(name)
import torch  # noqa: E402 (after the checkout is on sys.path)
from models.tta.autoencoder.autoencoder import AutoencoderKL  # noqa: E402 (after the checkout is on sys.path)
from models.tta.hifigan import AttrDict  # noqa: E402 (after the checkout is on sys.path)
from models.tta.hifigan.models import Generator  # noqa: E402 (after the checkout is on sys.path)
from models.tta.lfm.audioldm import AudioLDM  # noqa: E402 (after the checkout is on sys.path)
from models.tta.lfm.fm_scheduler import FlowMatchingTrainer  # noqa: E402 (after the checkout is on sys.path)
from omegaconf import OmegaConf  # noqa: E402 (after the checkout is on sys.path)

torch.manual_seed(0)
d = args.out
os.makedirs(d, exist_ok=True)
ucfg = OmegaConf.create(dict(image_size=64, in_channels=8, out_channels=8, model_channels=32, attention_resolutions=[2],
                             num_res_blocks=1, channel_mult=[1, 2], num_heads=32, use_spatial_transformer=True,
                             transformer_depth=1, context_dim=32, use_checkpoint=False, legacy=True, extra_sa_layer=True))
lfm = AudioLDM(ucfg).eval()
vcfg = AttrDict(ch=32, ch_mult=[1, 2, 4], num_res_blocks=1, in_channels=1, z_channels=8, out_ch=1, double_z=True)
vae = AutoencoderKL(vcfg).eval()
# AudioLDM's 16 kHz HiFi-GAN JSON, narrower.
h = AttrDict(resblock="1", upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4],
             upsample_initial_channel=32, resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
             num_mels=64, n_fft=1024, hop_size=160, win_size=1024, sampling_rate=16000, fmin=0, fmax=8000)
voc = Generator(h).eval()
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for m in (lfm, vae, voc):
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
torch.save({"model": lfm.state_dict()}, f"{d}/lafma.ckpt")
torch.save({"autoencoder": vae.state_dict()}, f"{d}/vaegan.ckpt")
torch.save({"generator": {("_orig_mod." if i % 2 else "") + k: v for i, (k, v) in enumerate(voc.state_dict().items())}},
           f"{d}/hifigan_16k_64bins.ckpt")
json.dump(dict(h), open(f"{d}/hifigan_16k_64bins.json", "w"))
print("released keys, e.g.:", [k for k in lfm.state_dict()][:3], [k for k in voc.state_dict() if "weight_g" in k][:2])

sys.path.remove(args.released)
sys.path.insert(0, str(ROOT))
from tests.published import save_tiny_t5  # noqa: E402

save_tiny_t5(Path(f"{d}/t5"), dim=32)
rc = subprocess.run([sys.executable, "-m", "pipelines.lafma_cli", "import", "--lfm", f"{d}/lafma.ckpt", "--vae", f"{d}/vaegan.ckpt",
                     "--vocoder", f"{d}/hifigan_16k_64bins.ckpt", "--text-encoder", f"{d}/t5", "--out", f"{d}/bundle"],
                    capture_output=True, text=True, cwd=ROOT)
print(rc.stdout.strip(), rc.stderr.strip()[-500:])
from lafma.bundle import load_bundle  # noqa: E402

pipe = load_bundle(f"{d}/bundle")
voc.remove_weight_norm()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()



with torch.no_grad():
    x, t, ctx = torch.randn(2, 8, 16, 16), torch.tensor([0.25, 0.8]), torch.randn(2, 7, 32)
    e_unet = rel(pipe.unet(x, t, ctx, torch.ones(2, 7, dtype=torch.bool)), lfm(x, t * 999, ctx))
    mel = torch.randn(2, 64, 32) - 5
    img = mel.transpose(1, 2).unsqueeze(1)
    e_enc = rel(pipe.vae.encode(mel).mean, vae.encode(img).mean)
    z = torch.randn(2, 8, 8, 16)
    e_dec = rel(pipe.vae.decode(z), vae.decode(z).squeeze(1).transpose(1, 2))
    ref = voc(mel).squeeze(1)
    ours = pipe.vocoder(mel)
    e_voc = rel(ours, ref[:, : ours.shape[-1]])
    # The released sampler end to end: its euler_sample draws x0 from the global RNG after one
    # throw-away draw; the same x0 goes through this project's sampler with the released options.
    from lafma.pipeline import sample_latents

    caption, steps, w, shape = "a dog barks twice", 10, 3.0, (1, 8, 16, 16)
    tok = pipe.text_encoder.tokenizer
    ids = tok([caption], return_tensors="pt").input_ids
    cond = pipe.text_encoder.model(ids).last_hidden_state
    empty = tok([""], padding="max_length", max_length=ids.shape[1], return_tensors="pt").input_ids
    uncond = pipe.text_encoder.model(empty).last_hidden_state
    lfm.device = torch.device("cpu")  # euler_sample reads model.device
    torch.manual_seed(7)
    want, nfe = FlowMatchingTrainer(lfm, sample_N=steps).euler_sample(torch.cat([uncond, cond]), shape, w)
    torch.manual_seed(7)
    x0 = torch.randn_like(torch.randn(shape))
    context, mask = pipe.text_encoder([caption])
    got = sample_latents(pipe.unet, x0, context, mask, guidance=w, null_condition=pipe.null_condition(mask),
                         steps=steps, grid=pipe.grid)
    e_sampler = rel(got.x, want)
print(json.dumps({"sampler_latents_10_steps": e_sampler, "nfe": [got.nfe, 2 * nfe], "unet": e_unet, "vae_encode_mean": e_enc, "vae_decode": e_dec, "vocoder": e_voc,
                  "released_vocoder_samples": ref.shape[-1], "ours": ours.shape[-1]}, indent=1))
