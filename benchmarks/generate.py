"""Generation speed against a diffusion pipeline: this pipeline (10 Euler steps) and diffusers'
``AudioLDMPipeline`` (200 DDIM steps) side by side in one process, same-size networks.

    python benchmarks/generate.py [--config configs/demo.yaml] [--threads 2] [--repeats 3]
        [--batches 1,4,16] [--baseline-steps 200] [--out benchmarks/results/generate.md] [key=value ...]
    python benchmarks/generate.py --config configs/lafma_audiocaps.yaml --device cuda \
        text.name_or_path=/models/flan-t5-large --out generate_h100.md   # bf16 autocast + torch.compile on the UNets

(Offline, ``text.kind=minilm`` stands in for FLAN-T5: the timings need a text encoder of about
its cost, not its weights.)

Both pipelines get random weights (speed, not quality) and the same caption, guidance weight
(``sampler.guidance``, 3 by default) and clip length (``sampler.duration``):

- this project's: ``lafma.models.build_pipeline(cfg)``, ``sampler.steps`` Euler steps (10)
  with classifier-free guidance, at batch 1 and at each ``--batches`` size.
- the baseline: diffusers' ``AudioLDMPipeline`` at AudioLDM's default 200 DDIM steps (its
  scheduler settings), batch 1, with a ``UNet2DConditionModel`` of our UNet's widths, levels,
  res blocks, attention sites and head split (:func:`diffusers_unet_config`), an
  ``AutoencoderKL`` of our VAE's shape, and a ``ClapTextModelWithProjection`` of our text
  encoder's width and depth (random, with our encoder's tokenizer: nothing from the hub).
  The vocoder is ours, shared: both back ends invert mels with the same module.

Each call is timed whole (end to end: caption in, waveform out) and split by hooks on the
modules it runs: text encoding, the sampling loop (first UNet call to the VAE decode), the
VAE decode, the vocoder, and the rest. Each of ``--repeats`` rounds runs ours at batch 1, the
baseline, ours at batch 1 again, then each batch size, and takes each ratio between neighbouring
calls (the baseline against the mean of the two around it, batch b against the batch-1 call
before it), so a slow spell of a shared machine lands on both sides of a ratio; seconds and
ratios are medians over the rounds. Printed:
seconds per clip and real-time factor (compute seconds per second of audio), the speed-ups
(sampling loop: the NFE ratio, 20x at 200 vs 10 steps, is its ceiling; end to end), batched
throughput per clip against batch 1, and the fixed costs (imports, building, loading from
files, the first call) that bound the end-to-end ratio.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAPTIONS = [
    "a dog barks twice while cars pass by", "rain falls on a tin roof", "a cello plays a slow melody",
    "footsteps on gravel", "a crowd applauds and cheers", "birds chirp in the morning",
    "a car engine starts and idles", "a bell rings three times", "waves crash on a rocky shore",
    "a man speaks over a loudspeaker", "wind blows through trees", "a door creaks open and slams shut",
    "a piano plays a fast scale", "thunder rumbles in the distance", "a baby laughs", "a train horn blows",
]
# AudioLDM's DDIM settings (its scheduler_config.json): LDM's "linear" (sqrt-linear) betas.
AUDIOLDM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                          beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
CLAP_PROJECTION = 512  # AudioLDM's text embedding width (CLAP's projection)
STAGES = ("text", "loop", "decode", "vocoder", "other")


def diffusers_unet_config(cfg) -> dict:
    """``UNet2DConditionModel`` arguments for AudioLDM's layout at our UNet's size.

    Widths, levels, res blocks per level, transformer depth and the attention sites and heads
    are ours (LDM's ``attention_resolutions`` name the downsample factors 2**level that attend;
    diffusers' ``attention_head_dim`` is, for this model, LDM's number of heads). The
    conditioning is AudioLDM's: the pooled text embedding is projected and concatenated to the
    time embedding, and its transformers' second attention attends to the latent itself (the
    pipeline passes no ``encoder_hidden_states``), so ``cross_attention_dim`` is each level's
    width. Ours cross-attends to the caption's tokens instead: fewer keys, the same projections.
    """
    u = cfg.unet
    widths = [u.model_channels * m for m in u.channel_mult]
    attends = [2**level in u.attention_resolutions for level in range(len(widths))]
    return dict(
        sample_size=cfg.latent_shape()[1], in_channels=u.in_channels, out_channels=u.out_channels,
        layers_per_block=u.num_res_blocks, block_out_channels=tuple(widths),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        attention_head_dim=tuple(u.num_heads or w // u.num_head_channels for w in widths),
        cross_attention_dim=tuple(widths), transformer_layers_per_block=u.transformer_depth,
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=CLAP_PROJECTION,
        class_embeddings_concat=True, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32,
        resnet_time_scale_shift="scale_shift" if u.use_scale_shift_norm else "default")


def diffusers_vae_config(cfg) -> dict:
    """``AutoencoderKL`` arguments for our mel VAE's shape (1-channel mel image, C latents)."""
    v = cfg.vae
    n = len(v.ch_mult)
    return dict(in_channels=v.in_channels, out_channels=v.in_channels, latent_channels=v.z_channels,
                block_out_channels=tuple(v.ch * m for m in v.ch_mult), layers_per_block=v.num_res_blocks,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                norm_num_groups=32, scaling_factor=1.0, mid_block_add_attention=v.mid_attention)


