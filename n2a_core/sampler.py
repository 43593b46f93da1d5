"""The sampler interface and what all samplers share: timesteps, guidance, per-image noise."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from n2a_core.denoiser import Denoiser, PredictionType
from n2a_core.errors import SpecError
from n2a_core.schedule import NoiseSchedule

Generators = torch.Generator | Sequence[torch.Generator] | None
StepCallback = Callable[[int, int], None]
"""callback(done, total): called after each denoiser step, done = 1..total."""

TimestepSpacing = Literal["trailing", "leading", "linspace"]
"""How `steps` timesteps are picked from the schedule's T (see `spaced_timesteps`)."""


class Sampler(ABC):
    """Turns Gaussian noise into latents with a denoiser and a schedule.

    sample(denoiser, schedule, shape, cond, guidance, steps, generator, callback):
      shape:     B x C x h x w of the latents to produce;
      cond:      B x D / B x L x D condition embeddings, or None (unconditional);
      guidance:  classifier-free guidance weight w (paper form):
                 eps~ = (1 + w) eps(z, c) - w eps(z, null); w = 0 is purely conditional.
                 Other tools' "guidance scale" s equals 1 + w;
      steps:     number of denoiser evaluations (None: the sampler's default);
      generator: one torch.Generator per image (so an image depends only on its own seed,
                 not on the batch), or one for the whole batch, or None. Generators on the
                 sampling device keep the loop free of host-device copies;
      callback:  optional `callback(done, total)` after every step (progress bars).
    Returns B x C x h x w latents (float32).
    """

    supported_predictions: tuple[PredictionType, ...] = ("epsilon", "v", "sample")

    @abstractmethod
    def sample(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        shape: Sequence[int],
        cond: torch.Tensor | None = None,
        guidance: float = 0.0,
        steps: int | None = None,
        generator: Generators = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor: ...


def spaced_timesteps(
    num_timesteps: int, steps: int, spacing: TimestepSpacing = "trailing", device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`steps` distinct integer timesteps of [0, T), descending (noisiest first), on `device`.

    trailing: t_i = round(T - i T / S) - 1 (Lin et al. 2024, "Common Diffusion Noise Schedules
              and Sample Steps are Flawed", table 2): always starts at T-1, where z_T ~ N(0, I)
              really is the marginal; the last step is at about T/S - 1.
    leading:  t_i = i * (T // S), reversed (DDIM's and Stable Diffusion's choice): ends at 0 but
              starts at (S-1) * (T // S), short of T-1 for few steps.
    linspace: round(linspace(0, T-1, S)), reversed: both ends.
    All three give T-1, ..., 0 when S = T.
    """
    if not 1 <= steps <= num_timesteps:
        raise SpecError(f"sampler.steps: {steps} is outside 1..{num_timesteps} (the schedule's T); "
                        "pick a value in that range")
    # Computed in float64 on the CPU (MPS has no float64), moved once.
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "trailing":
        t = (num_timesteps - i * (num_timesteps / steps)).round() - 1
    elif spacing == "leading":
        t = (i * (num_timesteps // steps)).flip(0)
    elif spacing == "linspace":
        t = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().flip(0)
    else:
        raise SpecError(f"sampler.timestep_spacing: unknown {spacing!r}; use trailing, leading or linspace")
    return t.long().to(device)


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """Standard normal noise where image i is drawn from generator[i] alone.

    Each draw happens on its generator's device, so CPU generators give the same images on
    every device (at the price of a copy per call when sampling on a GPU).
    """
    if generator is None:
        return torch.randn(tuple(shape), device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} images")
    return torch.stack(
        [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]
    ).to(device)


def generators_for_seeds(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def guided_prediction(
    denoiser: Denoiser, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, guidance: float
) -> torch.Tensor:
    """The denoiser's prediction with classifier-free guidance in one batched forward.

    Ho & Salimans 2022: pred~ = (1 + w) pred(z, c) - w pred(z, null). Applied to the
    prediction of whatever type the denoiser makes (a linear map of epsilon for fixed z_t).
    """
    if cond is None or guidance == 0:
        return denoiser(z_t, t, cond)
    b = z_t.shape[0]
    drop = torch.arange(2 * b, device=z_t.device) >= b  # made on the device: no copy per step
    both = denoiser(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([cond, cond]), drop)
    conditional, unconditional = both[:b], both[b:]
    return (1 + guidance) * conditional - guidance * unconditional


def to_epsilon_and_x0(
    prediction: torch.Tensor, z_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: PredictionType
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, z0) implied by a prediction at z_t with the given alpha_bar (broadcastable)."""
    a = alpha_bar.to(z_t.dtype)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        eps = prediction
        x0 = (z_t - s1a * eps) / sa
    elif prediction_type == "sample":
        x0 = prediction
        eps = (z_t - sa * x0) / s1a
    elif prediction_type == "v":  # v = sqrt(a) eps - sqrt(1-a) z0
        x0 = sa * z_t - s1a * prediction
        eps = s1a * z_t + sa * prediction
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    return eps, x0
