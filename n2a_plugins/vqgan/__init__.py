"""The `vqgan` and `kl-vae` autoencoder plugins: VQGAN (Esser et al. 2021) as latent
diffusion uses it, and LDM's KL-regularised autoencoder trained with the same objective.

model.py holds the encoder, decoder and both autoencoders, quantizer.py the vector
quantizer, losses.py LPIPS, the PatchGAN discriminator and the adaptive GAN weight.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from n2a_core import BuildContext, ComponentSpec, hookimpl
from n2a_plugins.vqgan.model import VQGAN, AdversarialAutoencoder, KLAutoencoder


class AdversarialAutoencoderSpec(ComponentSpec):
    """What both autoencoders share: the network and the L1 / LPIPS / PatchGAN objective."""

    base_channels: int = Field(64, ge=1, le=1024)
    """Channels of the first level; level i has base_channels * channel_mult[i]."""
    channel_mult: list[Annotated[int, Field(ge=1, le=64)]] = Field([1, 2, 2], min_length=1, max_length=8)
    """Channel multiplier per level; f = 2^(len - 1) (so [1, 2, 2] gives f = 4)."""
    num_res_blocks: int = Field(1, ge=1, le=8)
    """ResNet blocks per level in the encoder (the decoder has one more per level)."""
    attention_levels: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    """Levels with self-attention after each ResNet block; level i works at resolution
    H / 2^i. The middle block (at H / f) always has one. Attention at level 0 is costly."""
    z_channels: int = Field(4, ge=1, le=256)
    """n_z: latent channels."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout inside the ResNet blocks."""
    l1_weight: float = Field(1.0, ge=0)
    """Weight of the L1 reconstruction loss."""
    perceptual: Literal["none", "lpips"] = "none"
    """Perceptual loss. 'lpips' needs local VGG16 + LPIPS v0.1 weight files (never downloaded)."""
    perceptual_weight: float = Field(1.0, ge=0)
    """Weight of the LPIPS loss."""
    perceptual_weights: str | None = None
    """Directory holding vgg16-397923af.pth and vgg.pth, or the path of vgg.pth; None looks
    in ~/.cache/n2a/lpips (and $TORCH_HOME/hub/checkpoints for the VGG16 file)."""
    feature_matching_weight: float = Field(0.0, ge=0)
    """Weight of the discriminator feature-matching loss (pix2pixHD): a perceptual loss that
    needs no downloaded weights. On from disc_start, with the GAN term's ramp."""
    disc_loss: Literal["hinge", "non-saturating"] = "hinge"
    """GAN objective of the PatchGAN discriminator."""
    disc_start: int = Field(1000, ge=0)
    """Step from which the discriminator trains and the GAN term is on (half the default run)."""
    disc_weight: float = Field(0.8, ge=0)
    """Factor on the adaptive GAN weight (Taming's configs use 0.8); 0 (with no feature
    matching) turns the GAN off."""
    disc_warmup: int = Field(200, ge=0)
    """Steps over which the GAN term ramps linearly from 0 to disc_weight after disc_start,
    so the untrained discriminator cannot wreck the reconstructions it starts on."""
    disc_layers: int = Field(2, ge=1, le=6)
    """Stride-2 layers of the PatchGAN: 2 sees 34 px patches (fits 32-64 px images; the
    paper's 3 sees 70 px). Images need at least 3 * 2^disc_layers pixels a side."""
    disc_channels: int = Field(64, ge=1, le=512)
    """Channels of the discriminator's first layer (doubling per layer up to 8x)."""
    disc_norm: Literal["group", "batch"] = "group"
    """Normalisation in the discriminator. GroupNorm works at any batch size and does not
    mix real and fake statistics; 'batch' is the paper's BatchNorm."""

    @model_validator(mode="after")
    def _levels_exist(self):
        levels = len(self.channel_mult)
        bad = [a for a in self.attention_levels if a >= levels]
        if bad:
            raise ValueError(f"attention_levels {bad} do not exist: channel_mult has levels 0..{levels - 1}")
        return self


class VQGANSpec(AdversarialAutoencoderSpec):
    """VQGAN autoencoder. The defaults are a small model that trains on a CPU (about
    3.8 M autoencoder parameters, f = 4, 32 x 32 images -> 4 x 8 x 8 latents); the paper's
    f = 8, n_z = 4 latent-diffusion setup is `channel_mult: [1, 2, 2, 4]`."""

    type: Literal["vqgan"] = "vqgan"
    codebook_size: int = Field(512, ge=2, le=65536)
    """K, the number of codes. 512 is plenty for small data sets; dead-code re-seeding
    keeps them in use."""
    beta: float = Field(0.25, ge=0)
    """Commitment weight: L_VQ = ||sg[z] - e||^2 + beta ||z - sg[e]||^2 (VQ-VAE eq. 3)."""
    l2_normalize_codes: bool = False
    """Look codes up by cosine similarity on unit-normalised vectors (ViT-VQGAN, Yu et al. 2022)."""
    dead_code_reseed: bool = True
    """Re-seed codes unused for `dead_code_after` training steps with encoder outputs."""
    dead_code_after: int = Field(100, ge=1)
    """Training steps without use after which a code counts as dead."""
    latent: Literal["continuous", "quantized"] = "continuous"
    """What `encode` gives stage 2: the pre-quantization latent (LDM) or the codes."""


class KLAutoencoderSpec(AdversarialAutoencoderSpec):
    """KL-regularised autoencoder (LDM's "KL-reg"): no codebook, so no quantization error
    between the latent stage 2 learns and the one the decoder sees."""

    type: Literal["kl-vae"] = "kl-vae"
    kl_weight: float = Field(1e-6, ge=0)
    """Weight of KL(q(z|x) || N(0, I)) against the per-image reconstruction loss (LDM: 1e-6)."""
    latent_noise: float = Field(0.0, ge=0, le=10)
    """Training only: the decoder also sees Gaussian noise of std latent_noise * |n| (n ~ N(0, 1)
    per image) times the latents' std, as the sigma-VAE of Sun et al. 2024 does, so that it
    learns to absorb the errors a denoiser leaves in the latents it samples. 0: off."""


def _build(model_class: type[AdversarialAutoencoder]):
    def build(spec: AdversarialAutoencoderSpec, ctx: BuildContext) -> AdversarialAutoencoder:
        params = spec.params()
        if not ctx.training:
            params["perceptual"] = "none"  # sampling and evaluation never need the VGG weights
        return model_class(**params).to(ctx.device)

    return build


@hookimpl
def register_autoencoders(register):
    register("vqgan", VQGANSpec, _build(VQGAN), "VQGAN: vector-quantized autoencoder, L1/LPIPS/PatchGAN losses")
    register("kl-vae", KLAutoencoderSpec, _build(KLAutoencoder),
             "KL-regularised autoencoder (LDM), L1/LPIPS/feature-matching/PatchGAN losses")