def clap_text_config(model_config, tokenizer):
    """A ``ClapTextConfig`` of our text encoder's width and depth (BERT or T5 names)."""
    from transformers import ClapTextConfig

    get = lambda *names: next(getattr(model_config, n) for n in names if hasattr(model_config, n))  # noqa: E731
    return ClapTextConfig(vocab_size=len(tokenizer), hidden_size=get("hidden_size", "d_model"),
                          num_hidden_layers=get("num_hidden_layers", "num_layers"),
                          num_attention_heads=get("num_attention_heads", "num_heads"),
                          intermediate_size=get("intermediate_size", "d_ff"), projection_dim=CLAP_PROJECTION,
                          pad_token_id=tokenizer.pad_token_id or 0,
                          # RoBERTa-style positions start after the pad id
                          max_position_embeddings=tokenizer.model_max_length + (tokenizer.pad_token_id or 0) + 2)


def shared_vocoder(pipe):
    """Our vocoder behind ``SpeechT5HifiGan``'s interface: mel (B, T, n_mels) in, a ``config``
    with ``upsample_rates``, ``sampling_rate`` and ``model_in_dim``. It calls our pipeline's
    own ``vocode`` (item by item for Griffin-Lim), so both back ends run the same code."""
    import torch

    class SharedVocoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vocoder = pipe.vocoder  # the same module: .to(device) moves it with either pipeline
            self.config = SimpleNamespace(upsample_rates=[pipe.hop_length], sampling_rate=pipe.sample_rate,
                                          model_in_dim=pipe.n_mels)

        @property
        def dtype(self):  # what diffusers' .to() asks of every module
            return torch.float32

        @property
        def device(self):
            return pipe.device

        def forward(self, mel):  # (B, T, n_mels)
            return pipe.vocode(mel.transpose(1, 2), seeds=range(mel.shape[0]))  # (B, T · hop)

    return SharedVocoder()


def build_baseline(cfg, ours, device):
    """diffusers' AudioLDMPipeline at our sizes, random weights, our tokenizer and vocoder."""
    import torch
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import ClapTextModelWithProjection

    tokenizer = copy.deepcopy(ours.text_encoder.tokenizer)
    tokenizer.model_max_length = cfg.text.max_length  # AudioLDM pads every caption to this
    torch.manual_seed(0)
    pipe = AudioLDMPipeline(
        vae=AutoencoderKL(**diffusers_vae_config(cfg)),
        text_encoder=ClapTextModelWithProjection(clap_text_config(ours.text_encoder.model.config, tokenizer)),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**diffusers_unet_config(cfg)),
        scheduler=DDIMScheduler(**AUDIOLDM_SCHEDULER), vocoder=shared_vocoder(ours))
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.vae, pipe.text_encoder, pipe.unet):
        m.eval()
    return pipe.to(device)


