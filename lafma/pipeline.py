"""Text → waveform inference: text encoder → ODE in latent space → VAE decoder → vocoder."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lafma.config import MAX_DURATION_SECONDS, MelConfig
from lafma.flow import ClassifierFreeGuidance, Solution, solve

# Latents a CPU decodes and vocodes at a time (LafmaPipeline.decode): measured on 2 cores,
# benchmarks/results/generate_cpu2.md.
CPU_DECODE_BATCH = 4


def sample_latents(velocity: Callable[..., Tensor], noise: Tensor, context: Tensor, context_mask: Tensor, *,
                   guidance: float, null_condition: tuple[Tensor, Tensor] | None = None, solver: str = "euler",
                   steps: int = 10, rtol: float = 1e-4, atol: float = 1e-4, grid: str = "uniform", t0: float = 0.0,
                   project: Callable[[Tensor, float], Tensor] | None = None, duration: Tensor | None = None) -> Solution:
    """Noise → latent: integrate dx/dt = u(x, t, c) from t = 0 (noise) to t = 1 (data), guided.

    What inference and the LFM job's training-time samples share, so that a sample logged
    during training is what :meth:`LafmaPipeline.generate` would make of the same noise.

    Args:
        velocity: u(x, t, context=, context_mask=), e.g. the (EMA) UNet.
        noise: x0, (B, C, T', F').
        context, context_mask: caption embeddings (B, L, D) and mask (B, L).
        guidance: classifier-free guidance weight w; at 1 the conditional model alone (one
            evaluation per call instead of two).
        null_condition: the empty caption's (embedding (1, L0, D), mask (1, L0)), or one per
            item (B, L0, D), (B, L0); needed unless ``guidance`` is 1.
        solver, steps, rtol, atol, grid, project: see :func:`lafma.flow.solve`.
        t0: where ``noise`` lies on the path (0: pure noise; more: audio-to-audio).
        duration: (B,) seconds each latent holds, for a velocity model conditioned on duration
            (:class:`lafma.unet.UNet` with ``duration_embedding``); None for one without.

    Returns:
        The :class:`~lafma.flow.Solution`: ``x`` (B, C, T', F') scaled latents and ``nfe``.
    """
    if guidance != 1.0:
        if null_condition is None:
            raise ValueError(f"guidance {guidance} needs the empty caption's embedding (null_condition)")
        null_context, null_mask = (t.to(noise.device) for t in null_condition)
        velocity = ClassifierFreeGuidance(velocity, guidance, null_context, null_mask)
    extra = {} if duration is None else {"duration": duration.to(noise.device)}
    return solve(velocity, noise, method=solver, steps=steps, rtol=rtol, atol=atol, grid=grid, t0=t0,
                 project=project, context=context, context_mask=context_mask, **extra)


@dataclass
class Generation:
    """One batch of generated audio.

    Attributes:
        audio: (B, N) float waveforms at ``sample_rate``.
        latents: (B, C, T', F') final ODE states (before the VAE scale factor is undone).
        seeds: the seed of each item.
        nfe: function evaluations of the velocity model for the whole batch (guidance counts 2).
        sample_rate: of ``audio``.
    """

    audio: Tensor
    latents: Tensor
    seeds: list[int]
    nfe: int
    sample_rate: int


class LafmaPipeline(nn.Module):
    """Generates audio for captions; each item's noise comes from its own seed.

    The same caption and seed give the same audio whatever else is in the batch: noise is
    drawn per item from ``torch.Generator(seed)`` on the CPU (so it is also the same on any
    device), text padding is masked in cross-attention, and every layer is per-item in eval
    mode. (The adaptive ``dopri5`` solver is the one exception: its step sizes follow the
    error of the whole batch.)

    Args:
        text_encoder: captions → (emb (B, L, D), mask (B, L)).
        unet: velocity model u(x, t, context, context_mask).
        vae: has ``decode(z (B, C, T', F')) → mel (B, n_mels, T)``.
        vocoder: mel (B, n_mels, T) → waveform (B, T · hop).
        sample_rate, hop_length, n_mels: of the shared mel config.
        latent_channels: C; vae_downsample: r (mel frames and bins per latent cell).
        scale_factor: latents were multiplied by this for training.
        unet_downsample: latent frames are rounded up to a multiple of it.
        solver, steps, guidance, duration: sampling defaults (overridable per call).
        peak_normalize, peak: scale each clip so that its peak is ``peak``.
        grid, null_caption: the solver's time grid and the unconditional input
            (``lafma.config.SamplerConfig``; "released" reproduces the released sampler).
        mel, sigma_min: the mel config the VAE was trained on and the flow path's
            ``sigma_min``; needed only to start from audio (:meth:`generate`'s ``audio``).
        max_duration: the longest clip :meth:`generate` makes, in seconds; None: up to
            :data:`~lafma.config.MAX_DURATION_SECONDS`. A UNet conditioned on duration (its
            ``takes_duration``) is given each call's duration and knows no longer clip than it
            was trained on: its pipeline sets this to that length
            (:attr:`lafma.config.LafmaConfig.max_duration`).
        decode_batch: latents decoded and vocoded this many at a time after sampling; None:
            :data:`CPU_DECODE_BATCH` on a CPU, the whole batch on an accelerator.
    """

    def __init__(self, *, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module, vocoder: nn.Module,
                 sample_rate: int, hop_length: int, n_mels: int, latent_channels: int, vae_downsample: int,
                 scale_factor: float = 1.0, unet_downsample: int = 8, solver: str = "euler", steps: int = 10,
                 guidance: float = 3.0, duration: float = 10.24, peak_normalize: bool = True,
                 rtol: float = 1e-4, atol: float = 1e-4, peak: float = 0.95, grid: str = "uniform",
                 null_caption: str = "masked", mel: MelConfig | None = None, sigma_min: float = 0.0,
                 max_duration: float | None = None, decode_batch: int | None = None):
        super().__init__()
        self.text_encoder, self.unet, self.vae, self.vocoder = text_encoder, unet, vae, vocoder
        self.sample_rate, self.hop_length, self.n_mels = sample_rate, hop_length, n_mels
        self.latent_channels, self.vae_downsample, self.unet_downsample = latent_channels, vae_downsample, unet_downsample
        self.scale_factor = scale_factor
        self.defaults = dict(solver=solver, steps=steps, guidance=guidance, duration=duration)
        self.peak_normalize, self.rtol, self.atol = peak_normalize, rtol, atol
        self.peak, self.grid, self.null_caption = peak, grid, null_caption
        self._null_cache = None
        # For audio in (audio-to-audio, inpainting): the mel front end the VAE was trained on, and
        # the flow path's sigma_min. A config, not a submodule: the pipeline's state stays its models'.
        self.mel_config, self.sigma_min = mel, sigma_min
        self.max_duration = max_duration
        if decode_batch is not None and decode_batch < 1:
            raise ValueError(f"decode_batch must be >= 1, got {decode_batch}")
        self.decode_batch = decode_batch

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def latent_shape(self, duration: float) -> tuple[int, int, int]:
        """(C, T', F') for ``duration`` seconds, T' rounded up so the UNet can halve it."""
        frames = math.ceil(duration * self.sample_rate / self.hop_length)
        multiple = self.vae_downsample * self.unet_downsample
        t_latent = math.ceil(frames / multiple) * self.unet_downsample
        return self.latent_channels, t_latent, self.n_mels // self.vae_downsample

    def noise(self, seeds: Sequence[int], shape: tuple[int, ...]) -> Tensor:
        """(B, *shape) Gaussian noise, item i drawn from a generator seeded with seeds[i]."""
        out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(out).to(self.device)

    def vocode(self, mel: Tensor, seeds: Sequence[int]) -> Tensor:
        """mel (B, n_mels, T) → (B, T · hop). A stochastic vocoder (Griffin-Lim's random initial
        phase) draws each item's randomness from the item's seed, so its audio too depends on
        nothing but the caption and the seed: in one batch where the vocoder takes ``seeds``
        (:class:`~lafma.vocoder.GriffinLimVocoder`), else item by item with the RNG seeded."""
        if not getattr(self.vocoder, "stochastic", False):
            return self.vocoder(mel)
        if getattr(self.vocoder, "takes_seeds", False):
            return self.vocoder(mel, seeds=seeds)
        devices = [mel.device] if mel.device.type == "cuda" else []
        out = []
        for m, seed in zip(mel, seeds):
            with torch.random.fork_rng(devices=devices):  # leave the caller's RNG stream alone
                torch.manual_seed(int(seed))
                out.append(self.vocoder(m[None])[0])
        return torch.stack(out)

    def decode_chunk(self, device: torch.device) -> int | None:
        """Latents :meth:`decode` takes at a time on ``device``; None: the whole batch."""
        return self.decode_batch or (CPU_DECODE_BATCH if device.type == "cpu" else None)

    def decode(self, latents: Tensor, seeds: Sequence[int]) -> Tensor:
        """Sampled latents (B, C, T', F') → waveforms (B, T · hop), :attr:`decode_batch` at a time.

        Unlike the sampling loop, decoding and vocoding gain nothing from a large batch on a
        CPU: their activations outgrow the caches, and Griffin-Lim's FFTs are the same work a
        clip at any batch size (benchmarks/results/generate_cpu2.md). Each item's audio is its
        own either way (every layer is per item, the vocoder's phase comes from its seed)."""
        n = self.decode_chunk(latents.device) or len(latents)
        out = []
        for i in range(0, len(latents), n):
            mel = self.vae.decode(latents[i : i + n] / self.scale_factor)  # (b, n_mels, T)
            out.append(self.vocode(mel, seeds[i : i + n]))
        return torch.cat(out)

    def null_condition(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The unconditional input for captions with token mask (B, L): the empty caption's
        real tokens, shared, (1, L0, D) — or with ``null_caption="released"`` the released
        sampler's "" padded to each caption's own length and attended unmasked, (B, L, D)."""
        if self.null_caption != "released":
            # The empty caption's embedding is the same for every call: encoding it again cost
            # each generate() call a text-encoder pass (benchmarks/results/generate_cpu2.md).
            # Keyed by where the encoder's weights live, so a pipeline moved to a GPU re-encodes.
            param = next(self.text_encoder.parameters(), None)
            key = (None, None) if param is None else (param.device, param.dtype)
            if self._null_cache is None or self._null_cache[0] != key:
                with torch.no_grad():
                    self._null_cache = (key, self.text_encoder([""]))
            return self._null_cache[1]
        lengths = mask.sum(dim=1).tolist()
        by_length = {n: self.text_encoder.padded_empty(n) for n in set(lengths)}
        emb = torch.zeros(len(lengths), mask.shape[1], by_length[lengths[0]][0].shape[-1], device=mask.device)
        null_mask = torch.zeros_like(mask, dtype=torch.bool)
        for i, n in enumerate(lengths):
            emb[i, :n], null_mask[i, :n] = by_length[n][0][0].to(mask.device), True
        return emb, null_mask

    def encode_audio(self, audio: Tensor, shape: tuple[int, int, int]) -> Tensor:
        """Waveforms (B, N) at :attr:`sample_rate` → their scaled latents (B, *shape): the VAE
        posterior's mean, times the scale factor, as training saw them. Audio is cut or
        zero-padded to the latent grid's length first."""
        from lafma.audio import MelSpectrogram

        if self.mel_config is None:
            raise ValueError("this pipeline has no mel config: it cannot start from audio")
        samples = shape[1] * self.vae_downsample * self.hop_length
        audio = audio.float().cpu()[:, :samples]
        audio = torch.nn.functional.pad(audio, (0, samples - audio.shape[-1]))
        mel = MelSpectrogram.from_config(self.mel_config)(audio)  # (B, n_mels, T' · r)
        return self.vae.encode(mel.to(self.device)).mean * self.scale_factor

    def on_path(self, noise: Tensor, data: Tensor, t: float) -> Tensor:
        """The flow path's point at time ``t`` between ``noise`` (t = 0) and ``data`` (t = 1)."""
        return (1.0 - (1.0 - self.sigma_min) * t) * noise + t * data

    def latent_frames(self, start: float, end: float, frames: int) -> slice:
        """The latent frames a time range (seconds) touches: every frame overlapping it."""
        seconds = self.vae_downsample * self.hop_length / self.sample_rate  # per latent frame
        first, last = math.floor(start / seconds), math.ceil(end / seconds)
        return slice(max(0, min(first, frames)), max(0, min(last, frames)))

    @torch.no_grad()
    def generate(self, captions: Sequence[str], *, seeds: Sequence[int] | None = None, steps: int | None = None,
                 guidance: float | None = None, solver: str | None = None, duration: float | None = None,
                 audio: Tensor | None = None, strength: float = 1.0,
                 regenerate: tuple[float, float] | None = None) -> Generation:
        """Generate one clip per caption; from noise, or starting from audio.

        Args:
            captions: B strings ("" is the unconditional input).
            seeds: one per caption; random (and returned) when omitted.
            steps, guidance, solver, duration: override the pipeline's defaults.
            audio: (N,) or (B, N) waveforms at :attr:`sample_rate` to start from; ``duration``
                defaults to its length. Shorter than ``duration``, it is padded with silence
                (continuation: regenerate what lies past its end).
            strength: audio-to-audio (SDEdit): the ODE starts at t = 1 − ``strength`` from the
                input's latent mixed with the seed's noise on the flow path, and takes
                round(``steps`` · ``strength``) steps. 1 is plain generation with the same seed;
                0 returns the input's VAE round trip.
            regenerate: inpainting: ``(start, end)`` seconds to generate; every other latent
                frame is put back on its path from the input after every step, so it ends as the
                input's latent. Fixed-step solvers only.

        Returns:
            :class:`Generation` with (B, round(duration · sample_rate)) audio.

        Raises:
            ValueError: arguments that cannot be generated, among them a duration past
                :attr:`max_duration`.
        """
        captions = list(captions)
        if not captions:
            raise ValueError("no captions to generate")
        seeds = [secrets.randbelow(2**31) for _ in captions] if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(captions):
            raise ValueError(f"{len(seeds)} seeds for {len(captions)} captions")
        if audio is None and (regenerate is not None or strength != 1.0):
            raise ValueError("strength and regenerate start from audio: give audio")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if audio is not None:
            audio = audio.reshape(1, -1) if audio.dim() == 1 else audio
            if audio.shape[0] not in (1, len(captions)):
                raise ValueError(f"{audio.shape[0]} input clips for {len(captions)} captions")
            audio = audio.expand(len(captions), -1)
            if duration is None:
                duration = audio.shape[-1] / self.sample_rate
        steps = steps or self.defaults["steps"]
        guidance = self.defaults["guidance"] if guidance is None else guidance
        solver = solver or self.defaults["solver"]
        duration = duration or self.defaults["duration"]
        if not 0 < duration <= MAX_DURATION_SECONDS:
            raise ValueError(f"duration must be in (0, {MAX_DURATION_SECONDS:g}] seconds, got {duration}")
        if self.max_duration is not None and duration > self.max_duration:
            raise ValueError(f"duration {duration:g} s is longer than this model's trained maximum, "
                             f"{self.max_duration:g} s: it is conditioned on duration and learned no longer clip")

        context, mask = self.text_encoder(captions)
        context, mask = context.to(self.device), mask.to(self.device)
        null = self.null_condition(mask) if guidance != 1.0 else None
        shape = self.latent_shape(duration)
        x0 = self.noise(seeds, shape)  # (B, C, T', F')
        seconds = torch.full((len(captions),), float(duration)) if getattr(self.unet, "takes_duration", False) else None
        t0, project, grid = 0.0, None, self.grid if solver == "euler" else "uniform"
        if audio is not None:
            given = self.encode_audio(audio, shape)
            if regenerate is not None:
                start, end = regenerate
                if not 0 <= start < end:
                    raise ValueError(f"regenerate needs 0 <= start < end seconds, got {start}:{end}")
                known = torch.ones(shape[1], dtype=torch.bool, device=x0.device)
                known[self.latent_frames(start, end, shape[1])] = False
                known = known.view(1, 1, -1, 1)

                def project(x: Tensor, t: float) -> Tensor:
                    return torch.where(known, self.on_path(x0, given, t), x)
            if strength < 1.0:
                t0, grid = 1.0 - strength, "uniform"
                steps = round(steps * strength)
            x_start = self.on_path(x0, given, t0)
        else:
            x_start = x0
        if steps == 0:  # strength 0: the input's latent as it is
            sol = Solution(self.on_path(x0, given, 1.0), 0, 0)
        else:
            sol = sample_latents(self.unet, x_start, context, mask, guidance=guidance, null_condition=null,
                                 solver=solver, steps=steps, rtol=self.rtol, atol=self.atol, grid=grid, t0=t0,
                                 project=project, duration=seconds)
        audio = self.decode(sol.x, seeds)[:, : round(duration * self.sample_rate)]  # (B, N)
        if self.peak_normalize:
            # The paper peak-normalises its outputs; the floor keeps silence silent.
            peak = audio.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
            audio = audio / peak * self.peak
        return Generation(audio.float().cpu(), sol.x.cpu(), seeds, sol.nfe, self.sample_rate)
