"""What runs in every Ray Train worker: build the job's models and engines, run the loop,
export the final weights (rank 0) as safetensors beside their config."""

from __future__ import annotations

import torch
from safetensors.torch import save

from lafma.config import from_dict, to_dict
from lafma.models import build_unet, build_vae
from lafma.train import EMA, warmup_decay
from pipelines.config import PipelineConfig, TrainConfig
from pipelines.core import storage
from pipelines.core.tracking import RunLogger, system_metrics
from pipelines.core.training import deepspeed_config, init_engine
from pipelines.train.gan import vae_parts, vae_step, vocoder_parts, vocoder_step
from pipelines.train.lfm import lfm_step
from pipelines.train.loop import Job, run_loop

SECTIONS = {"vae": "train_vae", "vocoder": "train_vocoder", "lfm": "train_lfm"}


def _engine(model: torch.nn.Module, t: TrainConfig, lr: float, use_bf16: bool):
    opt_cls = torch.optim.AdamW if t.weight_decay > 0 else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=lr, betas=t.betas, weight_decay=t.weight_decay)
    # DeepSpeed steps the scheduler once per optimiser step, i.e. every grad_accum micro-batches.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay(t.warmup_steps, max(1, t.steps // t.grad_accum), t.decay))
    ds = deepspeed_config(micro_batch_per_gpu=t.batch_size, grad_accum=t.grad_accum, zero_stage=t.zero_stage,
                          grad_clip=t.grad_clip, bf16=use_bf16)
    return init_engine(model, opt, sched, ds)


def export(state_dict: dict, cfg: PipelineConfig, out_dir: str, name: str) -> None:
    """``<name>.safetensors`` + ``config.json`` (the whole resolved config, mel hash included)."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}
    meta = {"mel_hash": cfg.mel.config_hash(), "component": name}
    storage.write_bytes(storage.join(out_dir, f"{name}.safetensors"), save(tensors, metadata=meta))
    storage.write_json(storage.join(out_dir, "config.json"), {**meta, "config": to_dict(cfg)})


def load_safetensors(uri: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(storage.read_bytes(uri))


def train_fn(config: dict) -> None:
    import ray.train

    cfg = from_dict(PipelineConfig, config["cfg"])
    job = config["job"]
    t: TrainConfig = getattr(cfg, SECTIONS[job])
    rank = ray.train.get_context().get_world_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    torch.manual_seed(t.seed + rank)  # per-rank streams; checkpoints restore them per rank
    generator = None  # crops and noise use the global RNG, which checkpoints save
    shard = ray.train.get_dataset_shard("train")
    logger = RunLogger(config["run_id"], rank, tracking=config["tracking_uri"])

    if job in ("vae", "vocoder"):
        gen, disc = (vae_parts if job == "vae" else vocoder_parts)(cfg)
        engines = {"generator": _engine(gen, t, t.lr, use_bf16), "discriminator": _engine(disc, t, t.disc_lr or t.lr, use_bf16)}
        step, batches, artifacts = (vae_step if job == "vae" else vocoder_step)(
            cfg, engines["generator"], engines["discriminator"], shard, generator, device)
        spec = Job(engines, step, batches, t.batch_size, artifacts=artifacts)
    else:
        unet = build_unet(cfg)
        engines = {"unet": _engine(unet, t, t.lr, use_bf16)}
        ema = EMA(engines["unet"].module, t.ema_decay).to(device)
        vae = build_vae(cfg)
        vae.load_state_dict(load_safetensors(config["vae_weights"]))
        vae = vae.to(device).eval()
        vocoder = None
        if config.get("vocoder_weights"):
            from lafma.models import build_vocoder

            vocoder = build_vocoder(cfg)
            vocoder.load_state_dict(load_safetensors(config["vocoder_weights"]))
            vocoder.eval()
        null = (torch.tensor(config["null_emb"]).reshape(1, -1, cfg.context_dim),
                torch.ones(1, len(config["null_emb"]) // cfg.context_dim, dtype=torch.bool))
        step, batches, artifacts = lfm_step(cfg, engines["unet"], ema, shard, generator, device, null,
                                            decoder=vae.decode, vocoder=vocoder)
        spec = Job(engines, step, batches, t.batch_size, artifacts=artifacts,
                   extra_state=lambda: {"ema": ema.state_dict()},
                   load_extra_state=lambda s: s.get("ema") and ema.load_state_dict(s["ema"]))

    with system_metrics(config["run_id"], rank=rank, tracking=config["tracking_uri"]):
        result = run_loop(spec, t, rank=rank, logger=logger, fail_marker_dir=config["fail_marker_dir"],
                          label=SECTIONS[job])
    if rank == 0:
        if job == "lfm":
            export(ema.model.state_dict(), cfg, config["out_dir"], "unet")
        else:
            module = engines["generator"].module
            export((module.vae if job == "vae" else module).state_dict(), cfg, config["out_dir"], job)
        storage.write_json(storage.join(config["out_dir"], "result.json"), result)