class Probe:
    """Timestamps of one call's stages from hooks on the modules it runs (both pipelines)."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.events: list[tuple[str, float]] = []
        self.unet_calls = 0
        self.hooked: set[int] = set()  # id() of the modules already hooked (attach)

    def mark(self, name: str) -> None:
        self.sync()
        self.events.append((name, time.perf_counter()))

    def attach(self, *, text_encoder, unet, vae, vocoder) -> None:
        """Hook each module once: both pipelines share the vocoder (a second pair of hooks on it
        would mark every span twice)."""
        def unet_pre(*_):
            self.unet_calls += 1
            if self.unet_calls == 1:  # the loop starts here; later calls are only counted
                self.mark("loop")

        text_encoder.register_forward_pre_hook(lambda *_: self.mark("text+"))
        text_encoder.register_forward_hook(lambda *_: self.mark("text-"))
        unet.register_forward_pre_hook(unet_pre)
        if id(vocoder) not in self.hooked:
            self.hooked.add(id(vocoder))
            vocoder.register_forward_pre_hook(lambda *_: self.mark("vocoder+"))
            vocoder.register_forward_hook(lambda *_: self.mark("vocoder-"))
        decode = vae.decode

        def timed_decode(*a, **k):
            self.mark("decode+")
            out = decode(*a, **k)
            self.mark("decode-")
            return out

        vae.decode = timed_decode

    def run(self, fn) -> dict:
        """Call ``fn()`` and return its wall time and stage times (seconds) and UNet calls."""
        self.events, self.unet_calls = [], 0
        self.mark("start")
        fn()
        self.mark("end")
        t = {}
        for name, when in self.events:
            t.setdefault(name, []).append(when)
        out = {"total": t["end"][0] - t["start"][0],
               "text": sum(b - a for a, b in zip(t.get("text+", []), t.get("text-", []))),
               # Decoded and vocoded in chunks (LafmaPipeline.decode_batch): each stage is the
               # sum of its spans, the loop ends where the first decode starts.
               "loop": t["decode+"][0] - t["loop"][0],
               "decode": sum(b - a for a, b in zip(t["decode+"], t["decode-"])),
               "vocoder": sum(b - a for a, b in zip(t["vocoder+"], t["vocoder-"])), "unet_calls": self.unet_calls}
        out["other"] = out["total"] - sum(out[k] for k in STAGES[:-1])
        return out


def fast_unet(unet, device, bf16: bool, compiled: bool) -> None:
    """On a GPU: the UNet's forward under bf16 autocast (fp32 weights and output), compiled.
    Hooks stay outside the compiled region (they wrap ``forward``)."""
    import torch

    forward = torch.compile(unet.forward) if compiled else unet.forward

    def run(*a, **k):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(*a, **k)
        if isinstance(out, torch.Tensor):
            return out.float()
        out.sample = out.sample.float()  # diffusers' UNet2DConditionOutput
        return out

    unet.forward = run


def unet_cost(cfg, ours, baseline, device) -> dict:
    """Parameters and FLOPs of one guided UNet call (batch 2: conditional + unconditional)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    c, t, f = ours.latent_shape(cfg.sampler.duration)
    x = torch.randn(2, c, t, f, device=device)
    ctx, mask = ours.text_encoder(CAPTIONS[:1] * 2)
    out = {}
    for name, call, module in (
            ("ours", lambda: ours.unet(x, torch.full((2,), 0.5, device=device), ctx.to(device), mask.to(device)), ours.unet),
            ("baseline", lambda: baseline.unet(x, torch.full((2,), 500, device=device), encoder_hidden_states=None,
                                               class_labels=torch.randn(2, CLAP_PROJECTION, device=device)), baseline.unet)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        out[name] = {"params_m": round(sum(p.numel() for p in module.parameters()) / 1e6, 2),
                     "gflops_per_call": round(counter.get_total_flops() / 1e9, 3)}
    return out


def load_times(cfg, ours, baseline, device) -> dict:
    """Seconds to load each pipeline's weights from files into a ready pipeline: ours as
    ``lafma generate`` does (:func:`lafma.bundle.load_bundle`), the baseline's three networks
    and tokenizer with ``from_pretrained`` (its vocoder is ours, loaded with ours)."""
    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, ClapTextModelWithProjection

    from lafma.bundle import load_bundle, write_bundle
    from lafma.config import to_dict

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = {}
        for name in ("unet", "vae", "vocoder"):
            weights[name] = os.path.join(tmp, f"{name}.safetensors")
            sd = {k: v.detach().cpu().contiguous() for k, v in getattr(ours, name).state_dict().items()}
            save_file(sd, weights[name], metadata={"mel_hash": cfg.mel.config_hash(), "component": name})
        write_bundle(os.path.join(tmp, "bundle"), components={n: to_dict(cfg) for n in weights}, weights=weights)
        start = time.perf_counter()
        load_bundle(os.path.join(tmp, "bundle"), device=device)
        out["ours"] = time.perf_counter() - start
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            getattr(baseline, name).save_pretrained(os.path.join(tmp, name))
        start = time.perf_counter()
        AudioLDMPipeline(unet=UNet2DConditionModel.from_pretrained(os.path.join(tmp, "unet")),
                         vae=AutoencoderKL.from_pretrained(os.path.join(tmp, "vae")),
                         text_encoder=ClapTextModelWithProjection.from_pretrained(os.path.join(tmp, "text_encoder")),
                         tokenizer=AutoTokenizer.from_pretrained(os.path.join(tmp, "tokenizer")),
                         scheduler=DDIMScheduler(**AUDIOLDM_SCHEDULER), vocoder=baseline.vocoder).to(device)
        out["baseline"] = time.perf_counter() - start
    return out


def median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        name = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
        flags = next(x for x in open("/proc/cpuinfo") if x.startswith("flags")).split()
    except (OSError, StopIteration):
        name, flags = platform.processor(), []
    isa = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    return f"{name}, {os.cpu_count()} cores, {isa}"


def main() -> None:  # noqa: C901 (one straight script: set up, time, report)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: bf16 autocast + torch.compile on the UNets)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; medians are reported")
    p.add_argument("--batches", default="1,4,16", help="batch sizes of this pipeline")
    p.add_argument("--baseline-steps", type=int, default=200,
                   help="DDIM steps actually run; fewer than 200 times the loop per step and scales it to 200")
    p.add_argument("--warmup-steps", type=int, default=2, help="DDIM steps of the baseline's warm-up call")
    p.add_argument("--no-compile", action="store_true", help="cuda: skip torch.compile")
    p.add_argument("--fp32", action="store_true", help="cuda: skip bf16 autocast")
    p.add_argument("--decode-batch", type=int, default=0,
                   help="ours: latents decoded and vocoded at a time (LafmaPipeline.decode_batch); 0: its default")
    p.add_argument("--out", default="", help="write the results here: .md (a table) or .json")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    load_at_start = os.getloadavg()[0]
    imports = {}
    start = time.perf_counter()
    import torch
    imports["torch"] = time.perf_counter() - start
    start = time.perf_counter()
    import transformers  # both text encoders; lafma imports it on first use, diffusers' AudioLDM at once
    imports["transformers"] = time.perf_counter() - start
    start = time.perf_counter()
    from lafma.models import build_pipeline
    from pipelines.config import load_pipeline_config
    imports["lafma"] = time.perf_counter() - start
    start = time.perf_counter()
    import diffusers  # noqa: F401 (timed: what the baseline's import costs beyond torch)
    from diffusers import AudioLDMPipeline  # noqa: F401
    imports["diffusers"] = time.perf_counter() - start

    diffusers.utils.logging.set_verbosity_error()  # its deprecation and accelerate notices
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bf16, compiled = cuda and not args.fp32, cuda and not args.no_compile
    cfg = load_pipeline_config(args.config, args.overrides)
    if not cfg.vae.scale_factor:  # 0 = measured by the latents stage; random weights have none
        cfg = load_pipeline_config(args.config, [*args.overrides, "vae.scale_factor=1.0"])
    steps, w, duration = cfg.sampler.steps, cfg.sampler.guidance, cfg.sampler.duration
    batches = [int(b) for b in args.batches.split(",")]
    if 1 not in batches:
        batches = [1, *batches]

    build = {}
    start = time.perf_counter()
    torch.manual_seed(0)
    ours = build_pipeline(cfg).to(device)
    ours.decode_batch = args.decode_batch or None
    build["ours"] = time.perf_counter() - start
    start = time.perf_counter()
    baseline = build_baseline(cfg, ours, device)
    build["baseline"] = time.perf_counter() - start
    load = load_times(cfg, ours, baseline, device)
    cost = unet_cost(cfg, ours, baseline, device)
    probe = Probe(device)
    probe.attach(text_encoder=ours.text_encoder, unet=ours.unet, vae=ours.vae, vocoder=ours.vocoder)
    probe.attach(text_encoder=baseline.text_encoder, unet=baseline.unet, vae=baseline.vae, vocoder=ours.vocoder)
    for unet in (ours.unet, baseline.unet):
        if cuda:
            fast_unet(unet, device, bf16, compiled)

    def run_ours(b: int):
        captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(b)]
        return lambda: ours.generate(captions, seeds=list(range(b)), steps=steps, guidance=w, duration=duration)

    def run_baseline(n_steps: int):
        return lambda: baseline(CAPTIONS[:1], num_inference_steps=n_steps, guidance_scale=w, audio_length_in_s=duration,
                                generator=torch.Generator().manual_seed(0), output_type="pt")

    first = {"ours": probe.run(run_ours(1)), "baseline": probe.run(run_baseline(args.warmup_steps))}
    for b in batches[1:]:  # each batch size's first call (torch.compile traces each shape) is untimed
        probe.run(run_ours(b))
    # Each round runs ours at batch 1 just before and just after the baseline and compares the
    # baseline with their mean, and each batch size with the batch-1 call just before it: on a
    # shared machine the load drifts within minutes, and a ratio of neighbours drifts less.
    scale = 200 / args.baseline_steps  # 1 unless fewer steps were run: the loop is scaled per step
    runs = {("ours", b): [] for b in batches} | {("baseline", 1): []}
    per_round = []
    for r in range(args.repeats):
        before = probe.run(run_ours(1))
        base = probe.run(run_baseline(args.baseline_steps))
        base["total"] += (scale - 1) * base["loop"]
        base["loop"] *= scale
        base["unet_calls"] *= scale
        after = probe.run(run_ours(1))
        runs["ours", 1] += [before, after]
        runs["baseline", 1].append(base)
        mean = {k: (before[k] + after[k]) / 2 for k in before}
        ratios = {"loop_speedup": base["loop"] / mean["loop"], "e2e_speedup": base["total"] / mean["total"],
                  "per_call_cost_ratio": (base["loop"] / base["unet_calls"]) / (mean["loop"] / mean["unet_calls"])}
        for b in batches[1:]:
            runs["ours", b].append(probe.run(run_ours(b)))
            last = runs["ours", b][-1]
            ratios[f"batch{b}_e2e_throughput_gain"] = after["total"] / (last["total"] / b)
            ratios[f"batch{b}_loop_throughput_gain"] = after["loop"] / (last["loop"] / b)
        per_round.append(ratios)
        print(f"round {r + 1}/{args.repeats}: ours {before['total']:.2f} s and {after['total']:.2f} s, "
              f"baseline {base['total']:.2f} s", flush=True)

    res = {k: median(v) for k, v in runs.items()}
    base = res["baseline", 1]
    scaled = scale != 1
    rows = []
    for (name, b), m in [(("baseline", 1), base), *[(("ours", b), res["ours", b]) for b in batches]]:
        per = {k: m[k] / b for k in STAGES + ("total",)}
        n_steps = 200 if name == "baseline" else steps
        rows.append({"pipeline": name, "batch": b, "steps": n_steps, "nfe": 2 * int(m["unet_calls"]),
                     "loop_s_per_clip": per["loop"], "e2e_s_per_clip": per["total"],
                     "rtf": per["total"] / duration, **{f"{k}_s_per_clip": per[k] for k in STAGES if k != "loop"}})
    o1 = res["ours", 1]
    ratios = {"nfe_ratio": base["unet_calls"] / o1["unet_calls"], **median(per_round),
              "ours_outside_loop_share": 1 - o1["loop"] / o1["total"]}
    # The first call against a steady one of the same length (the baseline's warm-up ran
    # --warmup-steps steps): lazy initialisation, and on a GPU torch.compile's tracing.
    fixed = {"imports_s": imports, "build_s": build, "load_from_files_s": load,
             "first_call_s": {"ours": first["ours"]["total"],
                              "baseline": first["baseline"]["total"]},
             "steady_call_s": {"ours": o1["total"], "baseline": base["total"] - base["loop"]
                               + base["loop"] / base["unet_calls"] * first["baseline"]["unet_calls"]}}
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(), "machine": machine(), "device": str(device),
        "threads": torch.get_num_threads(), "precision": "bf16 autocast (UNet)" if bf16 else "fp32",
        "torch_compile": compiled, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "config": os.path.relpath(args.config, ROOT), "overrides": args.overrides, "clip_seconds": duration,
        "decode_batch": ours.decode_chunk(device) or "the whole batch",
        "latent": list(ours.latent_shape(duration)), "guidance": w, "repeats": args.repeats,
        "baseline_steps_run": args.baseline_steps, "baseline_loop_scaled_to_200": scaled,
        "unet": cost, "rows": rows, "ratios": ratios, "fixed_costs": fixed,
        "load_average": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
    }
    text = markdown(report)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) if args.out.endswith(".json") else text)


