"""The built-in noise schedules against their published formulas.

The closed forms are written out here with numpy/math, independently of n2a's code:
- linear (Ho et al. 2020, sec. 4): beta = linspace(1e-4, 0.02, T), alpha_bar = cumprod(1 - beta);
- cosine (Nichol & Dhariwal 2021, eq. 17): alpha_bar_t = f(t) / f(0),
  f(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), s = 0.008, beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
  clipped to 0.999.
n2a's table index i is the paper's step t = i + 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from n2a_core import NoiseSchedule
from n2a_core.errors import SpecError
from n2a_core.plugins import load_plugins

T = 1000


@pytest.fixture(scope="module")
def registry():
    mp = pytest.MonkeyPatch()
    mp.setenv("N2A_LOAD_PLUGINS", "schedules")
    try:
        yield load_plugins()
    finally:
        mp.undo()


def build(registry, name, **params):
    return registry.build("schedule", registry.validate_spec("schedule", {"type": name, **params}))


def cosine_alpha_bar(t, T=T, s=0.008):
    """Nichol & Dhariwal 2021, eq. 17, for t in [0, T] (paper steps)."""
    def f(x):
        return np.cos(((x / T) + s) / (1 + s) * np.pi / 2) ** 2
    return f(np.asarray(t, dtype=np.float64)) / f(0.0)


@pytest.fixture(scope="module")
def linear(registry):
    return build(registry, "linear")


@pytest.fixture(scope="module")
def cosine(registry):
    return build(registry, "cosine")


# -- the tables -----------------------------------------------------------------------------
def test_linear_matches_ddpm(linear):
    betas = np.linspace(1e-4, 0.02, T)
    assert linear.num_timesteps == T
    np.testing.assert_allclose(linear.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(linear.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    np.testing.assert_allclose(linear.alpha_bar(torch.arange(T)).numpy(), np.cumprod(1 - betas), rtol=1e-12)
    assert linear.alpha_bar(torch.arange(T)).dtype == torch.float64


def test_linear_parameters_are_used(registry):
    s = build(registry, "linear", num_timesteps=10, beta_start=0.001, beta_end=0.1)
    np.testing.assert_allclose(s.betas.numpy(), np.linspace(0.001, 0.1, 10), rtol=1e-12)


def test_cosine_matches_improved_ddpm_with_clipping(cosine):
    t = np.arange(1, T + 1)
    alpha_bar = cosine_alpha_bar(t)
    unclipped_betas = 1 - alpha_bar / cosine_alpha_bar(t - 1)
    np.testing.assert_allclose(cosine.betas.numpy(), np.minimum(unclipped_betas, 0.999), rtol=1e-10, atol=1e-15)

    clipped = np.flatnonzero(unclipped_betas > 0.999)
    assert len(clipped) >= 1 and clipped[-1] == T - 1, "the last betas must be clipped"
    assert np.all(np.diff(clipped) == 1), "clipping happens only in a contiguous tail"
    assert cosine.betas[-1].item() == pytest.approx(0.999, abs=1e-15)

    # Before the first clipped step alpha_bar is exactly the unclipped formula.
    first = clipped[0]
    np.testing.assert_allclose(cosine.alphas_cumprod[:first].numpy(), alpha_bar[:first], rtol=1e-10)
    # From there on it is the last unclipped value times (1 - 0.999) per clipped step.
    expected_tail = alpha_bar[first - 1] * 0.001 ** np.arange(1, T - first + 1)
    np.testing.assert_allclose(cosine.alphas_cumprod[first:].numpy(), expected_tail, rtol=1e-10)


def test_cosine_offset_is_used(registry):
    s = build(registry, "cosine", num_timesteps=20, offset=0.1)
    expected = cosine_alpha_bar(np.arange(1, 20), T=20, s=0.1)  # all but the clipped last step
    np.testing.assert_allclose(s.alphas_cumprod[:-1].numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("shift", [1.5, -2.0])
def test_cosine_log_snr_shift_moves_log_snr_by_exactly_the_shift(registry, cosine, shift):
    shifted = build(registry, "cosine", log_snr_shift=shift)
    t = torch.arange(0, 990)  # before the clipped tail, where the betas differ by design
    np.testing.assert_allclose((shifted.log_snr(t) - cosine.log_snr(t)).numpy(), shift, atol=1e-8)
    u = torch.tensor([0.0, 0.1, 0.5, 0.9], dtype=torch.float64)
    expected = cosine_alpha_bar(u.numpy() * T)
    expected = expected * math.exp(shift) / (1 + expected * (math.exp(shift) - 1))  # SNR * e^shift
    np.testing.assert_allclose(shifted.alpha_bar_continuous(u).numpy(), expected, rtol=1e-10)
    # The ends stay pinned: clean data at t = 0, (almost) pure noise at t = T.
    assert shifted.alpha_bar_continuous(0.0).item() == pytest.approx(1.0, abs=1e-12)
    assert shifted.alphas_cumprod[-1].item() < 1e-6


def test_linear_spec_refuses_decreasing_betas(registry):
    with pytest.raises(SpecError, match=r"^schedule: .*beta_end \(0\.001\) must be >= beta_start \(0\.01\)"):
        registry.validate_spec("schedule", {"type": "linear", "beta_start": 0.01, "beta_end": 0.001})


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_log_snr_is_the_log_odds_and_decreasing(request, name):
    schedule = request.getfixturevalue(name)
    t = torch.arange(T)
    a = schedule.alpha_bar(t).numpy()
    lam = schedule.log_snr(t)
    np.testing.assert_allclose(lam.numpy(), np.log(a / (1 - a)), rtol=1e-9, atol=1e-9)
    assert torch.isfinite(lam).all()
    assert (lam[1:] < lam[:-1]).all()
    assert lam[0] > 0 > lam[-1], "t=0 is nearly clean, t=T-1 nearly pure noise"


# -- continuous time ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_bar_continuous_meets_the_grid_and_is_one_at_zero(request, name):
    schedule = request.getfixturevalue(name)
    t = torch.arange(T)
    on_grid = schedule.alpha_bar_continuous((t + 1).double() / T)
    table = schedule.alpha_bar(t)
    unclipped = schedule.betas < 0.999  # where clipping changed the table, the closed form differs
    np.testing.assert_allclose(on_grid[unclipped].numpy(), table[unclipped].numpy(), rtol=1e-9)
    assert schedule.alpha_bar_continuous(0.0).item() == pytest.approx(1.0, abs=1e-12)
    assert schedule.alpha_bar_continuous(torch.tensor([[0.0, 0.5], [0.25, 1.0]])).shape == (2, 2)


def test_cosine_continuous_is_the_closed_form(cosine):
    u = np.array([0.0, 0.013, 0.25, 0.5, 0.77, 0.99])
    np.testing.assert_allclose(cosine.alpha_bar_continuous(torch.tensor(u)).numpy(), cosine_alpha_bar(u * T),
                               rtol=1e-10)


class PlainSchedule(NoiseSchedule):
    """A schedule with only a betas table: the base class interpolates log-SNR linearly."""


def test_base_class_interpolates_log_snr_between_grid_points():
    betas = torch.tensor([0.1, 0.2, 0.4, 0.5], dtype=torch.float64)
    s = PlainSchedule(betas)
    a = np.cumprod(1 - betas.numpy())  # alpha_bar at u = 1/4, 2/4, 3/4, 1
    lam = np.log(a / (1 - a))

    grid = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(s.alpha_bar_continuous(grid).numpy(), a, rtol=1e-12)
    assert s.alpha_bar_continuous(0.0).item() == pytest.approx(1.0, abs=1e-12)

    # Between grid points log-SNR is the linear interpolation of its neighbours.
    u = torch.tensor([0.3, 0.5 + 0.25 / 3, 0.9], dtype=torch.float64)
    expected = np.array([0.8 * lam[0] + 0.2 * lam[1], 2 / 3 * lam[1] + 1 / 3 * lam[2], 0.4 * lam[2] + 0.6 * lam[3]])
    np.testing.assert_allclose(s.log_snr_continuous(u).numpy(), expected, rtol=1e-9)

    # And alpha_bar decreases monotonically over the whole of [0, 1], beyond it clamped.
    dense = s.alpha_bar_continuous(torch.linspace(0, 1, 401, dtype=torch.float64))
    assert (dense[1:] < dense[:-1]).all()
    assert s.alpha_bar_continuous(torch.tensor([-0.5, 1.5])).tolist() == pytest.approx(
        [s.alpha_bar_continuous(0.0).item(), a[-1]], rel=1e-12)


@pytest.mark.parametrize("betas", [torch.tensor([0.1]), torch.ones(2, 3) * 0.1, torch.tensor([0.1, 1.0]),
                                   torch.tensor([0.0, 0.1])])
def test_base_class_refuses_bad_betas(betas):
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(betas)


# -- the forward process --------------------------------------------------------------------
def test_add_noise_per_sample_timesteps(linear, cosine):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 17, 500, T - 1])
    for schedule, alpha_bar in [(linear, np.cumprod(1 - np.linspace(1e-4, 0.02, T))),
                                (cosine, cosine_alpha_bar(np.arange(1, T + 1)))]:
        z_t = schedule.add_noise(z0, eps, t)
        assert z_t.dtype == z0.dtype and z_t.shape == z0.shape
        for b, step in enumerate(t.tolist()):
            if step == T - 1 and schedule is cosine:
                continue  # clipped step: its table value is checked in the cosine test
            a = alpha_bar[step]
            torch.testing.assert_close(z_t[b], math.sqrt(a) * z0[b] + math.sqrt(1 - a) * eps[b], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_noise_coefficients_in_half_precision(linear, dtype):
    """sqrt(1 - alpha_bar) at t=0 is 0.01: each coefficient must survive to the dtype's precision."""
    t = torch.tensor([0, 1, 10, 100, 999])
    a = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[t.numpy()]
    ones, zeros = torch.ones(5, 2, dtype=dtype), torch.zeros(5, 2, dtype=dtype)
    noise_coef = linear.add_noise(zeros, ones, t)[:, 0].double().numpy()
    signal_coef = linear.add_noise(ones, zeros, t)[:, 0].double().numpy()
    assert linear.add_noise(zeros, ones, t).dtype == dtype
    np.testing.assert_allclose(noise_coef, np.sqrt(1 - a), rtol=1 / 64)
    np.testing.assert_allclose(signal_coef, np.sqrt(a), rtol=1 / 64)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_add_noise_keeps_unit_variance_on_unit_data(request, name):
    """Var(z_t) = alpha_bar + (1 - alpha_bar) = 1 and Corr(z_t, z0) = sqrt(alpha_bar) (DDPM eq. 4)."""
    schedule = request.getfixturevalue(name)
    g = torch.Generator().manual_seed(1)
    n = 100_000
    for step in (0, 250, 700, T - 1):
        z0, eps = torch.randn(n, generator=g), torch.randn(n, generator=g)
        z_t = schedule.add_noise(z0, eps, torch.full((n,), step))
        assert z_t.var().item() == pytest.approx(1.0, abs=0.02)
        assert z_t.mean().item() == pytest.approx(0.0, abs=0.02)
        corr = torch.corrcoef(torch.stack([z_t, z0]))[0, 1].item()
        assert corr == pytest.approx(math.sqrt(schedule.alpha_bar(step).item()), abs=0.01)


def test_tables_are_cached_per_device(cosine):
    first = cosine.tables("cpu")
    again = cosine.tables(torch.device("cpu"))
    assert again is first and all(x is y for x, y in zip(first, again, strict=True))
    alpha_bar, betas = first
    assert alpha_bar.dtype == betas.dtype == torch.float64
    assert torch.equal(alpha_bar, cosine.alphas_cumprod) and torch.equal(betas, cosine.betas)


# CI has no GPU; this runs wherever CUDA is present (the device tables must not leave the GPU).
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tables_and_add_noise_follow_the_input_device(cosine):
    device = torch.device("cuda")
    alpha_bar, _ = cosine.tables(device)
    assert alpha_bar.device.type == "cuda" and cosine.tables("cuda")[0] is alpha_bar
    z0 = torch.randn(2, 4, device=device)
    z_t = cosine.add_noise(z0, torch.randn_like(z0), torch.tensor([3, 900], device=device))
    assert z_t.device.type == "cuda"
    assert cosine.alpha_bar(torch.tensor([3], device=device)).device.type == "cuda"
