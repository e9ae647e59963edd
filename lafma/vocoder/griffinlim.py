"""Griffin-Lim vocoder: a training-free baseline with the HiFi-GAN generator's interface."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from lafma.config import MelConfig

# Far below the log-mel floor (clamp_min ~1e-5), far above float32's denormals.
_TINY = 1e-20


class GriffinLimVocoder(nn.Module):
    """Log-mel → waveform by non-negative mel inversion and Griffin-Lim phase recovery.

    Inverts :class:`lafma.audio.mel.MelSpectrogram`: ``exp`` undoes the log (values clamped
    there stay at ``clamp_min``), a non-negative inverse of the same slaney filterbank gives
    a linear magnitude spectrogram, and Griffin-Lim (power 1: magnitudes, not power) finds a
    consistent phase. Quality is far below HiFi-GAN; it needs no weights, which makes it a
    baseline and a way to listen to mels before a vocoder is trained.

    The mel inversion is not ``torchaudio.transforms.InverseMelScale``: its least-squares
    solution goes negative and is then clipped, which wrecks the quiet bins a log-mel weighs
    as much as the loud ones (mean log-mel error of a 440 Hz tone after Griffin-Lim: 0.67
    with it, 0.35 with this). Instead, multiplicative updates minimise the KL divergence
    between the target mel and the mel of a non-negative spectrogram (Lee & Seung, 2001);
    KL weighs relative, not absolute, error, and ~30 updates match the mel to < 1 %.

    Args:
        sample_rate, n_fft, win_length, hop_length, n_mels, f_min, f_max: as in
            :class:`lafma.config.MelConfig`; must match the mels to invert.
        n_iter: Griffin-Lim iterations.
        inverse_iters: Multiplicative updates of the mel inversion.
        momentum: of the phase updates ("fast Griffin-Lim", Perraudin et al. 2013; torchaudio's
            default 0.99).

    The iterations are torchaudio's ``griffinlim`` (same random start, same momentum update),
    written out so that a batch can start each item from its own seeded phase
    (``forward(mel, seeds=…)``): torchaudio's draws the whole batch's from the global RNG, so
    reproducible per-item audio had to be vocoded one item at a time.
    """

    def __init__(self, *, sample_rate: int = 16000, n_fft: int = 1024, win_length: int = 1024,
                 hop_length: int = 160, n_mels: int = 64, f_min: float = 0.0,
                 f_max: float = 8000.0, n_iter: int = 32, inverse_iters: int = 32, momentum: float = 0.99):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.hop, self.n_fft, self.win_length = hop_length, n_fft, win_length
        self.n_iter, self.momentum = n_iter, momentum
        # Griffin-Lim's centred STFT reflect-pads its signal by n_fft / 2, so it needs a
        # signal ((frames - 1) * hop samples) longer than that: shorter mels get silent frames.
        self.min_frames = n_fft // (2 * hop_length) + 2
        self.inverse_iters = inverse_iters
        # The very filterbank torchaudio.transforms.MelSpectrogram builds for MelSpectrogram.
        fb = torchaudio.functional.melscale_fbanks(
            n_freqs=n_fft // 2 + 1, f_min=f_min, f_max=f_max, n_mels=n_mels,
            sample_rate=sample_rate, norm="slaney", mel_scale="slaney",
        )  # (F, n_mels)
        # Not persistent: the vocoder has no weights, so its state dict stays empty.
        self.register_buffer("fb", fb.T.contiguous(), persistent=False)  # (n_mels, F)
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)

    @classmethod
    def from_config(cls, mel_cfg: MelConfig, n_iter: int = 32, inverse_iters: int = 32,
                    momentum: float = 0.99) -> GriffinLimVocoder:
        return cls(sample_rate=mel_cfg.sample_rate, n_fft=mel_cfg.n_fft,
                   win_length=mel_cfg.win_length, hop_length=mel_cfg.hop_length,
                   n_mels=mel_cfg.n_mels, f_min=mel_cfg.f_min, f_max=mel_cfg.f_max,
                   n_iter=n_iter, inverse_iters=inverse_iters, momentum=momentum)

    @torch.no_grad()
    def inverse_mel(self, mel_mag: Tensor) -> Tensor:
        """Non-negative spectrogram whose mel is ``mel_mag``: (B, n_mels, T) → (B, F, T)."""
        fb = self.fb
        # Each bin's total filter weight; bins outside [f_min, f_max] have none and stay ~0.
        weight = fb.sum(0)[:, None].clamp_min(_TINY)  # (F, 1)
        # Start from the weight-averaged mel energies covering each bin: smooth and positive.
        spec = fb.T @ mel_mag / weight  # (B, F, T)
        for _ in range(self.inverse_iters):
            # KL multiplicative update; the floor keeps values out of the (slow) denormals.
            ratio = mel_mag / (fb @ spec).clamp_min(_TINY)  # (B, n_mels, T)
            spec = (spec * (fb.T @ ratio) / weight).clamp_min(_TINY)
        return spec

    # Its output depends on the RNG (the initial phase): callers that promise reproducible
    # audio seed each item (see LafmaPipeline).
    stochastic = True
    takes_seeds = True  # forward(mel, seeds=...): a batch with each item's phase from its own seed

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Bundles written before the iterations were written out here hold torchaudio's
        # GriffinLim window as a buffer (``griffin_lim.window``): the Hann window of this very
        # config, nothing learned. Accept it, so those bundles still load strictly.
        legacy = state_dict.pop(prefix + "griffin_lim.window", None)
        if legacy is not None and not torch.equal(legacy.to(self.window), self.window):
            raise ValueError(f"{prefix}griffin_lim.window is not this vocoder's Hann window of {self.win_length}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _stft(self, wav: Tensor) -> Tensor:
        return torch.stft(wav, n_fft=self.n_fft, hop_length=self.hop, win_length=self.win_length, window=self.window,
                          center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)

    def _istft(self, spec: Tensor, length: int) -> Tensor:
        return torch.istft(spec, n_fft=self.n_fft, hop_length=self.hop, win_length=self.win_length,
                           window=self.window, length=length)

    def griffin_lim(self, spec: Tensor, angles: Tensor) -> Tensor:
        """Phase recovery from ``angles`` (B, F, T) complex: (B, F, T) magnitude → (B, (T − 1) · hop)."""
        length = (spec.shape[-1] - 1) * self.hop
        beta = self.momentum / (1 + self.momentum)
        previous = torch.zeros((), dtype=spec.dtype, device=spec.device)
        for _ in range(self.n_iter):
            rebuilt = self._stft(self._istft(spec * angles, length))  # (B, F, T)
            angles = rebuilt - beta * previous if self.momentum else rebuilt
            angles = angles / (angles.abs() + 1e-16)
            previous = rebuilt
        return self._istft(spec * angles, length)

    def initial_phase(self, shape: tuple[int, ...], seeds: Sequence[int] | None, device: torch.device) -> Tensor:
        """(B, F, T) complex starting phases: item i from ``Generator(seeds[i])``, or the whole
        batch from the global RNG. Either way the draw torchaudio's ``griffinlim`` makes."""
        if seeds is None:
            return torch.rand(shape, dtype=torch.complex64).to(device)
        if len(seeds) != shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {shape[0]} mels")
        return torch.stack([torch.rand(shape[1:], dtype=torch.complex64, generator=torch.Generator().manual_seed(int(s)))
                            for s in seeds]).to(device)

    @torch.no_grad()
    def forward(self, mel: Tensor, seeds: Sequence[int] | None = None) -> Tensor:
        """Vocode.

        Args:
            mel: (B, n_mels, T) log-mel.
            seeds: one per item: item i's initial phase is drawn from ``Generator(seeds[i])``,
                so its audio depends on its mel and seed alone, whatever else is in the batch
                (and equals that item vocoded alone after ``torch.manual_seed(seeds[i])``).
                None: the whole batch's phases come from the global RNG.

        Returns:
            (B, T * hop) waveform.
        """
        n_out = mel.shape[-1] * self.hop
        spec = self.inverse_mel(torch.exp(mel.float()))  # (B, F, T) magnitude
        spec = F.pad(spec, (0, max(0, self.min_frames - spec.shape[-1])))  # (B, F, T' >= T)
        wav = self.griffin_lim(spec, self.initial_phase(tuple(spec.shape), seeds, spec.device))  # (B, (T' - 1) * hop)
        # GriffinLim's STFT is centred, so its frame k sits on output sample k * hop, while
        # MelSpectrogram's frame k sits on input sample k * hop + hop / 2: delay by half a
        # hop, then pad or crop to exactly T * hop.
        wav = F.pad(wav, (self.hop // 2, 0))
        wav = F.pad(wav, (0, max(0, n_out - wav.shape[-1])))
        return wav[..., :n_out]
