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

from abc import abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from n2a_core import (
    ComponentSpec,
    Denoiser,
    Generators,
    NoiseSchedule,
    Sampler,
    SpecError,
    StepCallback,
    TimestepSpacing,
    guided_prediction,
    hookimpl,
    randn,
    spaced_timesteps,
    to_epsilon_and_x0,
)

EPSILON_MIN_LOG_SNR = -5.0
"""Where epsilon chains start by default (see `_SamplerSpec.min_log_snr`)."""


class _SamplerSpec(ComponentSpec):
    timestep_spacing: TimestepSpacing = "trailing"
    """How `steps` timesteps are picked from T: trailing (starts at T-1; Lin et al. 2024),
    leading (DDIM / Stable Diffusion; ends at 0), linspace (both ends)."""
    clip_sample: float | None = Field(None, gt=0)
    """Clamp each predicted z0 to [-clip_sample, clip_sample] in latent units (None: off;
    latents are not bounded like pixels)."""
    min_log_snr: float | None = EPSILON_MIN_LOG_SNR
    """Epsilon-predicting denoisers start the chain no noisier than this log(alpha_bar /
    (1 - alpha_bar)) (None: at T-1). Their z0 = (z - sqrt(1-a) eps) / sqrt(a) multiplies
    the eps error by 1/sqrt(SNR): ~20,000x at the cosine schedule's last step (log-SNR
    -19.8), which turns samples into noise-shaped blobs. z0 is informative once SNR exceeds
    the eps error (~0.01), hence -5; starting there from N(0, I) ignores a signal of
    sqrt(alpha_bar) = 0.08 of z0, as Stable Diffusion's schedule does (0.07). v and sample
    predictions give z0 stably at any SNR and always start at T-1."""


