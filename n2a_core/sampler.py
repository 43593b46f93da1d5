"""The sampler interface and what all samplers share: guidance and per-image noise."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from n2a_core.denoiser import Denoiser, PredictionType
from n2a_core.schedule import NoiseSchedule

Generators = torch.Generator | Sequence[torch.Generator] | None


class Sampler(ABC):
    """Turns Gaussian noise into latents with a denoiser and a schedule.

    sample(denoiser, schedule, shape, cond, guidance, steps, generator):
      shape:     B x C x h x w of the latents to produce;
      cond:      B x D / B x L x D condition embeddings, or None (unconditional);
      guidance:  classifier-free guidance weight w (paper form):
                 eps~ = (1 + w) eps(z, c) - w eps(z, null); w = 0 is purely conditional.
                 Other tools' "guidance scale" s equals 1 + w;
      steps:     number of denoiser evaluations (None: the sampler's default);
      generator: one torch.Generator per image (so an image depends only on its own seed,
                 not on the batch), or one for the whole batch, or None.
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
    ) -> torch.Tensor: ...


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """Standard normal noise where image i is drawn from generator[i] alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} images")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device) for g in generator])


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
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(z_t.device)
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
