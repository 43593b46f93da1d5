"""A template n2a plugin: the Euler sampler of Karras et al. 2022 (Algorithm 1, no churn).

Copy this package to start your own: rename the module, the entry point in pyproject.toml
and the spec's `type` literal, then replace the class. Everything n2a needs is here:
a spec (pydantic, its `type` literal is the name), the class, and one `register_*` hook.

A sampler writes only its update rule, `solve(chain)`. The core lays out the chain: the
timestep grid (spacing, the epsilon floor `min_log_snr`, image-to-image `strength`), the
starting latent, the guided prediction (with negative conditions and the guidance interval
`guidance_log_snr`), the inpainting mask's known region and the progress callback. So this
sampler does image-to-image, inpainting, interpolation, negative prompts and guidance
intervals as the built-in ones do.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from n2a_core import Chain, Sampler, SamplerSpec, hookimpl


class EulerSpec(SamplerSpec):  # SamplerSpec brings timestep_spacing, min_log_snr, guidance_log_snr
    type: Literal["euler"] = "euler"
    steps: int = Field(30, ge=1, le=10_000)
    """Denoiser evaluations."""


class EulerSampler(Sampler):
    """Euler steps on the probability-flow ODE dx/dsigma = eps in the variance-exploding view
    x = z / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022, eq. 3)."""

    def __init__(self, steps: int = 30, **common):
        super().__init__(steps, **common)

    def solve(self, chain: Chain) -> torch.Tensor:
        a, a_next = chain.alpha_bar.double(), chain.alpha_bar_next.double()
        sigma, sigma_next = ((1 - a) / a).sqrt(), ((1 - a_next) / a_next).sqrt()  # sigma_next = 0 at the end
        z = chain.z
        for i in range(len(chain)):
            eps, _ = chain.eps_and_x0(z, i)
            x = z.double() / a[i].sqrt() + (sigma_next[i] - sigma[i]) * eps.double()
            z = chain.step_done(i, (x * a_next[i].sqrt()).float())
        return z


@hookimpl
def register_samplers(register):
    register(EulerSpec, EulerSampler, "Euler ODE sampler (Karras et al. 2022) — the plugin template")
