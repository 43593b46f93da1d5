"""The template's own test: on Gaussian data the optimal denoiser is known in closed form,
so the sampler must reproduce the data's mean and variance."""

import math

import torch
from torch import nn

from n2a_core import NoiseSchedule, sampling_timesteps
from n2a_euler_sampler import EulerSampler


class GaussianOracle(nn.Module):
    """E[eps | z_t] for data ~ N(mu, s^2): sqrt(1-a) (z - sqrt(a) mu) / (a s^2 + 1 - a)."""

    prediction_type = "epsilon"

    def __init__(self, schedule, mu, s):
        super().__init__()
        self.schedule, self.mu, self.s = schedule, mu, s
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, z, t, cond=None, drop=None):
        a = self.schedule.alpha_bar(t.long()).float().view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (z - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


def test_euler_reproduces_gaussian_data():
    schedule = NoiseSchedule(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    oracle = GaussianOracle(schedule, mu=0.7, s=0.5)
    g = torch.Generator().manual_seed(0)
    noise_std_error = []
    for steps in (25, 200):
        z0 = EulerSampler(steps=steps, min_log_snr=None).sample(oracle, schedule, (4096, 1, 1, 1), generator=g)
        assert abs(z0.mean().item() - 0.7) < 0.03
        noise_std_error.append(abs(z0.std().item() - 0.5))
    # first-order solver: more steps, smaller error; 200 steps lands within 2% of the true std
    assert noise_std_error[1] < noise_std_error[0] and noise_std_error[1] < 0.02


def test_euler_gets_img2img_and_inpainting_from_the_core():
    """Only `solve` is written here; the core noises the init image to the strength's timestep
    and keeps the mask's known region. Closed form: from z_t ~ N(sqrt(a) x, 1 - a) the exact
    ODE lands at mean mu + s sqrt(a) (x - mu) / sqrt(a s^2 + 1 - a)."""
    schedule = NoiseSchedule(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    mu, s, x = 0.7, 0.5, -0.4
    init = torch.full((1, 1, 1, 2), x)
    mask = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)  # repaint element 0, keep element 1
    sampler = EulerSampler(steps=200)
    out = sampler.sample(GaussianOracle(schedule, mu, s), schedule, (4096, 1, 1, 2), init=init, strength=0.5,
                         mask=mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., 1], init[..., 1].expand(4096, 1, 1))
    t0 = int(sampling_timesteps(schedule, 200, min_log_snr=sampler.min_log_snr, strength=0.5)[0])
    a = float(schedule.alpha_bar(t0))
    expected = mu + s * math.sqrt(a) * (x - mu) / math.sqrt(a * s**2 + 1 - a)
    assert abs(out[..., 0].mean().item() - expected) < 0.03
