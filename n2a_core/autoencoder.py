"""The first-stage autoencoder interface: images in [-1, 1] <-> latents for diffusion."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from n2a_core.errors import SpecError


@dataclass
class AutoencoderLosses:
    """What one stage-1 training step of an autoencoder produces.

    The generic stage-1 loop backpropagates `loss` into the autoencoder's parameters and,
    when present, `discriminator_loss` into `discriminator_parameters()`. The
    discriminator loss must be computed on detached reconstructions.
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    """B x 3 x H x W in [-1, 1] (for grids and metrics)."""
    discriminator_loss: torch.Tensor | None = None
    logs: dict[str, float] = field(default_factory=dict)


class Autoencoder(nn.Module, ABC):
    """Compresses B x 3 x H x W images in [-1, 1] into B x C x H/f x W/f latents.

    `encode` returns latents already multiplied by `latent_scale` (about unit variance),
    which is what stage 2 diffuses; `decode` takes such scaled latents. H and W must be
    multiples of `downsample_factor`.
    """

    latent_channels: int
    """C, the number of latent channels (n_z)."""
    downsample_factor: int
    """f: spatial size of the latent = image size / f."""
    pretrained: bool = False
    """True for a model trained elsewhere: `n2a train` skips stage 1 for it and only
    estimates its latent_scale on the training images."""

    def __init__(self) -> None:
        super().__init__()
        # Saved with the weights so a trained autoencoder carries its own scale.
        self.register_buffer("latent_scale", torch.ones(()), persistent=True)

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [-1, 1] -> B x C x H/f x W/f, scaled by latent_scale."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents B x C x h x w -> images B x 3 x h*f x w*f, roughly in [-1, 1]."""

    @abstractmethod
    def training_losses(self, images: torch.Tensor, step: int) -> AutoencoderLosses:
        """One stage-1 training step's losses for a batch of images in [-1, 1]."""

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the discriminator optimizer (none by default)."""
        return []

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the autoencoder optimizer: all but the discriminator's."""
        disc = {id(p) for p in self.discriminator_parameters()}
        return [p for p in self.parameters() if id(p) not in disc]

    def inference_modules(self) -> list[str]:
        """Names of sub-modules that stage 2 never needs (e.g. the discriminator, the
        perceptual network); they are left out of frozen copies and latent-cache keys."""
        return []

    def check_image_size(self, height: int, width: int) -> None:
        """Raise ValueError naming the sizes when H or W is not a multiple of f."""
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the autoencoder's "
                f"downsample factor f={f}; use an image_size divisible by {f}"
            )

    def to_diffusers(self, image_size: int):
        """The same network as a diffusers model (`n2a export --format diffusers`), with
        `config.scaling_factor` = latent_scale. Plugins without an equivalent keep this refusal."""
        raise SpecError(f"autoencoder: '{type(self).__name__}' has no diffusers equivalent (its plugin "
                        "defines no to_diffusers)")

    @torch.no_grad()
    def estimate_latent_scale(self, images: torch.Tensor) -> float:
        """Set latent_scale = 1 / std of the unscaled latents of `images` (LDM practice)."""
        self.latent_scale.fill_(1.0)
        std = self.encode(images).float().std().item()
        self.latent_scale.fill_(1.0 / max(std, 1e-8))
        return float(self.latent_scale)
