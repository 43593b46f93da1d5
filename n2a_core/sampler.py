"""The sampler interface and the chain every sampler walks.

The core sets up a sampling run and a sampler supplies only its update rule:

1. the timestep grid (`sampling_timesteps`): `steps` spaced over the schedule, started no
   noisier than the epsilon floor `min_log_snr`, and cut to its last `strength` fraction
   for image-to-image;
2. the starting latent: noise, or the init image's latent noised to the first timestep
   (SDEdit, Meng et al. 2022);
3. the guided prediction at each step: (1 + w) pred(z, c) - w pred(z, c-) with c- the
   negative condition or the learned null token, in one batched forward;
4. after each step: the known region of an inpainting mask reset to the init latent noised
   to the new level (Lugmayr et al. 2022, "RePaint", eq. 8), then the progress callback;
5. the noise: each image's draws come from its own generator, or are the slerp of two
   seeds' draws (`NoiseBetween`, for interpolation).

A sampler subclasses `Sampler` and implements `solve(chain)`, a loop over the `Chain`;
image-to-image, inpainting, interpolation and negative conditions then work with it as
with the built-in samplers, without a line more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import model_validator

from n2a_core.component import ComponentSpec
from n2a_core.denoiser import Denoiser, PredictionType
from n2a_core.errors import SpecError
from n2a_core.schedule import NoiseSchedule

StepCallback = Callable[[int, int], None]
"""callback(done, total): called after each denoiser step, done = 1..total."""

TimestepSpacing = Literal["trailing", "leading", "linspace"]
"""How `steps` timesteps are picked from the schedule's T (see `spaced_timesteps`)."""

EPSILON_MIN_LOG_SNR = -5.0
"""Where epsilon chains start by default (see `SamplerSpec.min_log_snr`)."""


@dataclass(frozen=True)
class NoiseBetween:
    """The noise of a point between two seeds: each draw is slerp(draw_start, draw_end, u).

    Spherical interpolation keeps the norm a Gaussian draw has (White 2016, "Sampling
    Generative Networks"), where a straight line would pass through unlikely low-norm noise.
    Both generators advance with every draw, so u = 0 and u = 1 give exactly the two seeds'
    own images, for stochastic samplers too.
    """

    start: torch.Generator
    end: torch.Generator
    u: float

    @property
    def device(self) -> torch.device:
        return self.start.device


Generators = torch.Generator | Sequence[torch.Generator | NoiseBetween] | None


class SamplerSpec(ComponentSpec):
    """The fields every sampler built on `Sampler` understands (subclass it for yours)."""

    timestep_spacing: TimestepSpacing = "trailing"
    """How `steps` timesteps are picked from T: trailing (starts at T-1; Lin et al. 2024),
    leading (DDIM / Stable Diffusion; ends at 0), linspace (both ends)."""
    min_log_snr: float | None = EPSILON_MIN_LOG_SNR
    """Epsilon-predicting denoisers start the chain no noisier than this log(alpha_bar /
    (1 - alpha_bar)) (None: at T-1). Their z0 = (z - sqrt(1-a) eps) / sqrt(a) multiplies
    the eps error by 1/sqrt(SNR): ~20,000x at the cosine schedule's last step (log-SNR
    -19.8), which turns samples into noise-shaped blobs. z0 is informative once SNR exceeds
    the eps error (~0.01), hence -5; starting there from N(0, I) ignores a signal of
    sqrt(alpha_bar) = 0.08 of z0, as Stable Diffusion's schedule does (0.07). v and sample
    predictions give z0 stably at any SNR and always start at T-1."""
    guidance_log_snr: tuple[float, float] | None = None
    """[lo, hi]: classifier-free guidance only at steps whose log(alpha_bar / (1 - alpha_bar))
    lies in it, the conditional prediction alone elsewhere (Kynkaenniemi et al. 2024, "Applying
    guidance in a limited interval"): guidance at the noisiest steps pulls every sample of a
    class toward one layout, and at the cleanest adds nothing but contrast. None: every step."""

    @model_validator(mode="after")
    def _ordered_interval(self):
        if self.guidance_log_snr is not None and not self.guidance_log_snr[0] < self.guidance_log_snr[1]:
            raise ValueError(f"guidance_log_snr {list(self.guidance_log_snr)}: write it as [lo, hi] with lo < hi")
        return self


