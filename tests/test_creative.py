"""Creative sampling against closed forms: image-to-image, inpainting, interpolation and
negative conditions, for every sampler (the three built-ins and the plugin template's Euler).

The core sets up the chain (`n2a_core.sampler.Chain`) and a sampler writes only its update
rule, so each property is checked on all four samplers. With the Gaussian oracle (exact eps
for z0 ~ N(mu, s^2), see test_samplers) the outputs are affine in the noise draws, so their
law is computed exactly (`affine_law`), and an init latent x noised to alpha_bar a has a
closed-form fate:
  ODE (DDIM eta = 0, DPM-Solver++, Euler): z_t ~ N(sqrt(a) x, 1 - a) flows to
      mu + s (z_t - sqrt(a) mu) / sqrt(v),   v = a s^2 + 1 - a,
      so mean mu + s sqrt(a) (x - mu) / sqrt(v) and std s sqrt(1 - a) / sqrt(v);
  SDE (DDPM): it samples the posterior p(z0 | z_t) = N(mu + sqrt(a) s^2 (z_t - sqrt(a) mu) / v,
      s^2 (1 - a) / v), so mean mu + a s^2 (x - mu) / v and variance
      s^2 (1 - a) / v + a s^4 (1 - a) / v^2.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_samplers import SCHEDULES, GaussianOracle, ToyConditional

import n2a_core.sampler as sampler_core
from n2a_core import Autoencoder, Denoiser
from n2a_core.components import Components
from n2a_core.diffusion_model import DiffusionModel
from n2a_core.errors import DataError, SpecError
from n2a_core.generate import Between, LoadedRun, generate, interpolation, write_animation
from n2a_core.sampler import NoiseBetween, generators_for_seeds, guided_prediction, sampling_timesteps, slerp
from n2a_plugins.conditioners.class_label import ClassLabelConditioner
from n2a_plugins.samplers import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler
from n2a_plugins.unet import UNet

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "plugin-template"


def euler_sampler(**kwargs):
    """The plugin template's sampler, imported as a third-party module."""
    sys.path.insert(0, str(TEMPLATE))
    try:
        return importlib.import_module("n2a_euler_sampler").EulerSampler(**kwargs)
    finally:
        sys.path.remove(str(TEMPLATE))


SAMPLERS = {  # every sampler, deterministic ones with enough steps to be near the exact ODE
    "ddpm": lambda **k: DDPMSampler(**k),
    "ddim": lambda **k: DDIMSampler(steps=1000, **k),
    "dpmpp-2m": lambda **k: DPMSolverPP2MSampler(steps=50, **k),
    "euler": lambda **k: euler_sampler(steps=400, **k),
}
FEW_STEPS = {
    "ddpm": lambda: DDPMSampler(steps=12),
    "ddim-eta": lambda: DDIMSampler(steps=12, eta=0.8),
    "dpmpp-2m": lambda: DPMSolverPP2MSampler(steps=12),
    "euler": lambda: euler_sampler(steps=12),
}


def affine_law(sample, size: int, monkeypatch) -> tuple[float, float]:
    """(mean, std) of a sampler output that is affine in its noise draws (test_samplers.exact_law):
    element 0 of the batch gets all-zero draws, element k+1 a one on the k-th draw only."""
    draws = []

    def one_hot(shape, generator, device):
        e = torch.zeros(tuple(shape), device=device)
        e[1 + len(draws)] = 1.0
        draws.append(shape)
        return e

    monkeypatch.setattr(sampler_core, "randn", one_hot)
    out = sample((size, 1, 1, 1)).flatten().double()
    monkeypatch.undo()
    b = out[0]
    return float(b), float((out[1:1 + len(draws)] - b).square().sum().sqrt())


class SeenTimesteps(GaussianOracle):
    def forward(self, z_t, t, cond=None, drop=None):
        self.seen = [*getattr(self, "seen", []), int(t.flatten()[0])]
        return super().forward(z_t, t)