def markdown(r: dict) -> str:
    """The report as markdown: settings, the per-clip table, the ratios and the fixed costs."""
    f = lambda x: f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"  # noqa: E731
    lines = [f"`{r['command']}`", "",
             f"{r['date']}, {r['machine']}, {r['device']} ({r['threads']} threads), {r['precision']}, "
             f"torch.compile {'on' if r['torch_compile'] else 'off'}; torch {r['torch']}, diffusers {r['diffusers']}, "
             f"commit {r['commit']}; config {r['config']} {' '.join(r['overrides'])}: {r['clip_seconds']} s clips, "
             f"latent {'x'.join(map(str, r['latent']))}, guidance {r['guidance']}, "
             f"decoded {r['decode_batch']} at a time; medians of {r['repeats']} rounds; "
             f"1-min load average {r['load_average'][0]} at the start, {r['load_average'][1]} at the end.", ""]
    u = r["unet"]
    lines += [f"UNets (one guided call, batch 2): ours {u['ours']['params_m']} M parameters, "
              f"{u['ours']['gflops_per_call']} GFLOP; baseline {u['baseline']['params_m']} M, "
              f"{u['baseline']['gflops_per_call']} GFLOP.", ""]
    if r["baseline_loop_scaled_to_200"]:
        lines += [f"**The baseline ran {r['baseline_steps_run']} DDIM steps; its loop is scaled per step to 200.**", ""]
    lines += ["| pipeline | batch | steps | NFE | loop s/clip | end-to-end s/clip | RTF | text | VAE decode | vocoder | other |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        lines.append(f"| {row['pipeline']} | {row['batch']} | {row['steps']} | {row['nfe']} | "
                     f"{f(row['loop_s_per_clip'])} | {f(row['e2e_s_per_clip'])} | {f(row['rtf'])} | "
                     + " | ".join(f(row[f"{k}_s_per_clip"]) for k in ("text", "decode", "vocoder", "other")) + " |")
    lines += ["", "RTF: compute seconds per second of audio. Stage columns: seconds per clip. Ratios: medians over "
              "rounds of each round's ratio (the baseline against ours just before and after it; batch b against "
              "batch 1 just before it).", "",
              "| ratio | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["ratios"].items()]
    ours = next(row for row in r["rows"] if row["pipeline"] == "ours" and row["batch"] == 1)
    lines += ["", f"What bounds the end-to-end ratio: ours spends {r['ratios']['ours_outside_loop_share']:.0%} of a "
              f"clip's {f(ours['e2e_s_per_clip'])} s outside the sampling loop (text {f(ours['text_s_per_clip'])} s, "
              f"VAE decode {f(ours['decode_s_per_clip'])} s, vocoder {f(ours['vocoder_s_per_clip'])} s); with those "
              "at zero the end-to-end speed-up would be the loop's."]
    lines += ["", "| fixed cost (s, once per process) | ours | baseline |", "| --- | --- | --- |"]
    fx = r["fixed_costs"]
    im = fx["imports_s"]
    lines.append(f"| import (after torch {im['torch']:.2f} s and transformers {im['transformers']:.2f} s, shared) | "
                 f"{im['lafma']:.2f} | {im['diffusers']:.2f} |")
    for key, label in (("build_s", "build, random weights"), ("load_from_files_s", "load from files")):
        lines.append(f"| {label} | {fx[key]['ours']:.2f} | {fx[key]['baseline']:.2f} |")
    first, steady = fx["first_call_s"], fx["steady_call_s"]
    lines.append(f"| first call (a steady call of the same length) | {first['ours']:.2f} ({steady['ours']:.2f}) | "
                 f"{first['baseline']:.2f} ({steady['baseline']:.2f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
