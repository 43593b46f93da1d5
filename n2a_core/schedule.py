"""The noise-schedule interface: alpha_bar, betas and log-SNR on one shared grid.

Notation (Ho et al. 2020, "DDPM"): the forward process noises a clean latent z0 as

    z_t = sqrt(alpha_bar_t) * z0 + sqrt(1 - alpha_bar_t) * eps,   eps ~ N(0, I)      (DDPM eq. 4)

with alpha_bar_t = prod_{s<=t} (1 - beta_s). Timesteps are integers t in [0, T): index t
here is the paper's step t+1, so t=0 is already slightly noisy and t=T-1 is (nearly) pure
noise. The continuous view uses u in [0, 1] with u = (t + 1) / T on the grid and
alpha_bar(0) = 1 (clean data).

log-SNR(t) = log(alpha_bar_t / (1 - alpha_bar_t)) is what the samplers step in
(DPM-Solver++ uses lambda = log-SNR / 2), so any schedule that provides alpha_bar works
with every sampler.
"""

from __future__ import annotations

import torch


class NoiseSchedule:
    """A discrete schedule of T steps defined by its betas (float64 tables on the CPU).

    Subclasses pass their betas to `__init__` and may override `alpha_bar_continuous`
    with a closed form; the default interpolates log-SNR linearly between grid points.
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D table of at least 2 steps, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie strictly between 0 and 1")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._device_tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @property
    def num_timesteps(self) -> int:
        """T, the number of discrete steps."""
        return len(self.betas)

    # -- discrete t in [0, T) ---------------------------------------------------------------
    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha_bar_t for integer t in [0, T) (any shape; float64 on t's device)."""
        t = torch.as_tensor(t)
        return self.tables(t.device)[0][t.long()]

    def log_snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """log(alpha_bar_t / (1 - alpha_bar_t)), decreasing in t."""
        a = self.alpha_bar(t)
        return torch.log(a) - torch.log1p(-a)

    def tables(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_bar, betas) as float64 tensors on `device` (float32 on MPS), moved there once and cached.

        Samplers index these on the device so the loop never waits on the host.
        """
        device = torch.device(device)
        if device not in self._device_tables:
            # Apple's MPS has no float64: there the tables are float32, which the samplers'
            # per-step coefficients already are.
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._device_tables[device] = (self.alphas_cumprod.to(device, dtype), self.betas.to(device, dtype))
        return self._device_tables[device]

    # -- continuous u in [0, 1] --------------------------------------------------------------
    def alpha_bar_continuous(self, u: torch.Tensor | float) -> torch.Tensor:
        """alpha_bar at continuous time u in [0, 1]: 1 at u=0, the grid value at u=(t+1)/T."""
        u = torch.as_tensor(u, dtype=torch.float64)
        grid = torch.arange(self.num_timesteps + 1, dtype=torch.float64) / self.num_timesteps
        # log-SNR at u=0 is +inf; use a large finite value so interpolation stays defined.
        lam = torch.cat([torch.tensor([30.0], dtype=torch.float64), self.log_snr(torch.arange(self.num_timesteps))])
        idx = torch.clamp(torch.searchsorted(grid, u.clamp(0, 1).flatten(), right=True) - 1, 0, self.num_timesteps - 1)
        w = (u.flatten().clamp(0, 1) - grid[idx]) / (grid[idx + 1] - grid[idx])
        lam_u = lam[idx] + w * (lam[idx + 1] - lam[idx])
        return torch.sigmoid(lam_u).reshape(u.shape)

    def log_snr_continuous(self, u: torch.Tensor | float) -> torch.Tensor:
        a = self.alpha_bar_continuous(u)
        return torch.log(a) - torch.log1p(-a)

    # -- the forward process ---------------------------------------------------------------
    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) noise, t of shape (B,)."""
        # The coefficients are computed in float64 and cast last: in bf16 alpha_bar near 1
        # would round to 1 and the noise coefficient to 0.
        a = self.alpha_bar(t.to(z0.device)).view(-1, *([1] * (z0.ndim - 1)))
        return a.sqrt().to(z0.dtype) * z0 + (1 - a).sqrt().to(z0.dtype) * noise

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(T={self.num_timesteps}, alpha_bar[0]={self.alphas_cumprod[0]:.6f}, "
                f"alpha_bar[-1]={self.alphas_cumprod[-1]:.3e})")


def betas_from_alpha_bar(alpha_bar_fn, num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = 1 - alpha_bar(u_t) / alpha_bar(u_{t-1}) on the grid u_t = t / T, clipped.

    Nichol & Dhariwal 2021, eq. 17 and the clipping that follows it.
    """
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    a = torch.as_tensor(alpha_bar_fn(u), dtype=torch.float64)
    betas = 1.0 - a[1:] / a[:-1]
    return betas.clamp(min=1e-12, max=max_beta)