# -- image-to-image ------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_img2img_reproduces_the_closed_form_of_the_noised_start(name, strength, monkeypatch):
    schedule, mu, s, x = SCHEDULES["cosine"], 0.7, 0.5, -0.4
    sampler = SAMPLERS[name]()
    oracle = SeenTimesteps(schedule, mu, s)
    init = torch.full((1, 1, 1, 1), x)
    size = 2 + schedule.num_timesteps
    mean, std = affine_law(lambda shape: sampler.sample(oracle, schedule, shape, init=init, strength=strength),
                           size, monkeypatch)
    # The chain is the last round-down(S x strength) steps of the strength-1 grid (diffusers' cut).
    full = sampling_timesteps(schedule, sampler.steps, min_log_snr=-5.0)
    kept = int(len(full) * strength)
    assert oracle.seen == full[len(full) - kept:].tolist()
    a = float(schedule.alphas_cumprod[oracle.seen[0]])
    v = a * s**2 + 1 - a
    if name == "ddpm":
        want_mean, want_std = mu + a * s**2 * (x - mu) / v, math.sqrt(s**2 * (1 - a) / v + a * s**4 * (1 - a) / v**2)
        assert abs(mean - want_mean) < 2e-3 and abs(std / want_std - 1) < 0.03, (mean, std, want_mean, want_std)
    else:
        want_mean, want_std = mu + s * math.sqrt(a) * (x - mu) / math.sqrt(v), s * math.sqrt(1 - a) / math.sqrt(v)
        assert abs(mean - want_mean) < 3e-3 and abs(std / want_std - 1) < 0.02, (mean, std, want_mean, want_std)
    # and the start really was noised: a clean start (strength -> 0) would return x itself
    assert abs(mean - x) > 0.05


def test_strength_one_is_plain_sampling_and_bad_strength_is_refused():
    schedule = SCHEDULES["cosine"]
    oracle = GaussianOracle(schedule, 0.7, 0.5)
    for name, make in FEW_STEPS.items():
        plain = make().sample(oracle, schedule, (2, 1, 3, 3), generator=generators_for_seeds([1, 2]))
        with_init = make().sample(oracle, schedule, (2, 1, 3, 3), generator=generators_for_seeds([1, 2]),
                                  init=torch.full((1, 1, 3, 3), 5.0), strength=1.0)
        assert torch.equal(plain, with_init), name
    with pytest.raises(SpecError, match=r"strength: 0 is outside \(0, 1\]"):
        DDIMSampler().sample(oracle, schedule, (1, 1, 1, 1), init=torch.zeros(1, 1, 1, 1), strength=0)
    with pytest.raises(SpecError, match="mask: inpainting needs the init image"):
        DDIMSampler().sample(oracle, schedule, (1, 1, 1, 1), mask=torch.ones(1, 1, 1, 1))


# -- inpainting ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FEW_STEPS))
def test_inpainting_keeps_the_known_region_and_samples_the_masked_one(name):
    """The oracle treats each element alone, so a deterministic sampler's masked region is
    exactly its plain sample there; the known region ends exactly on the init latent."""
    schedule = SCHEDULES["cosine"]
    oracle = GaussianOracle(schedule, 0.7, 0.5)
    init = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1  # repaint the left half
    steps_seen = []
    out = FEW_STEPS[name]().sample(oracle, schedule, (3, 1, 4, 4), generator=generators_for_seeds([1, 2, 3]),
                                   init=init, mask=mask, callback=lambda i, n: steps_seen.append(i))
    plain = FEW_STEPS[name]().sample(oracle, schedule, (3, 1, 4, 4), generator=generators_for_seeds([1, 2, 3]))
    assert torch.equal(out[..., 2:], init[..., 2:].expand(3, 1, 4, 2))
    assert steps_seen == list(range(1, 13))  # the callback still reports every step
    assert (out[..., :2] - init[..., :2]).abs().min() > 1e-3  # repainted everywhere
    if name in ("dpmpp-2m", "euler"):  # deterministic: same start noise, same flow
        torch.testing.assert_close(out[..., :2], plain[..., :2], rtol=0, atol=1e-6)
    else:  # stochastic: the known region's fresh noise moves later draws; the law stays N(0.7, 0.5^2)
        assert abs(float(out[..., :2].mean()) - 0.7) < 0.5


def test_inpainting_with_img2img_starts_everywhere_from_the_noised_init(monkeypatch):
    schedule, mu, s, x = SCHEDULES["cosine"], 0.7, 0.5, -0.4
    sampler = DDIMSampler(steps=1000)
    mask = torch.ones(1, 1, 1, 1)  # all repainted: img2img's closed form must hold
    mean, _ = affine_law(lambda shape: sampler.sample(GaussianOracle(schedule, mu, s), schedule, shape,
                                                      init=torch.full((1, 1, 1, 1), x), strength=0.5, mask=mask),
                         2 + schedule.num_timesteps, monkeypatch)
    t0 = int(sampling_timesteps(schedule, 1000, min_log_snr=-5.0, strength=0.5)[0])
    a = float(schedule.alphas_cumprod[t0])
    assert abs(mean - (mu + s * math.sqrt(a) * (x - mu) / math.sqrt(a * s**2 + 1 - a))) < 3e-3


