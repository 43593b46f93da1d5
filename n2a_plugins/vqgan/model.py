"""VQGAN (Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis") as
n2a's first-stage autoencoder, in the form latent diffusion uses it (Rombach et al. 2022,
sec. 3: the diffusion model works on the encoder's output, quantization moves into the
decoder), and its KL-regularised sibling from the same paper (LDM's "KL-reg" autoencoders).
Both share the network and the training objective (L1 + LPIPS + PatchGAN with the adaptive
weight); only the bottleneck between encoder and decoder differs.

Layout: ResNet blocks (GroupNorm, SiLU, 3x3 convs), single-head self-attention at chosen
levels and in the middle block, stride-2 convolutions down and nearest-neighbour + conv up.
Level i of `channel_mult` works at resolution H / 2^i with base_channels * channel_mult[i]
channels; the latent has resolution H / f with f = 2^(len(channel_mult) - 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from n2a_core import Autoencoder, AutoencoderLosses, preferred_layout
from n2a_plugins.vqgan.losses import (
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    gan_ramp,
    generator_loss,
    group_count,
    load_lpips,
)
from n2a_plugins.vqgan.quantizer import VectorQuantizer

GAN_LOG_KEYS = ("g_loss", "d_weight", "disc_loss", "logits_real", "logits_fake", "feature_matching")


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block; a 1x1 conv matches channels on the shortcut."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # B x 1 head x HW x C each
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                         ResnetBlock(channels, channels, dropout))  # fmt: skip


class Encoder(nn.Module):
    """Image B x 3 x H x W -> continuous latent B x z_channels x H/f x W/f (or B x
    out_channels x H/f x W/f when out_channels is given)."""

    def __init__(self, base_channels, channel_mult, num_res_blocks, attention_levels, z_channels, dropout,
                 out_channels=None):
        super().__init__()
        self.conv_in = nn.Conv2d(3, base_channels, 3, padding=1)
        blocks: list[nn.Module] = []
        c = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c, base_channels * mult, dropout))
                c = base_channels * mult
                if level in attention_levels:
                    blocks.append(AttnBlock(c))
            if level != len(channel_mult) - 1:
                blocks.append(Downsample(c))
        self.down = nn.Sequential(*blocks)
        self.mid = _middle(c, dropout)
        self.norm_out = norm(c)
        # out_channels: 2 * z_channels for a Gaussian posterior's mean and log-variance
        self.conv_out = nn.Conv2d(c, out_channels or z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(preferred_layout(x))))
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


class Decoder(nn.Module):
    """Codes B x z_channels x h x w -> image B x 3 x h*f x w*f (the encoder mirrored, with
    one extra ResNet block per level as in the reference implementation)."""

    def __init__(self, base_channels, channel_mult, num_res_blocks, attention_levels, z_channels, dropout):
        super().__init__()
        c = base_channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _middle(c, dropout)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, base_channels * channel_mult[level], dropout))
                c = base_channels * channel_mult[level]
                if level in attention_levels:
                    blocks.append(AttnBlock(c))
            if level != 0:
                blocks.append(Upsample(c))
        self.up = nn.Sequential(*blocks)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)  # GL of VQGAN eq. 7 (adaptive weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(preferred_layout(z))))
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


@dataclass
class Bottleneck:
    """What the bottleneck hands on during a training step."""

    z: torch.Tensor
    """The decoder's input (codes, or a posterior sample)."""
    loss: torch.Tensor
    """Its regularisation term (L_VQ, or the weighted KL)."""
    logs: dict[str, torch.Tensor]


