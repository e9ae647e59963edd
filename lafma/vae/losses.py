"""The VAE's training losses: LDM's ``LPIPSWithDiscriminator`` without the image-only LPIPS.

Losses come back as dicts of unweighted terms (``"rec/nll"``, ``"kl"``, ``"adv/gen"``,
``"adv/disc"``, …) to be logged as-is, and :meth:`VAELoss.loss_weights` gives their lambdas:
:func:`lafma.train.losses.weighted_sum` of the two is what to backpropagate, as for the
vocoder (descript-audio-codec's shape). The one lambda that changes per step is the
adversarial one: LDM's adaptive weight times the GAN warm-start factor.

Padding: a clip shorter than ``audio.clip_seconds`` is zero-padded, its mel the log floor
there. Given a (B, T) frame ``mask`` (True on real frames), the reconstruction terms count the
real frames only; the adversarial terms are kept off the padding by the caller, which hands
the discriminator ``fill_padding(recon, mel, mask)`` (:func:`lafma.train.objectives.fill_padding`):
equal to the input there, so neither network learns anything from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lafma.config import VAELossConfig
from lafma.train.objectives import masked_mean, masked_sum
from lafma.vae.distributions import DiagonalGaussian


def adopt_weight(weight: float, step: int, threshold: int, value: float = 0.0) -> float:
    """``weight`` from step ``threshold`` on, ``value`` before it (LDM's GAN warm-start)."""
    return value if step < threshold else weight


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean(relu(1 − D(x))) + mean(relu(1 + D(x̂)))): a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class VAELoss(nn.Module):
    """ELBO with a learned-variance L1 likelihood, plus an adaptively weighted hinge GAN.

    Generator objective (LDM): nll + kl_weight · KL + λ · disc_factor(step) · (−mean D(x̂)),
    where nll = Σ |x − x̂| / exp(s) + s over all elements (s the learned scalar ``logvar``) per
    sample, and λ = disc_weight · ‖∇_w nll‖ / (‖∇_w g‖ + 1e-4) at the decoder's last layer w,
    which keeps the adversarial gradient on the scale of the reconstruction gradient.
    Discriminator objective: disc_factor(step) · hinge.

    Args:
        kl_weight: weight of the KL term (tiny: the latent only needs to be roughly Gaussian).
        logvar_init: initial value of the learned log-variance s.
        disc_start: first step at which the GAN terms count.
        disc_weight: multiplies the adaptive weight λ.
        disc_factor: GAN weight from ``disc_start`` on (0 before).
    """

    def __init__(self, *, kl_weight: float = 1e-6, logvar_init: float = 0.0, disc_start: int = 50001,
                 disc_weight: float = 0.5, disc_factor: float = 1.0):
        super().__init__()
        self.kl_weight = kl_weight
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        # A learned scalar: the likelihood's scale, trained with the generator.
        # Shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views, which
        # 0-dim tensors cannot give.
        self.logvar = nn.Parameter(torch.full((1,), float(logvar_init)))

    @classmethod
    def from_config(cls, cfg: VAELossConfig) -> VAELoss:
        return cls(kl_weight=cfg.kl_weight, logvar_init=cfg.logvar_init, disc_start=cfg.disc_start,
                   disc_weight=cfg.disc_weight, disc_factor=cfg.disc_factor)

    def disc_factor_at(self, step: int) -> float:
        """The GAN terms' factor at ``step``: ``disc_factor`` from ``disc_start`` on, else 0."""
        return adopt_weight(self.disc_factor, step, self.disc_start)

    def loss_weights(self, step: int, adv_weight: Tensor | float = 0.0) -> dict[str, float | Tensor]:
        """Lambdas for :func:`lafma.train.losses.weighted_sum`, keyed like the loss dicts.

        One dict serves both steps (keys a step lacks are skipped).

        Args:
            step: global step, for the GAN warm-start.
            adv_weight: the adaptive weight λ of this step (``"adv/weight"`` of
                :meth:`generator_losses`); only the generator's ``"adv/gen"`` uses it.
        """
        factor = self.disc_factor_at(step)
        return {"rec/nll": 1.0, "kl": self.kl_weight, "adv/gen": adv_weight * factor, "adv/disc": factor}

    def nll(self, mel: Tensor, recon: Tensor, mask: Tensor | None = None) -> Tensor:
        """Σ |x − x̂| / exp(s) + s over every element, averaged over the batch: a scalar.

        With ``mask``, the sum runs over the real frames and is scaled by all frames / real
        frames of the batch (:func:`~lafma.train.objectives.masked_sum`): the mean per real
        element times the elements of a clip, the scale the unmasked loss has (and exactly it
        when nothing is padded), so ``kl_weight`` and the adaptive GAN weight keep their meaning.

        Args:
            mel, recon: (B, n_mels, T).
            mask: (B, T) bool, True on the frames of real audio; None: every frame.
        """
        rec = (mel - recon).abs()  # (B, n_mels, T)
        m = None if mask is None else mask[:, None, :]  # (B, T) -> (B, 1, T), over the mel bins
        return masked_sum(rec / torch.exp(self.logvar) + self.logvar, m) / rec.shape[0]

    def adaptive_weight(self, nll: Tensor, g: Tensor, last_layer: Tensor | None) -> Tensor:
        """disc_weight · ‖∇ nll‖ / (‖∇ g‖ + 1e-4) at ``last_layer``, clamped to [0, 1e4], detached.

        ``last_layer`` is any tensor both losses depend on: the decoder's last weight (LDM), or
        its output (what the DeepSpeed job uses: see ``pipelines/train/vae.py``).

        Falls back to 0 when there is no graph to differentiate (evaluation, ``no_grad``).
        """
        zero = torch.zeros((), device=nll.device)
        if last_layer is None or not (nll.requires_grad and g.requires_grad):
            return zero
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True, allow_unused=True)[0]
        g_grad = torch.autograd.grad(g, last_layer, retain_graph=True, allow_unused=True)[0]
        if nll_grad is None or g_grad is None:
            return zero
        weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
        return torch.clamp(weight, 0.0, 1e4).detach() * self.disc_weight

    def generator_losses(self, mel: Tensor, recon: Tensor, posterior: DiagonalGaussian,
                         logits_fake: Tensor | None, step: int,
                         last_layer: Tensor | None = None, adv_weight: Tensor | None = None,
                         mask: Tensor | None = None) -> dict[str, Tensor]:
        """Unweighted terms of the VAE (the generator) for one batch.

        Args:
            mel: target (B, n_mels, T).
            recon: reconstruction (B, n_mels, T).
            posterior: the encoder's posterior over (B, C, T / r, n_mels / r).
            logits_fake: discriminator logits on the reconstruction, (B, 1, T', F'), or None
                before the GAN starts (its terms are then 0).
            step: global step, for the GAN warm-start.
            last_layer: the decoder's last weight (``MelVAE.get_last_layer()``).
            adv_weight: a precomputed adaptive weight, used instead of differentiating here
                (a distributed engine may not allow a second backward through its graph).
            mask: (B, T) bool, True on the frames of real audio: "rec/nll" and "rec/l1" count
                only those. ``logits_fake`` should then be D on ``fill_padding(recon, mel, mask)``
                (see the module's docstring). The KL stays over the whole latent: it never
                involves the decoder, so it cannot teach it the padding, and pulling the
                padded latent frames towards the prior at this tiny weight only keeps them
                where the flow model's noise starts. None: every frame.

        Returns:
            Scalars "rec/nll", "kl" and "adv/gen" (weighted by :meth:`loss_weights`, which takes
            "adv/weight", the adaptive λ), and "rec/l1" and "logvar" (logged only).
        """
        nll = self.nll(mel, recon, mask)
        kl = posterior.kl().mean()
        if logits_fake is None:
            g = torch.zeros((), device=mel.device)
            weight = torch.zeros((), device=mel.device)
        else:
            g = -logits_fake.mean()
            if adv_weight is not None:
                weight = adv_weight.detach()
            else:  # skip the two extra backward passes while the GAN term is switched off
                weight = self.adaptive_weight(nll, g, last_layer) if self.disc_factor_at(step) > 0 \
                    else torch.zeros_like(g)
        m = None if mask is None else mask[:, None, :]  # (B, T) -> (B, 1, T)
        return {"rec/l1": masked_mean((mel - recon).abs(), m).detach(), "rec/nll": nll, "kl": kl, "adv/gen": g,
                "adv/weight": weight, "logvar": self.logvar.detach()}

    def discriminator_losses(self, logits_real: Tensor, logits_fake: Tensor) -> dict[str, Tensor]:
        """Unweighted hinge loss of the discriminator (:meth:`loss_weights` switches it on at
        ``disc_start``).

        Args:
            logits_real: D on real mel images (B, 1, T', F').
            logits_fake: D on detached reconstructions (B, 1, T', F').

        Returns:
            Scalars "adv/disc" (weighted), "logits/real" and "logits/fake" (logged only).
        """
        return {"adv/disc": hinge_d_loss(logits_real, logits_fake), "logits/real": logits_real.detach().mean(),
                "logits/fake": logits_fake.detach().mean()}