# -- interpolation ---------------------------------------------------------------------------
def test_slerp_is_the_great_circle():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])  # 90 degrees apart
    for u in (0.25, 0.5, 0.8):
        want = math.cos(u * math.pi / 2) * a + math.sin(u * math.pi / 2) * b
        torch.testing.assert_close(slerp(a, b, u), want)  # on the unit circle, where lerp dips to 0.71
    assert torch.equal(slerp(a, 2 * b, 0.0), a) and torch.equal(slerp(a, 2 * b, 1.0), 2 * b)
    torch.testing.assert_close(slerp(a, 3 * a, 0.5), 2 * a)  # parallel: the straight line


@pytest.mark.parametrize("name", list(FEW_STEPS))
def test_interpolation_endpoints_are_the_seeds_own_images(name):
    schedule = SCHEDULES["cosine"]
    oracle = GaussianOracle(schedule, 0.7, 0.5)

    def between(u):
        start, end = generators_for_seeds([11, 12])
        return NoiseBetween(start, end, u)

    frames = FEW_STEPS[name]().sample(oracle, schedule, (3, 1, 4, 4),
                                      generator=[between(0.0), between(1.0), between(0.5)])
    seeds = FEW_STEPS[name]().sample(oracle, schedule, (2, 1, 4, 4), generator=generators_for_seeds([11, 12]))
    torch.testing.assert_close(frames[:2], seeds, rtol=0, atol=1e-6)
    assert not torch.allclose(frames[2], seeds[0]) and not torch.allclose(frames[2], seeds[1])


# -- negative conditions ----------------------------------------------------------------------
@torch.no_grad()
def test_negative_condition_replaces_the_null_in_one_forward():
    torch.manual_seed(0)
    den = ToyConditional()
    z, t, c, c_neg = torch.randn(4, 2, 3, 3), torch.full((4,), 500.0), torch.randn(4, 3), torch.randn(4, 3)
    positive, negative = den(z, t, c), den(z, t, c_neg)
    den.calls.clear()
    torch.testing.assert_close(guided_prediction(den, z, t, c, 2.0, c_neg), 3.0 * positive - 2.0 * negative)
    unconditional = den(z, t, None)
    torch.testing.assert_close(guided_prediction(den, z, t, None, 2.0, c_neg), 3.0 * unconditional - 2.0 * negative)
    assert den.calls == [8, 4, 8]  # each guided prediction is one forward of 2B


def small_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=4, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                num_heads=2, norm_groups=8, cond_mode="vector", cond_dim=3).eval()


@pytest.mark.parametrize("name", list(FEW_STEPS))
def test_a_negative_equal_to_the_null_token_is_plain_guidance(name):
    unet, schedule = small_unet(), SCHEDULES["cosine"]
    cond = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    run = lambda **k: FEW_STEPS[name]().sample(unet, schedule, (2, 4, 8, 8), cond=cond, guidance=3.0,  # noqa: E731
                                               generator=generators_for_seeds([4, 5]), **k)
    plain = run()
    assert torch.equal(run(negative=unet.null_cond.detach().expand(2, 3).clone()), plain)
    assert not torch.allclose(run(negative=-cond), plain)


# -- plain sampling is unchanged --------------------------------------------------------------
def test_plain_sampling_matches_the_samplers_before_the_chain_moved_to_the_core():
    """Outputs saved from commit f919659 (samplers with their own loops) for every built-in
    sampler, prediction type, guidance and clip; the refactor must not move them. (DPM-Solver++
    at 20 steps only: below 15 its second-to-last step has been second-order since 65e3735.)"""
    # JSON, not a pickle: float32 -> Python float -> JSON text round-trips bit for bit
    saved = json.loads((Path(__file__).parent / "data" / "plain_sampling_f919659.json").read_text())
    golden = {key: torch.tensor(d["values"], dtype=torch.float32).reshape(d["shape"]) for key, d in saved.items()}
    makers = {"ddpm": lambda **k: DDPMSampler(steps=30, **k), "ddim": lambda **k: DDIMSampler(steps=20, **k),
              "ddim-eta": lambda **k: DDIMSampler(steps=20, eta=0.7, **k),
              "dpm20": lambda **k: DPMSolverPP2MSampler(steps=20, **k)}
    torch.manual_seed(0)
    toy = ToyConditional()
    cond = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    for key, want in golden.items():
        schedule_name, kind, name, floor = (key.split("|") + [None])[:4]
        schedule, make = SCHEDULES[schedule_name], makers[name]
        if kind == "toy":
            got = make().sample(toy, schedule, (2, 2, 4, 4), cond=cond, guidance=2.5,
                                generator=generators_for_seeds([4, 5]))
        elif kind == "clip":
            got = make(clip_sample=0.4).sample(toy, schedule, (2, 2, 4, 4), generator=torch.Generator().manual_seed(9))
        else:
            sampler = make(min_log_snr=None if floor == "None" else float(floor))
            got = sampler.sample(GaussianOracle(schedule, 0.7, 0.5, kind), schedule, (3, 1, 4, 4),
                                 generator=generators_for_seeds([1, 2, 3]))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=key)