class Sampler:
    """Turns Gaussian noise (or a noised init image) into latents with a denoiser and a schedule.

    sample(denoiser, schedule, shape, cond, guidance, steps, generator, callback,
           negative=None, init=None, strength=1.0, mask=None):
      shape:     B x C x h x w of the latents to produce;
      cond:      B x D / B x L x D condition embeddings, or None (unconditional);
      guidance:  classifier-free guidance weight w (paper form):
                 eps~ = (1 + w) eps(z, c) - w eps(z, c-), c- = `negative` or the null token;
                 w = 0 is purely conditional. Other tools' "guidance scale" s equals 1 + w;
      steps:     number of denoiser evaluations for strength 1 (None: the sampler's default);
      generator: one torch.Generator (or NoiseBetween) per image, so an image depends only on
                 its own seed, not on the batch; or one for the whole batch, or None.
                 Generators on the sampling device keep the loop free of host-device copies;
      callback:  optional `callback(done, total)` after every step (progress bars);
      negative:  condition embeddings (shaped like cond) to steer away from;
      init:      latents of an init image (1 or B x C x h x w) for image-to-image/inpainting;
      strength:  in (0, 1]: how much of the chain runs from the noised init (SDEdit);
                 1 starts from pure noise, as without an init;
      mask:      1 or B x 1 x h x w, 1 where to repaint and 0 where to keep `init`.
    Returns B x C x h x w latents (float32).

    Subclasses implement `solve(chain)`; `steps`, `timestep_spacing` and `min_log_snr` are
    what the core reads to lay out the grid, `guidance_log_snr` where it guides. A sampler may
    override `sample` itself, but then it does without the core's image-to-image, inpainting,
    negative conditions and guidance interval.
    """

    supported_predictions: tuple[PredictionType, ...] = ("epsilon", "v", "sample")

    def __init__(self, steps: int | None = None, timestep_spacing: TimestepSpacing = "trailing",
                 min_log_snr: float | None = EPSILON_MIN_LOG_SNR,
                 guidance_log_snr: tuple[float, float] | None = None):
        self.steps, self.timestep_spacing, self.min_log_snr = steps, timestep_spacing, min_log_snr
        self.guidance_log_snr = guidance_log_snr

    @torch.no_grad()
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
        *,
        negative: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        device = _device_of(denoiser, cond)
        floor = self.min_log_snr if denoiser.prediction_type == "epsilon" else None
        timesteps = sampling_timesteps(schedule, steps or self.steps, spacing=self.timestep_spacing,
                                       min_log_snr=floor, strength=strength, device=device)
        chain = Chain.start(denoiser, schedule, shape, timesteps, generator, cond=cond, guidance=guidance,
                            guidance_log_snr=self.guidance_log_snr, negative=negative, init=init,
                            strength=strength, mask=mask, callback=callback)
        return self.solve(chain)

    def solve(self, chain: Chain) -> torch.Tensor:
        """The update rule: walk `chain` from `chain.z` over its timesteps to clean latents.

        For each step i: `chain.predict(z, i)` (or `chain.eps_and_x0(z, i)`), the update to the
        level `chain.alpha_bar_next[i]` (drawing any fresh noise with `chain.noise()`), then
        `z = chain.step_done(i, z)`. Return z after the last step. (Not abstract only so that
        older samplers that override `sample` instead still load.)"""
        raise NotImplementedError(f"{type(self).__name__}: implement solve(chain), the sampler's update rule")


