"""A template n2a plugin: the Euler sampler of Karras et al. 2022 (Algorithm 1, no churn).

Copy this package to start your own: rename the module, the entry point in pyproject.toml
and the spec's `type` literal, then replace the class. Everything n2a needs is here:
a spec (pydantic, its `type` literal is the name), the class, and one `register_*` hook.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from n2a_core import ComponentSpec, Sampler, guided_prediction, hookimpl, randn, to_epsilon_and_x0


class EulerSpec(ComponentSpec):
    type: Literal["euler"] = "euler"
    steps: int = Field(30, ge=1, le=10_000)
    """Denoiser evaluations."""


class EulerSampler(Sampler):
    """Euler steps on the probability-flow ODE dx/dsigma = eps in the variance-exploding view
    x = z / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022, eq. 3)."""

    def __init__(self, steps: int = 30):
        self.default_steps = steps

    @torch.no_grad()
    def sample(self, denoiser, schedule, shape, cond=None, guidance=0.0, steps=None, generator=None, **_):
        device = next(denoiser.parameters()).device
        steps = steps or self.default_steps
        alpha_bar, _ = schedule.tables(device)
        timesteps = torch.linspace(schedule.num_timesteps - 1, 0, steps, device=device).round().long()
        sigmas = ((1 - alpha_bar[timesteps]) / alpha_bar[timesteps]).sqrt()
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])  # end at sigma = 0: clean data
        x = randn(shape, generator, device).double() * (1 + sigmas[0] ** 2).sqrt()
        for i, t in enumerate(timesteps):
            a = alpha_bar[t]
            z = (x * a.sqrt()).float()
            prediction = guided_prediction(denoiser, z, t.float().expand(shape[0]), cond, guidance)
            eps, _ = to_epsilon_and_x0(prediction.double(), z.double(), a, denoiser.prediction_type)
            x = x + (sigmas[i + 1] - sigmas[i]) * eps
        return x.float()


@hookimpl
def register_samplers(register):
    register(EulerSpec, EulerSampler, "Euler ODE sampler (Karras et al. 2022) — the plugin template")