# -- generate(): images in, images out ----------------------------------------------------------
class PoolAutoencoder(Autoencoder):
    """A local autoencoder: 2x2 average pooling and nearest upsampling (each latent cell
    decodes to its own 2x2 pixels only), so the reconstruction error is known pixel by pixel."""

    latent_channels, downsample_factor = 3, 2

    def encode(self, images):
        return F.avg_pool2d(images, 2)

    def decode(self, latents):
        return F.interpolate(latents, scale_factor=2, mode="nearest")

    def training_losses(self, images, step):
        raise NotImplementedError


class ConditionalOracle(Denoiser):
    """The Gaussian oracle for data N(mu(c), s^2) with mu(c) = mean of the embedding c (0 for
    the null token): affine in c, so interpolated conditions give interpolated images."""

    in_channels = out_channels = 3
    prediction_type = "epsilon"

    def __init__(self, schedule, s: float = 0.1):
        super().__init__()
        self.schedule, self.s = schedule, s

    def forward(self, z_t, t, cond=None, drop=None):
        mu = torch.zeros(z_t.shape[0]) if cond is None else cond.mean(1).clamp(-0.5, 0.5)
        if drop is not None:
            mu = torch.where(drop, torch.zeros_like(mu), mu)
        a = self.schedule.alpha_bar(t.long()).view(-1, 1, 1, 1).float()
        mu = mu.view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (z_t - a.sqrt() * mu) / (a * self.s**2 + 1 - a)


def loaded_run(labels=None, sampler=None) -> LoadedRun:
    schedule = SCHEDULES["cosine"]
    conditioner = ClassLabelConditioner(labels, dim=4) if labels else None
    if conditioner is not None:
        torch.manual_seed(0)
        conditioner.embedding.weight.data.uniform_(-0.5, 0.5)
    denoiser = ConditionalOracle(schedule)
    pipeline = Components(None, PoolAutoencoder(), denoiser, schedule, conditioner, sampler or DDIMSampler(steps=10))
    spec = SimpleNamespace(data=SimpleNamespace(image_size=16))
    return LoadedRun(SimpleNamespace(root=Path("test-run")), spec, pipeline, DiffusionModel(denoiser, conditioner),
                     torch.device("cpu"), 0)