@dataclass
class Chain:
    """One sampling run as the core sets it up; `Sampler.solve` walks it.

    timesteps:      S integer timesteps, descending (noisiest first), on the latents' device;
    alpha_bar:      alpha_bar at each of them (the schedule's dtype, float64 for built-ins);
    alpha_bar_next: alpha_bar one step on, 1 after the last (the chain ends on clean data);
    z:              the starting latents at timesteps[0], B x C x h x w float32;
    t_in:           S x B float32 copies of the timesteps, the form the denoiser takes;
    guided:         per step, whether guidance applies there (None: at every step).
    """

    denoiser: Denoiser
    timesteps: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_next: torch.Tensor
    z: torch.Tensor
    t_in: torch.Tensor
    generator: Generators
    cond: torch.Tensor | None
    guidance: float
    negative: torch.Tensor | None
    init: torch.Tensor | None
    repaint: torch.Tensor | None
    callback: StepCallback | None
    guided: tuple[bool, ...] | None = None

    @classmethod
    def start(cls, denoiser: Denoiser, schedule: NoiseSchedule, shape: Sequence[int], timesteps: torch.Tensor,
              generator: Generators, *, cond: torch.Tensor | None = None, guidance: float = 0.0,
              guidance_log_snr: tuple[float, float] | None = None, negative: torch.Tensor | None = None,
              init: torch.Tensor | None = None, strength: float = 1.0,
              mask: torch.Tensor | None = None, callback: StepCallback | None = None) -> Chain:
        """The chain over `timesteps` from noise, or from `init` noised to timesteps[0]."""
        device, shape = timesteps.device, tuple(shape)
        alpha_bar = schedule.tables(device)[0][timesteps]
        alpha_bar_next = torch.cat([alpha_bar[1:], alpha_bar.new_ones(1)])
        t_in = timesteps.to(torch.float32)[:, None].expand(len(timesteps), shape[0]).contiguous()
        if mask is not None and init is None:
            raise SpecError("mask: inpainting needs the init image to keep outside the mask")
        if strength < 1 and init is None:
            raise SpecError("strength: image-to-image needs the init latents (init=)")
        if init is not None:
            init = init.to(device=device, dtype=torch.float32).expand(shape)
        repaint = None if mask is None else (mask.to(device) > 0.5).expand(shape)
        z = randn(shape, generator, device)
        if init is not None and (strength < 1 or repaint is not None):
            # SDEdit: z_t = sqrt(a) z0 + sqrt(1 - a) noise at the first timestep (DDPM eq. 4).
            # Strength 1 keeps the noise where it repaints, as plain sampling does.
            a = alpha_bar[0].float()
            noised = a.sqrt() * init + (1 - a).sqrt() * z
            z = noised if strength < 1 else torch.where(repaint, z, noised)
        guided = None
        if guidance_log_snr is not None:
            lo, hi = guidance_log_snr
            # Decided on the host once, before any work is queued, so that the loop never waits.
            log_snr = schedule.log_snr(timesteps.cpu()).numpy()
            guided = tuple(bool(g) for g in (log_snr >= lo) & (log_snr <= hi))
        return cls(denoiser, timesteps, alpha_bar, alpha_bar_next, z, t_in, generator, cond, guidance, negative,
                   init, repaint, callback, guided)

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def prediction_type(self) -> PredictionType:
        return self.denoiser.prediction_type

    def predict(self, z: torch.Tensor, i: int) -> torch.Tensor:
        """The guided prediction (of the denoiser's type) at z, step i, as float32."""
        guidance = self.guidance if self.guided is None or self.guided[i] else 0.0
        return guided_prediction(self.denoiser, z, self.t_in[i], self.cond, guidance, self.negative).float()

    def eps_and_x0(self, z: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, z0) implied by the guided prediction at z, step i."""
        return to_epsilon_and_x0(self.predict(z, i), z, self.alpha_bar[i].float(), self.prediction_type)

    def noise(self) -> torch.Tensor:
        """Fresh N(0, I) latents, each image's from its own generator."""
        return randn(self.z.shape, self.generator, self.z.device)

    def step_done(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """Call after step i moved z to the level alpha_bar_next[i]: resets the known region
        of an inpainting mask and reports progress. Returns the latents to go on with."""
        if self.repaint is not None:
            # RePaint eq. 8: known part ~ q(z_next | z0 = init), unknown part from the sampler;
            # the last step lands on alpha_bar = 1, the init itself (no noise drawn).
            a = self.alpha_bar_next[i].float()
            known = self.init if i == len(self) - 1 else a.sqrt() * self.init + (1 - a).sqrt() * self.noise()
            z = torch.where(self.repaint, z, known)
        if self.callback is not None:
            self.callback(i + 1, len(self))
        return z


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


def usable_timesteps(schedule: NoiseSchedule, min_log_snr: float | None) -> int:
    """How many leading timesteps 0..t have log-SNR >= min_log_snr (at least 1; all T for None)."""
    T = schedule.num_timesteps
    if min_log_snr is None:
        return T
    # The schedule's tables live on the CPU: counting there reads nothing back from a GPU.
    log_snr = schedule.log_snr(torch.arange(T)).numpy()
    return max(1, int((log_snr >= min_log_snr).sum()))


def sampling_timesteps(schedule: NoiseSchedule, steps: int | None, *, spacing: TimestepSpacing = "trailing",
                       min_log_snr: float | None = None, strength: float = 1.0,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """The descending timesteps a chain visits: `steps` (None: all) spaced over the timesteps
    at or above `min_log_snr`, then the last round-down(steps x strength) of them (at least
    one), as diffusers' img2img pipelines cut their grid."""
    T = schedule.num_timesteps
    steps = steps or T
    if not 1 <= steps <= T:
        raise SpecError(f"sampler.steps: {steps} is outside 1..{T} (the schedule's T); pick a value in that range")
    if not 0 < strength <= 1:
        raise SpecError(f"strength: {strength} is outside (0, 1]; 1 is plain sampling, smaller keeps more "
                        "of the init image")
    usable = usable_timesteps(schedule, min_log_snr)
    timesteps = spaced_timesteps(usable, min(steps, usable), spacing, device)
    keep = max(1, int(len(timesteps) * strength + 1e-9))  # 1e-9: 10 x 0.7 is 6.99...
    return timesteps[len(timesteps) - keep:]


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
    return torch.stack([_draw(tuple(shape[1:]), g) for g in generator]).to(device)


def _draw(shape: tuple[int, ...], generator: torch.Generator | NoiseBetween) -> torch.Tensor:
    if isinstance(generator, NoiseBetween):
        start = torch.randn(shape, generator=generator.start, device=generator.start.device)
        end = torch.randn(shape, generator=generator.end, device=generator.end.device).to(start.device)
        return slerp(start, end, generator.u)
    return torch.randn(shape, generator=generator, device=generator.device)


def slerp(start: torch.Tensor, end: torch.Tensor, u: float) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) of two tensors seen as vectors:
    sin((1-u) theta) / sin(theta) start + sin(u theta) / sin(theta) end, theta their angle.
    Exactly `start` at u = 0 and `end` at u = 1; a straight line where they are parallel."""
    if u == 0:
        return start
    if u == 1:
        return end
    a, b = start.double(), end.double()
    cos = ((a * b).sum() / (a.norm() * b.norm())).clamp(-1, 1)
    theta = cos.acos()
    sin = theta.sin()
    parallel = sin < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    w_start = torch.where(parallel, torch.full_like(sin, 1 - u), ((1 - u) * theta).sin() / safe)
    w_end = torch.where(parallel, torch.full_like(sin, u), (u * theta).sin() / safe)
    return (w_start * a + w_end * b).to(start.dtype)


def generators_for_seeds(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def guided_prediction(
    denoiser: Denoiser, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, guidance: float,
    negative: torch.Tensor | None = None,
) -> torch.Tensor:
    """The denoiser's prediction with classifier-free guidance in one batched forward.

    Ho & Salimans 2022: pred~ = (1 + w) pred(z, c) - w pred(z, c-), with c- the learned null
    token, or `negative` (a negative condition, as Stable Diffusion's negative prompts replace
    the empty prompt). Applied to the prediction of whatever type the denoiser makes (a linear
    map of epsilon for fixed z_t). With cond None and a negative, c is the null token.
    """
    if guidance == 0 or (cond is None and negative is None):
        return denoiser(z_t, t, cond)
    b = z_t.shape[0]
    if negative is None:
        assert cond is not None  # the early return above covers no condition and no negative
        drop = torch.arange(2 * b, device=z_t.device) >= b  # made on the device: no copy per step
        both = denoiser(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([cond, cond]), drop)
    elif cond is None:
        drop = torch.arange(2 * b, device=z_t.device) < b  # the null token first, then c-
        both = denoiser(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([negative, negative]), drop)
    else:
        both = denoiser(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([cond, negative.to(cond.dtype)]))
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


def _device_of(denoiser: torch.nn.Module, cond: torch.Tensor | None) -> torch.device:
    """Where the latents live: the denoiser's device (else the condition's, else the CPU)."""
    for tensor in list(denoiser.parameters()) + list(denoiser.buffers()):
        return tensor.device
    return cond.device if cond is not None else torch.device("cpu")
