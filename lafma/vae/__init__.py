"""The mel VAE (AudioLDM's KL autoencoder), its PatchGAN discriminator and its losses."""

from lafma.vae.discriminator import NLayerDiscriminator
from lafma.vae.distributions import DiagonalGaussian
from lafma.vae.losses import VAELoss, adopt_weight, hinge_d_loss
from lafma.vae.model import Decoder, Encoder, MelVAE, image_to_mel, mel_to_image

__all__ = ["Decoder", "DiagonalGaussian", "Encoder", "MelVAE", "NLayerDiscriminator", "VAELoss",
           "adopt_weight", "hinge_d_loss", "image_to_mel", "mel_to_image"]
