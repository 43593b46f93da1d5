"""The `diffusers` autoencoder: a pretrained diffusers AutoencoderKL or VQModel as stage 1.

`n2a train --autoencoder diffusers --set autoencoder.path=stabilityai/sd-vae-ft-mse` (or a
local folder, e.g. one written by `n2a export --format diffusers`, with
`autoencoder.subfolder=vqvae`) skips training stage 1: n2a only estimates the latent
scale on the training images, as it does for its own VQGAN (1 / std of the latents,
Rombach et al. 2022, sec. 4.3.2), and diffuses the latents.

encode: AutoencoderKL gives the mean of its posterior (deterministic; LDM diffuses a
sample, whose extra noise is tiny next to the diffusion's), VQModel its pre-quantization
latent (decode quantizes, as n2a's VQGAN does). The wrapped model is an ordinary
sub-module, so its weights are saved with the run and key the latent cache.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from n2a_core import Autoencoder, AutoencoderLosses, BuildContext, ComponentSpec, PluginError, SpecError, hookimpl

try:
    from diffusers import AutoencoderKL, VQModel
except ImportError:
    raise PluginError("diffusers is not installed; pip install 'n2a[diffusers]'") from None

CLASSES = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}


class DiffusersAutoencoderSpec(ComponentSpec):
    """A pretrained diffusers autoencoder, frozen; stage 1 is not trained."""

    type: Literal["diffusers"] = "diffusers"
    path: str = Field(min_length=1)
    """Local folder or Hugging Face Hub id of a diffusers AutoencoderKL or VQModel."""
    subfolder: str | None = None
    """Sub-folder of `path` holding the model (a pipeline's `vae` or `vqvae`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""


class DiffusersAutoencoder(Autoencoder):
    """n2a's Autoencoder interface around a diffusers AutoencoderKL or VQModel."""

    pretrained = True

    def __init__(self, model: AutoencoderKL | VQModel):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.kind = type(model).__name__
        self.latent_channels = int(model.config.latent_channels)
        self.downsample_factor = 2 ** (len(model.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_image_size(images.shape[-2], images.shape[-1])
        if self.kind == "AutoencoderKL":
            z = self.model.encode(images).latent_dist.mode()
        else:
            z = self.model.encode(images).latents
        return z * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents / self.latent_scale).sample

    def training_losses(self, images: torch.Tensor, step: int) -> AutoencoderLosses:
        raise SpecError("autoencoder (diffusers): a pretrained autoencoder is not trained by n2a; "
                        "`n2a train` skips stage 1 for it")


def load_pretrained(spec: DiffusersAutoencoderSpec):
    """The diffusers model at spec.path, of whichever supported class its config names."""
    options = {"subfolder": spec.subfolder, "revision": spec.revision}
    try:
        config = AutoencoderKL.load_config(spec.path, **options)
    except (OSError, ValueError) as exc:
        where = f"{spec.path}" + (f" (subfolder {spec.subfolder})" if spec.subfolder else "")
        raise SpecError(f"autoencoder.path: cannot read a diffusers model config at {where} "
                        f"({str(exc).strip().splitlines()[0]}); give a local folder or a Hub id") from None
    name = config.get("_class_name")
    if name not in CLASSES:
        raise SpecError(f"autoencoder.path: {spec.path} holds a {name}, not one of {', '.join(CLASSES)}")
    return CLASSES[name].from_pretrained(spec.path, **options)


def build(spec: DiffusersAutoencoderSpec, ctx: BuildContext) -> DiffusersAutoencoder:
    return DiffusersAutoencoder(load_pretrained(spec)).to(ctx.device)


@hookimpl
def register_autoencoders(register):
    register("diffusers", DiffusersAutoencoderSpec, build,
             "A pretrained diffusers AutoencoderKL or VQModel (local folder or Hub id); stage 1 is skipped")
