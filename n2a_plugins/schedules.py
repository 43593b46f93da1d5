"""Built-in noise schedules: DDPM's linear betas and Nichol & Dhariwal's cosine."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from n2a_core import ComponentSpec, NoiseSchedule, betas_from_alpha_bar, hookimpl


class LinearScheduleSpec(ComponentSpec):
    type: Literal["linear"] = "linear"
    num_timesteps: int = Field(1000, ge=2, le=100_000)
    """T, the number of diffusion steps."""
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)

    @model_validator(mode="after")
    def _increasing(self):
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be >= beta_start ({self.beta_start})")
        return self


class LinearSchedule(NoiseSchedule):
    """DDPM (Ho et al. 2020, sec. 4): betas linear from beta_start to beta_end."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))


class CosineScheduleSpec(ComponentSpec):
    type: Literal["cosine"] = "cosine"
    num_timesteps: int = Field(1000, ge=2, le=100_000)
    """T, the number of diffusion steps."""
    offset: float = Field(0.008, ge=0, lt=1)
    """s in f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); keeps beta small near t=0."""
    max_beta: float = Field(0.999, gt=0, lt=1)
    """Betas are clipped here to avoid the singularity at t=T."""
    log_snr_shift: float = Field(0.0, ge=-10, le=10)
    """Added to log(alpha_bar / (1 - alpha_bar)) at every t (Hoogeboom et al. 2023, "simple
    diffusion"): positive spends more of training and sampling at low noise, as small or
    low-dimensional inputs want; negative, at high noise, as large ones want."""


class CosineSchedule(NoiseSchedule):
    """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): alpha_bar_t = f(t) / f(0)."""

    def __init__(self, num_timesteps: int = 1000, offset: float = 0.008, max_beta: float = 0.999,
                 log_snr_shift: float = 0.0):
        self.offset, self.log_snr_shift = offset, log_snr_shift
        super().__init__(betas_from_alpha_bar(self._alpha_bar_unclipped, num_timesteps, max_beta))

    def _alpha_bar_unclipped(self, u: torch.Tensor) -> torch.Tensor:
        s = self.offset
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / math.cos(s / (1 + s) * math.pi / 2) ** 2
        if not self.log_snr_shift:
            return alpha_bar
        # SNR * e^shift, written in alpha_bar = SNR / (1 + SNR)
        gain = math.exp(self.log_snr_shift)
        return alpha_bar * gain / (1 + alpha_bar * (gain - 1))

    def alpha_bar_continuous(self, u: torch.Tensor | float) -> torch.Tensor:
        """The closed form f(u)/f(0), shifted (clipping only affects the discrete table's last steps)."""
        u = torch.as_tensor(u, dtype=torch.float64).clamp(0, 1)
        return self._alpha_bar_unclipped(u).clamp(min=1e-12)


@hookimpl
def register_schedules(register):
    register(LinearScheduleSpec, LinearSchedule, "DDPM linear betas (1e-4 to 0.02 over T=1000)")
    register(CosineScheduleSpec, CosineSchedule, "Nichol & Dhariwal cosine alpha_bar, betas clipped at 0.999")