def picture(size=16) -> torch.Tensor:
    """A smooth 3 x size x size picture in [-0.8, 0.8] with detail inside every 2x2 cell."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return 0.8 * torch.stack([x, y, (x * y)]) * torch.where((torch.arange(size) % 2 == 0)[None, :], 1.0, 0.7)


def test_inpainting_in_image_space_keeps_the_init_up_to_the_reconstruction(tmp_path):
    init = picture()
    mask_image = Image.new("L", (16, 16), 0)
    mask_image.paste(255, (0, 0, 6, 16))  # repaint the left 6 columns (3 latent cells; 7 would round up)
    out = generate(loaded_run(), ["", ""], [1, 2], init_image=init, mask=mask_image)
    reconstruction = PoolAutoencoder().decode(PoolAutoencoder().encode(init[None]))[0]
    known = (slice(None), slice(None), slice(6, None))
    torch.testing.assert_close(out[0][known], reconstruction[known], rtol=0, atol=1e-6)
    assert float((reconstruction - init)[known].abs().max()) > 0.01  # the autoencoder's error is real
    assert float((out[:, :, :, :6] - init[:, :, :6]).abs().mean()) > 0.05  # the masked part is new
    assert not torch.allclose(out[0][:, :, :6], out[1][:, :, :6])  # and differs by seed


def test_img2img_and_negative_at_their_neutral_values_change_nothing():
    loaded = loaded_run(labels=["a", "b"])
    plain = generate(loaded, ["a", "b"], [1, 2], guidance=2.0)
    assert torch.equal(generate(loaded, ["a", "b"], [1, 2], guidance=2.0, init_image=picture(), strength=1.0), plain)
    assert torch.equal(generate(loaded, ["a", "b"], [1, 2], guidance=2.0, negative=""), plain)
    assert not torch.equal(generate(loaded, ["a", "b"], [1, 2], guidance=2.0, negative="b"), plain)
    near = generate(loaded, ["a", "b"], [1, 2], init_image=picture(), strength=0.2)
    far = generate(loaded, ["a", "b"], [1, 2], init_image=picture(), strength=0.9)
    assert (near - picture()).abs().mean() < (far - picture()).abs().mean()


def test_interpolated_conditions_and_seeds():
    loaded = loaded_run(labels=["a", "b"])
    frames = generate(loaded, interpolation("a", "b", 3), [7, 7, 7])
    ends = generate(loaded, ["a", "b"], [7, 7])
    assert torch.equal(frames[0], ends[0]) and torch.equal(frames[2], ends[1])
    # The oracle's mean is affine in the embedding and DDIM is affine in the mean: the middle
    # frame is the average of the two ends.
    torch.testing.assert_close(frames[1], ends.mean(0), rtol=0, atol=1e-5)
    seed_frames = generate(loaded, ["a"] * 3, interpolation(3, 9, 3))
    torch.testing.assert_close(seed_frames[[0, 2]], generate(loaded, ["a", "a"], [3, 9]), rtol=0, atol=1e-6)
    with pytest.raises(SpecError, match="both ends need"):
        generate(loaded, [Between("a", "", 0.5)], [1])


def test_bad_images_are_one_line_errors_naming_the_file(tmp_path):
    loaded = loaded_run()
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(DataError, match=r"init image .*broken.png: cannot read it as an image") as error:
        generate(loaded, [""], [0], init_image=broken, strength=0.5)
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match=r"init image .*missing.png: no such file"):
        generate(loaded, [""], [0], init_image=tmp_path / "missing.png", strength=0.5)
    Image.new("RGB", (40, 30)).save(tmp_path / "init.png")
    Image.new("L", (30, 30)).save(tmp_path / "mask.png")
    with pytest.raises(SpecError, match=r"mask .*mask.png: 30x30 pixels, but the init image is 40x30"):
        generate(loaded, [""], [0], init_image=tmp_path / "init.png", mask=tmp_path / "mask.png")
    with pytest.raises(SpecError, match="strength: image-to-image needs an init image"):
        generate(loaded, [""], [0], strength=0.5)


def test_any_size_init_image_goes_through_the_data_transform(tmp_path):
    from n2a_core.generate import load_init_image
    from n2a_core.images import image_to_tensor

    Image.new("RGB", (50, 20), (200, 30, 30)).save(tmp_path / "wide.png")
    tensor, canvas = load_init_image(tmp_path / "wide.png", 16)
    assert canvas == (50, 20) and tensor.shape == (3, 16, 16)
    assert torch.equal(tensor, image_to_tensor(Image.open(tmp_path / "wide.png"), 16))


def test_write_animation_makes_a_looping_gif(tmp_path):
    images = torch.stack([torch.full((3, 8, 8), v) for v in (-1.0, 0.0, 1.0)])
    paths = write_animation(images, tmp_path)
    gif = Image.open(paths[0])
    assert paths[0].name == "interpolation.gif" and gif.n_frames == 3 and gif.info["loop"] == 0


def test_a_sampler_with_its_own_sample_loop_still_works_and_says_what_it_cannot_do():
    """Samplers written before the core owned the chain override sample(); they load and draw,
    and asking them for a creative mode is a one-line error naming the sampler."""
    from n2a_core import Sampler

    class OwnLoop(Sampler):
        def sample(self, denoiser, schedule, shape, cond=None, guidance=0.0, steps=None, generator=None,
                   callback=None):
            return torch.zeros(tuple(shape))

    loaded = loaded_run(sampler=OwnLoop())
    assert generate(loaded, [""], [0]).shape == (1, 3, 16, 16)
    with pytest.raises(SpecError, match="sampler: OwnLoop overrides sample"):
        generate(loaded, [""], [0], init_image=picture(), strength=0.5)


def test_creative_chains_never_read_device_values(monkeypatch):
    """As plain sampling (test_samplers): no .item()/bool() on tensors, which would stall a GPU."""
    schedule = SCHEDULES["cosine"]
    init, mask = torch.zeros(1, 2, 2, 2), torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)

    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside sample()")

    generators = [NoiseBetween(*generators_for_seeds([1, 2]), 0.3), *generators_for_seeds([3])]
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for make in FEW_STEPS.values():
        make().sample(ToyConditional(), schedule, (2, 2, 2, 2), cond=torch.ones(2, 3), guidance=1.5,
                      negative=torch.zeros(2, 3), init=init, strength=0.6, mask=mask, generator=generators)
