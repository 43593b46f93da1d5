"""Built-in samplers: DDPM (ancestral), DDIM and DPM-Solver++(2M).

All three read only the schedule's alpha_bar table (`schedule.tables(device)`), so they work
with linear, cosine and third-party schedules, and with epsilon, v and sample prediction
(through `to_epsilon_and_x0`). Every per-step coefficient is computed once, on the device,
before the loop; the loop indexes those tables with Python ints and never reads a device
value back to the host, so on a GPU it queues work without waiting.

Notation: timesteps t_0 > t_1 > ... > t_{S-1} (`spaced_timesteps`); after the last one the
sample lands on clean data, alpha_bar = 1. alpha_t = sqrt(alpha_bar_t) and
sigma_t = sqrt(1 - alpha_bar_t) where a paper uses them (DPM-Solver).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from n2a_core import Chain, Sampler, SamplerSpec, hookimpl


class _ScheduleSamplerSpec(SamplerSpec):
    clip_sample: float | None = Field(None, gt=0)
    """Clamp each predicted z0 to [-clip_sample, clip_sample] in latent units (None: off;
    latents are not bounded like pixels)."""


class _ScheduleSampler(Sampler):
    """What the three samplers share: the (eps, z0) prediction with the optional z0 clamp and
    the DDPM/DDIM chain; the core's `Sampler.sample` sets up the chain, each sampler `solve`s it."""

    def __init__(self, steps: int | None, clip_sample: float | None = None, **common):
        super().__init__(steps, **common)
        self.clip_sample = clip_sample

    def _predict(self, chain: Chain, z: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, z0) at z, step i, with guidance and the optional z0 clamp."""
        eps, x0 = chain.eps_and_x0(z, i)
        if self.clip_sample is not None:
            alpha_bar = chain.alpha_bar[i].float()
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
            # Keep eps consistent with the clamped z0 (what DDIM's update uses).
            eps = (z - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return eps, x0

    def _chain(self, chain: Chain, coef_x0, coef_z, noise_std, noisy_steps: int) -> torch.Tensor:
        """The loop DDPM and DDIM share: z_prev = coef_x0 z0 + coef_z z_t + noise_std noise.

        Coefficients are device tensors made before the loop; `noisy_steps` (a host int) says
        how many leading steps draw noise, so the loop never reads a value back."""
        coef_x0, coef_z, noise_std = coef_x0.float(), coef_z.float(), noise_std.float()
        z = chain.z
        for i in range(len(chain)):
            _, x0 = self._predict(chain, z, i)
            z = coef_x0[i] * x0 + coef_z[i] * z
            if i < noisy_steps:
                z = z + noise_std[i] * chain.noise()
            z = chain.step_done(i, z)
        return z


# -- DDPM ---------------------------------------------------------------------------------
class DDPMSpec(_ScheduleSamplerSpec):
    type: Literal["ddpm"] = "ddpm"
    steps: int | None = Field(None, ge=1)
    """Denoiser evaluations; None: every timestep from the start (see min_log_snr). Fewer respace
    the chain (Nichol & Dhariwal 2021, sec. 4)."""
    variance: Literal["beta_tilde", "beta"] = "beta_tilde"
    """Reverse-step variance (Ho et al. 2020, sec. 3.2): beta_tilde (the posterior's, best for
    deterministic data) or beta (best for N(0, I) data)."""


class DDPMSampler(_ScheduleSampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) with respacing for steps < T."""

    def __init__(self, steps=None, variance="beta_tilde", **common):
        super().__init__(steps, **common)
        self.variance = variance

    def solve(self, chain: Chain) -> torch.Tensor:
        ab, ab_prev = chain.alpha_bar, chain.alpha_bar_next
        # 1. Betas of the (possibly respaced) chain from alpha_bar (Nichol & Dhariwal 2021,
        #    sec. 4): beta_t = 1 - alpha_bar_t / alpha_bar_prev; all T steps give the schedule's own.
        beta = 1 - ab / ab_prev
        # 2. The posterior q(z_prev | z_t, z0) = N(c0 z0 + ct z_t, beta_tilde) (DDPM eqs. 6-7);
        #    with z0 from eps this mean is eq. 11's 1/sqrt(alpha_t) (z_t - beta_t/sigma_t eps).
        c0 = ab_prev.sqrt() * beta / (1 - ab)
        ct = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        var = (1 - ab_prev) / (1 - ab) * beta if self.variance == "beta_tilde" else beta
        # Algorithm 2: no noise on the last step.
        return self._chain(chain, c0, ct, var.sqrt(), len(chain) - 1)


# -- DDIM ---------------------------------------------------------------------------------
class DDIMSpec(_ScheduleSamplerSpec):
    type: Literal["ddim"] = "ddim"
    steps: int = Field(50, ge=1)
    """Denoiser evaluations (at most the schedule's T)."""
    eta: float = Field(0.0, ge=0)
    """Noise scale of Song et al. eq. 16: 0 is deterministic DDIM, 1 is the DDPM posterior."""


