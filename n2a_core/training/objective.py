"""The stage-2 objective and the EMA of the weights.

Training step (Ho et al. 2020, Algorithm 1, in latent space as in Rombach et al. 2022):
  1. t ~ Uniform{0..T-1}, eps ~ N(0, I) per sample;
  2. z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps                    (DDPM eq. 4)
  3. drop the condition per sample with probability p_uncond (Ho & Salimans 2022);
  4. loss = || target - denoiser(z_t, t, c) ||^2, target = eps ("simple" loss, DDPM eq. 14),
     v or z0 by the denoiser's prediction type, optionally min-SNR-gamma weighted.
"""

from __future__ import annotations

import torch
from torch import nn

from n2a_core.denoiser import PredictionType
from n2a_core.schedule import NoiseSchedule


def prediction_target(
    prediction_type: PredictionType, z0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """What the denoiser should output: eps, v = sqrt(a) eps - sqrt(1-a) z0, or z0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return z0
    if prediction_type == "v":  # Salimans & Ho 2022, sec. 4
        a = alpha_bar.to(z0.dtype).view(-1, *([1] * (z0.ndim - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * z0
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: PredictionType) -> torch.Tensor:
    """Per-sample loss weight of Min-SNR-gamma (Hang et al. 2023, eq. 9 and its v/eps forms).

    The weight is min(SNR, gamma) expressed for the target actually regressed:
    divided by SNR for epsilon, by SNR + 1 for v, unchanged for z0.
    """
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v":
        return clipped / (snr + 1)
    return clipped


def draw_condition_drop(batch_size: int, p_uncond: float, generator: torch.Generator | None,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """B bools, each True with probability p_uncond independently (per sample, not per batch)."""
    return torch.rand(batch_size, generator=generator).to(device) < p_uncond


def diffusion_loss(
    denoiser: nn.Module,
    schedule: NoiseSchedule,
    z0: torch.Tensor,
    cond: torch.Tensor | None,
    drop: torch.Tensor | None,
    generator: torch.Generator | None,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """The mean stage-2 loss of one batch of clean latents (steps 1, 2 and 4 above).

    t and eps are drawn on the CPU from `generator` so a run is reproducible and resumable
    whatever the device.
    """
    b = z0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator).to(z0.device)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    z_t = schedule.add_noise(z0, noise, t)
    alpha_bar = schedule.alpha_bar(t)
    prediction = denoiser(z_t, t.float(), cond, drop)
    target = prediction_target(denoiser.prediction_type, z0, noise, alpha_bar)
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma is not None:
        snr = (alpha_bar / (1 - alpha_bar)).float()
        per_sample = per_sample * min_snr_weight(snr, min_snr_gamma, denoiser.prediction_type)
    return per_sample.mean()


class EMA:
    """Exponential moving average of a module's parameters and floating buffers.

    shadow <- decay_k * shadow + (1 - decay_k) * param after optimizer step k, with the
    warm-up decay_k = min(decay, k / (k + warmup)): early steps average over few updates
    so the EMA is not dominated by the random initialisation.
    """

    def __init__(self, module: nn.Module, decay: float, warmup: int = 10, skip: frozenset[str] = frozenset()):
        """`skip`: state-dict keys left out of the average (kept as the module has them),
        e.g. a GAN's discriminator, which only the live weights need."""
        self.decay, self.warmup, self.skip = decay, warmup, skip
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if k not in skip}

    def decay_at(self, step: int) -> float:
        if self.warmup <= 0:
            return self.decay
        return min(self.decay, step / (step + self.warmup))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        current = module.state_dict()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        if floats:
            # shadow += (1 - decay) * (param - shadow), fused over all tensors at once
            torch._foreach_lerp_([self.shadow[k] for k in floats], [current[k].detach() for k in floats], 1 - decay)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(current[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> None:
        missing, unexpected = module.load_state_dict(self.shadow, strict=False)
        if set(missing) != self.skip or unexpected:
            raise KeyError(f"EMA state does not match the module: {sorted(set(missing) ^ self.skip)[:5]}")