class AdversarialAutoencoder(Autoencoder):
    """Encoder -> bottleneck -> decoder, trained with L1 (+ LPIPS) + the bottleneck's term
    + a PatchGAN (VQGAN eq. 6 with the adaptive weight of eq. 7):

        loss = L_rec + L_reg + ramp(step) * (disc_weight * lambda * L_GAN + fm_weight * L_FM)

    L_rec = l1_weight * |x - x^| + perceptual_weight * LPIPS(x, x^). L_FM is pix2pixHD's
    feature matching (Wang et al. 2018, eq. 4): the L1 distance between the
    discriminator's hidden features of x and x^, a perceptual loss whose network needs no
    downloaded weights because it trains alongside. Subclasses define the bottleneck.

    The LPIPS network is frozen and kept out of `state_dict()` and `parameters()`: it is
    rebuilt from its weight files, so checkpoints stay small and load with or without it.
    """

    def __init__(
        self,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] = (),
        z_channels: int = 4,
        dropout: float = 0.0,
        l1_weight: float = 1.0,
        perceptual: str = "none",
        perceptual_weight: float = 1.0,
        perceptual_weights: str | None = None,
        disc_loss: str = "hinge",
        disc_start: int = 1000,
        disc_weight: float = 0.8,
        disc_warmup: int = 200,
        disc_layers: int = 2,
        disc_channels: int = 64,
        disc_norm: str = "group",
        feature_matching_weight: float = 0.0,
        encoder_channels: int | None = None,
    ):
        super().__init__()
        if not channel_mult:
            raise ValueError("channel_mult must list at least one level, e.g. [1, 2, 2]")
        bad = [a for a in attention_levels if not 0 <= a < len(channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range: levels are 0..{len(channel_mult) - 1}")
        if perceptual not in ("none", "lpips"):
            raise ValueError(f"perceptual must be 'none' or 'lpips', got {perceptual!r}")
        self.latent_channels = z_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.l1_weight, self.perceptual_weight = l1_weight, perceptual_weight
        self.disc_loss, self.disc_weight = disc_loss, disc_weight
        self.disc_start, self.disc_warmup = disc_start, disc_warmup
        self.feature_matching_weight = feature_matching_weight
        args = (base_channels, tuple(channel_mult), num_res_blocks, set(attention_levels), z_channels, dropout)
        self.architecture = {"base_channels": base_channels, "channel_mult": list(channel_mult),
                             "num_res_blocks": num_res_blocks, "attention_levels": sorted(set(attention_levels))}
        self.encoder = Encoder(*args, out_channels=encoder_channels)
        self.decoder = Decoder(*args)
        # disc_weight and feature_matching_weight 0 switch the GAN off: no discriminator at all.
        use_disc = disc_weight > 0 or feature_matching_weight > 0
        self.discriminator = PatchDiscriminator(3, disc_channels, disc_layers, disc_norm) if use_disc else None
        # Set past nn.Module.__setattr__ so it is no submodule: see the class docstring.
        object.__setattr__(self, "_lpips", load_lpips(perceptual_weights) if perceptual == "lpips" else None)

    def bottleneck(self, h: torch.Tensor) -> Bottleneck:
        """The encoder's raw output -> the decoder's input and the regulariser, for training."""
        raise NotImplementedError

    # -- the Autoencoder interface ------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects B x 3 x H x W images, got shape {tuple(images.shape)}")
        self.check_image_size(images.shape[-2], images.shape[-1])

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters()) if self.discriminator is not None else []

    def inference_modules(self) -> list[str]:
        return ["discriminator"] if self.discriminator is not None else []

    # -- training -----------------------------------------------------------------------------
    def perceptual_loss(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance (0 when perceptual is 'none')."""
        if self._lpips is None:
            return images.new_zeros(())
        lpips = self._lpips.to(images.device)  # follows the model across .to(device) lazily
        return lpips(images.float(), reconstruction.float()).mean()

    def training_losses(self, images: torch.Tensor, step: int) -> AutoencoderLosses:
        """The loss of the class docstring. From `disc_start` on, the discriminator loss is
        returned too, computed on detached images so that its backward pass only reaches
        the discriminator."""
        self._check_images(images)
        if self.discriminator is not None and min(images.shape[-2:]) < self.discriminator.min_size():
            raise ValueError(
                f"images of {images.shape[-2]}x{images.shape[-1]} are too small for disc_layers="
                f"{self.discriminator.n_layers} (needs >= {self.discriminator.min_size()}); lower disc_layers"
            )
        neck = self.bottleneck(self.encoder(images))
        rec = self.decoder(neck.z)
        rec_loss = (images - rec).abs().mean()
        perceptual = self.perceptual_loss(images, rec)
        nll = self.l1_weight * rec_loss + self.perceptual_weight * perceptual
        loss = nll + neck.loss

        zero = images.new_zeros(())
        # Zeros before disc_start keep the columns steady; without a discriminator there are
        # no columns, so that a log never reads as a perfect discriminator.
        gan = dict.fromkeys(GAN_LOG_KEYS, zero) if self.discriminator is not None else {}
        disc_loss = None
        if self.discriminator is not None and step >= self.disc_start:
            ramp = gan_ramp(step, self.disc_start, self.disc_warmup)
            fake = self.discriminator.features(rec)
            real = self.discriminator.features(images.detach())
            g_loss = generator_loss(self.disc_loss, fake[-1])
            d_weight = zero
            if self.disc_weight > 0 and torch.is_grad_enabled() and rec.requires_grad:
                d_weight = adaptive_weight(nll, g_loss, self.decoder.conv_out.weight)
            # else: no graph (a validation pass), the weight has no gradient to balance
            d_weight = d_weight * self.disc_weight * ramp
            matching = sum((f - r.detach()).abs().mean() for f, r in zip(fake[:-1], real[:-1], strict=True))
            matching = matching / (len(fake) - 1)
            loss = loss + d_weight * g_loss + self.feature_matching_weight * ramp * matching
            logits_fake = self.discriminator(rec.detach())
            disc_loss = discriminator_loss(self.disc_loss, real[-1], logits_fake)
            gan = {"g_loss": g_loss, "d_weight": d_weight, "disc_loss": disc_loss, "logits_real": real[-1].mean(),
                   "logits_fake": logits_fake.mean(), "feature_matching": matching}

        logs = {"rec_loss": rec_loss, "perceptual": perceptual, **neck.logs, **gan}
        # One device sync for all logs instead of one .item() each.
        values = torch.stack([v.detach().float() for v in logs.values()]).tolist()
        return AutoencoderLosses(loss=loss, reconstruction=rec, discriminator_loss=disc_loss,
                                 logs=dict(zip(logs, values, strict=True)))


class VQGAN(AdversarialAutoencoder):
    """Encoder -> vector quantizer -> decoder.

    `latent` picks what `encode` hands to stage 2: "continuous" (the encoder output, LDM's
    choice; `decode` quantizes it first) or "quantized" (the codes themselves). Either way
    `decode` snaps its input to the codebook, so decode(encode(x)) == reconstruct(x) and
    the decoder only ever sees codes, as in training.
    """

    def __init__(
        self,
        codebook_size: int = 512,
        beta: float = 0.25,
        l2_normalize_codes: bool = False,
        dead_code_reseed: bool = True,
        dead_code_after: int = 100,
        latent: str = "continuous",
        **shared,
    ):
        super().__init__(**shared)
        if latent not in ("continuous", "quantized"):
            raise ValueError(f"latent must be 'continuous' or 'quantized', got {latent!r}")
        self.latent = latent
        self.quantizer = VectorQuantizer(
            codebook_size, self.latent_channels, beta, l2_normalize_codes, dead_code_reseed, dead_code_after
        )

    def bottleneck(self, h: torch.Tensor) -> Bottleneck:
        q = self.quantizer(h)
        logs = {"codebook_loss": q.codebook_loss, "commitment": q.commitment, "usage": q.usage,
                "perplexity": q.perplexity, "usage_recent": self.quantizer.recent_usage()}
        return Bottleneck(q.z_q, self.quantizer.loss(q), logs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        z = self.encoder(images)
        if self.latent == "quantized":
            z, _ = self.quantizer.quantize(z)
        return z * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z_q, _ = self.quantizer.quantize(latents / self.latent_scale)
        return self.decoder(z_q)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> encoder -> nearest codes -> decoder, without gradients (for PSNR/SSIM)."""
        self._check_images(images)
        z_q, _ = self.quantizer.quantize(self.encoder(images))
        return self.decoder(z_q)

    @torch.no_grad()
    def codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """B x h x w indices of the codes picked for `images` (usage/perplexity in eval)."""
        self._check_images(images)
        return self.quantizer.quantize(self.encoder(images))[1]

    def to_diffusers(self, image_size: int):
        """This autoencoder as a diffusers VQModel; to_diffusers.py says what matches."""
        from n2a_plugins.vqgan.to_diffusers import to_vqmodel

        return to_vqmodel(self, sample_size=image_size, **self.architecture)


class KLAutoencoder(AdversarialAutoencoder):
    """Encoder -> diagonal Gaussian posterior -> decoder (LDM's KL-regularised autoencoder,
    Rombach et al. 2022, sec. 3 and appendix G).

    The encoder gives a mean and a log-variance per latent element; training decodes a
    sample and adds kl_weight * KL(q(z|x) || N(0, I)), with the KL summed over the latent
    and the L1 term's per-element mean scaled to a per-image sum, so that kl_weight means
    what it means in LDM's configs (1e-6: a light pull, latents stay nearly deterministic).
    `encode` gives stage 2 the posterior mean.
    """

    def __init__(self, kl_weight: float = 1e-6, latent_noise: float = 0.0, **shared):
        super().__init__(encoder_channels=2 * shared.get("z_channels", 4), **shared)
        self.kl_weight, self.latent_noise = kl_weight, latent_noise

    def _posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = h.chunk(2, dim=1)
        return mean, log_var.clamp(-30.0, 20.0)  # as LDM: keeps exp() finite

    def bottleneck(self, h: torch.Tensor) -> Bottleneck:
        mean, log_var = self._posterior(h)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        if self.latent_noise > 0:
            # Relative to the latents' own spread: stage 2 sees them scaled to unit variance, so
            # this is the std of the error it can leave there. A scalar per image, half-normal,
            # covers small and large errors alike.
            per_image = self.latent_noise * torch.randn(len(z), 1, 1, 1, device=z.device, dtype=z.dtype).abs()
            z = z + per_image * mean.detach().std() * torch.randn_like(z)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).flatten(1).sum(1).mean()
        image_elements = 3 * (h.shape[-2] * self.downsample_factor) * (h.shape[-1] * self.downsample_factor)
        logs = {"kl": kl, "posterior_std": torch.exp(0.5 * log_var).mean()}
        return Bottleneck(z, self.kl_weight * kl / image_elements, logs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return self._posterior(self.encoder(images))[0] * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents / self.latent_scale)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> posterior mean -> decoder, without gradients (for PSNR/SSIM)."""
        self._check_images(images)
        return self.decoder(self._posterior(self.encoder(images))[0])

    def to_diffusers(self, image_size: int):
        """This autoencoder as a diffusers AutoencoderKL; to_diffusers.py says what matches."""
        from n2a_plugins.vqgan.to_diffusers import to_autoencoder_kl

        return to_autoencoder_kl(self, sample_size=image_size, **self.architecture)