class DDIMSampler(_ScheduleSampler):
    """DDIM (Song et al. 2021): eq. 12 with sigma from eq. 16 scaled by eta."""

    def __init__(self, steps=50, eta=0.0, **common):
        super().__init__(steps, **common)
        self.eta = eta

    def solve(self, chain: Chain) -> torch.Tensor:
        ab, ab_prev = chain.alpha_bar, chain.alpha_bar_next
        # 1. sigma_t(eta) = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)   (eq. 16)
        sigma = self.eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        # 2. z_prev = sqrt(a_prev) z0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise     (eq. 12)
        #    (1 - a_prev - sigma^2 >= 0 for eta <= 1; clamped so eta > 1 cannot make a NaN)
        c0 = ab_prev.sqrt()
        ce = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
        # 3. In the shared posterior form, with eps = (z_t - sqrt(a_t) z0) / sqrt(1 - a_t):
        #    z_prev = (c0 - ce sqrt(a_t / (1 - a_t))) z0 + ce / sqrt(1 - a_t) z_t + sigma noise.
        #    sigma is 0 on the last step (a_prev = 1); for eta = 0 no noise is drawn at all.
        coef_x0 = c0 - ce * (ab / (1 - ab)).sqrt()
        coef_z = ce / (1 - ab).sqrt()
        noisy_steps = len(chain) - 1 if self.eta > 0 else 0
        return self._chain(chain, coef_x0, coef_z, sigma, noisy_steps)


# -- DPM-Solver++(2M) ---------------------------------------------------------------------
class DPMPP2MSpec(_ScheduleSamplerSpec):
    type: Literal["dpmpp-2m"] = "dpmpp-2m"
    steps: int = Field(20, ge=1)
    """Denoiser evaluations; 10-25 is the solver's sweet spot."""

    @model_validator(mode="before")
    @classmethod
    def _drop_lower_order_final(cls, data):
        # Specs written before the last step was the only first-order one may still name
        # `lower_order_final`; it now has nothing to choose (see DPMSolverPP2MSampler), so
        # their run folders keep loading and resuming.
        if isinstance(data, dict) and "lower_order_final" in data:
            data = {k: v for k, v in data.items() if k != "lower_order_final"}
        return data


class DPMSolverPP2MSampler(_ScheduleSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, data prediction.

    In lambda = log(alpha/sigma) = log-SNR / 2, with h_i = lambda_i - lambda_{i-1} and
    r_i = h_{i-1} / h_i:
        z_i = (sigma_i / sigma_{i-1}) z_{i-1} - alpha_i (e^{-h_i} - 1) D_i,
        D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}   (D_i = x0_{i-1} on first-order steps).
    A first-order step is DDIM with eta = 0 written in lambda. Two steps are first-order: the
    first (no history yet) and the last, onto clean data. That last one is what Lu et al.'s
    reference code (`lower_order_final`) and diffusers (`final_sigmas_type="zero"`) do; every
    step between is second-order, with any number of steps.
    """

    def __init__(self, steps=20, **common):
        super().__init__(steps, **common)

    def solve(self, chain: Chain) -> torch.Tensor:
        n, ab = len(chain), chain.alpha_bar
        # 1. Steps i -> i+1 between grid points (n-1 of them); the last eval jumps to clean data.
        lam = 0.5 * (ab.log() - (-ab).log1p())
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        h = lam[1:] - lam[:-1]
        c_z = (sigma[1:] / sigma[:-1]).float()
        c_d = (-alpha[1:] * torch.expm1(-h)).float()
        # 2. D = w_now x0_now + w_prev x0_prev, r from the previous step's h (entry 0 is unused:
        #    the first step has no x0_prev and takes D = x0).
        r = torch.cat([h.new_ones(1), h[:-1] / h[1:]]) if n > 1 else h
        w_now, w_prev = (1 + 1 / (2 * r)).float(), (-1 / (2 * r)).float()

        z, x0_prev = chain.z, None
        for i in range(n):
            _, x0 = self._predict(chain, z, i)
            if i == n - 1:
                # sigma_next = 0 (lambda = inf): the update reduces to z = x0; a second-order
                # term would need r -> 0, i.e. an infinite extrapolation weight.
                z = x0
            else:
                d = x0 if x0_prev is None else w_now[i] * x0 + w_prev[i] * x0_prev
                z = c_z[i] * z + c_d[i] * d
            x0_prev = x0
            z = chain.step_done(i, z)
        return z


@hookimpl
def register_samplers(register):
    register(DDPMSpec, DDPMSampler, "DDPM ancestral sampling (Ho et al. 2020), all T steps or respaced")
    register(DDIMSpec, DDIMSampler, "DDIM (Song et al. 2021), eta = 0 deterministic, any number of steps")
    register(DPMPP2MSpec, DPMSolverPP2MSampler,
             "DPM-Solver++(2M) (Lu et al. 2022), second-order multistep, good in 10-25 steps")
