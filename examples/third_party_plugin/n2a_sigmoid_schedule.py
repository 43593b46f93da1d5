"""A third-party n2a plugin: the sigmoid noise schedule.

Jabri et al. 2022 ("Scalable Adaptive Computation for Iterative Generation", RIN) and
Chen 2023 ("On the Importance of Noise Scheduling for Diffusion Models", Algorithm 1)
define alpha_bar over continuous time u in [0, 1] through a sigmoid of a scaled,
shifted time:

    v(x)         = sigmoid(x / tau)
    alpha_bar(u) = (v(end) - v(u * (end - start) + start)) / (v(end) - v(start))

so alpha_bar(0) = 1 and alpha_bar(1) = 0; `tau` sets how sharp the transition is and
[start, end] which part of the sigmoid is used. Only `n2a_core` is imported: a plugin
never depends on n2a's own plugins.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from n2a_core import ComponentSpec, NoiseSchedule, betas_from_alpha_bar, hookimpl

ALPHA_BAR_MIN = 1e-9
"""Chen 2023 clips alpha_bar at clip_min=1e-9 so log-SNR stays finite at u=1."""


class SigmoidScheduleSpec(ComponentSpec):
    type: Literal["sigmoid"] = "sigmoid"
    num_timesteps: int = Field(1000, ge=2, le=100_000)
    """T, the number of diffusion steps."""
    start: float = Field(-3.0, ge=-20, le=20)
    """Sigmoid input at u=0 (Chen 2023, Algorithm 1 default: -3)."""
    end: float = Field(3.0, ge=-20, le=20)
    """Sigmoid input at u=1; must exceed start (default: 3)."""
    tau: float = Field(1.0, gt=0, le=100)
    """Temperature: small tau concentrates the noise change mid-way, large tau is near linear."""
    max_beta: float = Field(0.999, gt=0, lt=1)
    """Betas are clipped here: alpha_bar(1) = 0 makes the last beta 1."""

    @model_validator(mode="after")
    def _range(self):
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        return self


class SigmoidSchedule(NoiseSchedule):
    """Sigmoid alpha_bar (Chen 2023, Algorithm 1), betas from its ratios on the grid."""

    def __init__(self, num_timesteps: int = 1000, start: float = -3.0, end: float = 3.0,
                 tau: float = 1.0, max_beta: float = 0.999):
        self.start, self.end, self.tau = start, end, tau
        super().__init__(betas_from_alpha_bar(self.alpha_bar_continuous, num_timesteps, max_beta))

    def alpha_bar_continuous(self, u: torch.Tensor | float) -> torch.Tensor:
        """The closed form above, clipped to [1e-9, 1] as in Chen 2023."""
        u = torch.as_tensor(u, dtype=torch.float64).clamp(0, 1)
        v_start = torch.sigmoid(torch.tensor(self.start / self.tau, dtype=torch.float64))
        v_end = torch.sigmoid(torch.tensor(self.end / self.tau, dtype=torch.float64))
        v = torch.sigmoid((u * (self.end - self.start) + self.start) / self.tau)
        return ((v_end - v) / (v_end - v_start)).clamp(ALPHA_BAR_MIN, 1.0)


@hookimpl
def register_schedules(register):
    register(SigmoidScheduleSpec, SigmoidSchedule,
             "Sigmoid alpha_bar (Jabri et al. 2022, Chen 2023) with start/end/tau")