class _ScheduleSampler(Sampler):
    """What the three samplers share: `sample` itself (device, timestep grid), the guided
    (eps, z0) prediction and the DDPM/DDIM chain; each sampler supplies `_solve`."""

    def __init__(self, steps: int | None, timestep_spacing: TimestepSpacing = "trailing",
                 clip_sample: float | None = None, min_log_snr: float | None = EPSILON_MIN_LOG_SNR):
        self.steps, self.timestep_spacing, self.clip_sample = steps, timestep_spacing, clip_sample
        self.min_log_snr = min_log_snr

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, schedule: NoiseSchedule, shape: Sequence[int],
               cond: torch.Tensor | None = None, guidance: float = 0.0, steps: int | None = None,
               generator: Generators = None, callback: StepCallback | None = None) -> torch.Tensor:
        ts, ab, ab_next = self._grid(denoiser, schedule, steps, _device_of(denoiser, cond))
        return self._solve(denoiser, shape, ts, ab, ab_next, cond, guidance, generator, callback)

    @abstractmethod
    def _solve(self, denoiser, shape, ts, ab, ab_next, cond, guidance, generator, callback) -> torch.Tensor:
        """The chain over timesteps `ts` with alpha_bar `ab` there and `ab_next` one step on."""

    def _grid(self, denoiser: Denoiser, schedule: NoiseSchedule, steps: int | None, device: torch.device):
        """(timesteps, alpha_bar at them, alpha_bar at the next one; 1 after the last)."""
        floor = self.min_log_snr if denoiser.prediction_type == "epsilon" else None
        T = schedule.num_timesteps
        steps = steps or self.steps or T
        if not 1 <= steps <= T:
            raise SpecError(f"sampler.steps: {steps} is outside 1..{T} (the schedule's T); pick a value in that range")
        usable = usable_timesteps(schedule, floor)
        ts = spaced_timesteps(usable, min(steps, usable), self.timestep_spacing, device)
        alpha_bar = schedule.tables(device)[0][ts]
        alpha_bar_next = torch.cat([alpha_bar[1:], alpha_bar.new_ones(1)])
        return ts, alpha_bar, alpha_bar_next

    def _predict(self, denoiser, z, t, cond, guidance, alpha_bar):
        """(eps, z0) at z_t, with guidance and the optional z0 clamp."""
        prediction = guided_prediction(denoiser, z, t, cond, guidance).float()
        eps, x0 = to_epsilon_and_x0(prediction, z, alpha_bar, denoiser.prediction_type)
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
            # Keep eps consistent with the clamped z0 (what DDIM's update uses).
            eps = (z - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return eps, x0

    def _chain(self, denoiser, shape, ts, ab, cond, guidance, coef_x0, coef_z, noise_std, noisy_steps,
               generator, callback):
        """The loop DDPM and DDIM share: z_prev = coef_x0 z0 + coef_z z_t + noise_std noise.

        Coefficients are device tensors made before the loop; `noisy_steps` (a host int) says
        how many leading steps draw noise, so the loop never reads a value back."""
        device = coef_x0.device
        coef_x0, coef_z, noise_std = coef_x0.float(), coef_z.float(), noise_std.float()
        t_in, ab = _t_batches(ts, shape[0]), ab.float()
        z = randn(shape, generator, device)
        n = len(ts)
        for i in range(n):
            _, x0 = self._predict(denoiser, z, t_in[i], cond, guidance, ab[i])
            z = coef_x0[i] * x0 + coef_z[i] * z
            if i < noisy_steps:
                z = z + noise_std[i] * randn(shape, generator, device)
            if callback is not None:
                callback(i + 1, n)
        return z


def usable_timesteps(schedule: NoiseSchedule, min_log_snr: float | None) -> int:
    """How many leading timesteps 0..t have log-SNR >= min_log_snr (at least 1; all T for None)."""
    T = schedule.num_timesteps
    if min_log_snr is None:
        return T
    # The schedule's tables live on the CPU: counting there reads nothing back from a GPU.
    log_snr = schedule.log_snr(torch.arange(T)).numpy()
    return max(1, int((log_snr >= min_log_snr).sum()))


def _device_of(denoiser: torch.nn.Module, cond: torch.Tensor | None) -> torch.device:
    """Where the latents live: the denoiser's device (else the condition's, else the CPU)."""
    for tensor in list(denoiser.parameters()) + list(denoiser.buffers()):
        return tensor.device
    return cond.device if cond is not None else torch.device("cpu")


def _t_batches(ts: torch.Tensor, batch: int) -> torch.Tensor:
    """S x B float copies of the timesteps, the form the denoiser takes."""
    return ts.to(torch.float32)[:, None].expand(len(ts), batch).contiguous()


# -- DDPM ---------------------------------------------------------------------------------
class DDPMSpec(_SamplerSpec):
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

    def _solve(self, denoiser, shape, ts, ab, ab_prev, cond, guidance, generator, callback):
        # 1. Betas of the (possibly respaced) chain from alpha_bar (Nichol & Dhariwal 2021,
        #    sec. 4): beta_t = 1 - alpha_bar_t / alpha_bar_prev; all T steps give the schedule's own.
        beta = 1 - ab / ab_prev
        # 2. The posterior q(z_prev | z_t, z0) = N(c0 z0 + ct z_t, beta_tilde) (DDPM eqs. 6-7);
        #    with z0 from eps this mean is eq. 11's 1/sqrt(alpha_t) (z_t - beta_t/sigma_t eps).
        c0 = ab_prev.sqrt() * beta / (1 - ab)
        ct = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        var = (1 - ab_prev) / (1 - ab) * beta if self.variance == "beta_tilde" else beta
        # Algorithm 2: no noise on the last step.
        return self._chain(denoiser, shape, ts, ab, cond, guidance, c0, ct, var.sqrt(), len(ts) - 1,
                           generator, callback)


# -- DDIM ---------------------------------------------------------------------------------
class DDIMSpec(_SamplerSpec):
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

    def _solve(self, denoiser, shape, ts, ab, ab_prev, cond, guidance, generator, callback):
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
        noisy_steps = len(ts) - 1 if self.eta > 0 else 0
        return self._chain(denoiser, shape, ts, ab, cond, guidance, coef_x0, coef_z, sigma, noisy_steps,
                           generator, callback)


# -- DPM-Solver++(2M) ---------------------------------------------------------------------
class DPMPP2MSpec(_SamplerSpec):
    type: Literal["dpmpp-2m"] = "dpmpp-2m"
    steps: int = Field(20, ge=1)
    """Denoiser evaluations; 10-25 is the solver's sweet spot."""
    lower_order_final: bool = True
    """Take the second-to-last step first-order too when steps < 15 (Lu et al.'s reference
    code; steadier with few steps). The last step, onto clean data, is always first-order."""


class DPMSolverPP2MSampler(_ScheduleSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, data prediction.

    In lambda = log(alpha/sigma) = log-SNR / 2, with h_i = lambda_i - lambda_{i-1} and
    r_i = h_{i-1} / h_i:
        z_i = (sigma_i / sigma_{i-1}) z_{i-1} - alpha_i (e^{-h_i} - 1) D_i,
        D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}   (D_i = x0_{i-1} on first-order steps).
    A first-order step is DDIM with eta = 0 written in lambda.
    """

    def __init__(self, steps=20, lower_order_final=True, **common):
        super().__init__(steps, **common)
        self.lower_order_final = lower_order_final

    def _solve(self, denoiser, shape, ts, ab, _ab_next, cond, guidance, generator, callback):
        n = len(ts)
        # 1. Steps i -> i+1 between grid points (n-1 of them); the last eval jumps to clean data.
        lam = 0.5 * (ab.log() - (-ab).log1p())
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        h = lam[1:] - lam[:-1]
        c_z = (sigma[1:] / sigma[:-1]).float()
        c_d = (-alpha[1:] * torch.expm1(-h)).float()
        # 2. D = w_now x0_now + w_prev x0_prev; r uses the previous step's h.
        r = torch.cat([h.new_ones(1), h[:-1] / h[1:]]) if n > 1 else h
        w_now, w_prev = 1 + 1 / (2 * r), -1 / (2 * r)
        first_order = torch.zeros(max(n - 1, 0), dtype=torch.bool, device=ts.device)
        first_order[:1] = True  # no history at the first step
        if self.lower_order_final and n < 15 and n >= 2:
            first_order[-1] = True
        w_now = torch.where(first_order, torch.ones_like(w_now), w_now).float()
        w_prev = torch.where(first_order, torch.zeros_like(w_prev), w_prev).float()
        t_in, ab = _t_batches(ts, shape[0]), ab.float()

        z = randn(shape, generator, ts.device)
        x0_prev = None
        for i in range(n):
            _, x0 = self._predict(denoiser, z, t_in[i], cond, guidance, ab[i])
            if i == n - 1:
                # sigma_next = 0 (lambda = inf): the update reduces to z = x0; a second-order
                # term would need r -> 0, i.e. an infinite extrapolation weight.
                z = x0
            else:
                d = x0 if x0_prev is None else w_now[i] * x0 + w_prev[i] * x0_prev
                z = c_z[i] * z + c_d[i] * d
            x0_prev = x0
            if callback is not None:
                callback(i + 1, n)
        return z


@hookimpl
def register_samplers(register):
    register(DDPMSpec, DDPMSampler, "DDPM ancestral sampling (Ho et al. 2020), all T steps or respaced")
    register(DDIMSpec, DDIMSampler, "DDIM (Song et al. 2021), eta = 0 deterministic, any number of steps")
    register(DPMPP2MSpec, DPMSolverPP2MSampler,
             "DPM-Solver++(2M) (Lu et al. 2022), second-order multistep, good in 10-25 steps")
