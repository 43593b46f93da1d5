"""The `unet` denoiser: shapes, conditioning and the null token, gradients, checkpoints,
the sinusoidal embedding against its closed form, errors, the registry, compile, overfitting."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from n2a_core import BuildContext, Conditioning, Denoiser, get_registry
from n2a_core.errors import N2AError, SpecError
from n2a_plugins.unet import UNet, timestep_embedding

TINY = dict(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
            num_heads=2, norm_groups=8)


def tiny(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **kw})


def batch(B=3, C=4, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, size, size, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g).float()
    return z, t


@pytest.mark.parametrize("kw, size", [
    (dict(), 8),
    (dict(in_channels=3, out_channels=5), 8),  # odd channel counts in and out
    (dict(in_channels=1, base_channels=24, channel_mult=[1, 1, 2], num_res_blocks=2,
          attention_levels=[0, 2], head_channels=8), 8),
    (dict(in_channels=7, base_channels=12, norm_groups=4, num_heads=3, attention_levels=[],
          mid_attention=False), 16),
    (dict(channel_mult=[2], attention_levels=[0]), 6),  # one level: any size, no resampling
    (dict(cond_mode="vector", cond_dim=5), 8),
    (dict(cond_mode="sequence", cond_dim=7), 8),
])
def test_output_shape(kw, size):
    model = tiny(**kw)
    assert isinstance(model, Denoiser)
    z, t = batch(C=model.in_channels, size=size)
    out = model(z, t)
    assert out.shape == (3, model.out_channels, size, size)
    assert model.out_channels == kw.get("out_channels", model.in_channels)
    assert torch.isfinite(out).all()


def test_sinusoidal_embedding_matches_closed_form():
    d = 10
    t = torch.tensor([0.0, 1.0, 17.0, 999.0])
    emb = timestep_embedding(t, d)
    for b, tb in enumerate(t.tolist()):
        for i in range(d // 2):
            angle = tb / 10000 ** (2 * i / d)
            assert emb[b, i].item() == pytest.approx(math.sin(angle), abs=1e-4)
            assert emb[b, d // 2 + i].item() == pytest.approx(math.cos(angle), abs=1e-4)
    odd = timestep_embedding(t, 7)  # odd width: zero pad column, the rest as for width 7
    assert odd.shape == (4, 7) and (odd[:, -1] == 0).all()
    assert odd[3, 0].item() == pytest.approx(math.sin(999.0), abs=1e-4)
    assert odd[3, 3].item() == pytest.approx(math.cos(999.0), abs=1e-4)


def test_time_changes_output():
    model = tiny().eval()
    z, _ = batch(B=2)
    a = model(z, torch.tensor([10.0, 10.0]))
    b = model(z, torch.tensor([900.0, 900.0]))
    assert (a - b).abs().mean() > 1e-3
    # A scalar t is broadcast over the batch.
    assert torch.allclose(model(z, torch.tensor(10.0)), a, atol=1e-6)


@pytest.mark.parametrize("mode, cond_shape", [("vector", (3, 6)), ("sequence", (3, 5, 6))])
def test_condition_changes_output_and_drop_equals_none(mode, cond_shape):
    model = tiny(cond_mode=mode, cond_dim=6).eval()
    assert model.conditioning == Conditioning(mode, 6)
    z, t = batch()
    c1, c2 = torch.randn(cond_shape), torch.randn(cond_shape)
    with torch.no_grad():
        out1, out2 = model(z, t, c1), model(z, t, c2)
        uncond = model(z, t)
        drop = torch.tensor([False, True, False])
        mixed = model(z, t, c1, drop)
    assert (out1 - out2).abs().mean() > 1e-3
    assert torch.allclose(mixed[1], uncond[1], atol=1e-5)
    assert torch.allclose(mixed[[0, 2]], out1[[0, 2]], atol=1e-5)
    assert (mixed[1] - out1[1]).abs().mean() > 1e-3


def test_sequence_uses_every_token():
    """Cross-attention sees each token, not only their mean (that goes to the time embedding)."""
    model = tiny(cond_mode="sequence", cond_dim=6).eval()
    z, t = batch(B=1)
    c = torch.randn(1, 4, 6)
    moved = c.clone()
    moved[0, 0] += 1.0
    moved[0, 1] -= 1.0  # same mean, different tokens
    with torch.no_grad():
        base = model(z, t, c)
        # No positional encoding on the tokens: their order does not matter, their values do.
        assert torch.allclose(model(z, t, c[:, [1, 0, 2, 3]]), base, atol=1e-5)
        assert (model(z, t, moved) - base).abs().mean() > 1e-4


@pytest.mark.parametrize("mode", ["none", "vector", "sequence"])
def test_batch_independence(mode):
    model = tiny(cond_mode=mode, cond_dim=None if mode == "none" else 6).eval()
    z, t = batch(B=4)
    cond = {"none": None, "vector": torch.randn(4, 6), "sequence": torch.randn(4, 3, 6)}[mode]
    drop = None if mode == "none" else torch.tensor([False, True, False, True])
    with torch.no_grad():
        full = model(z, t, cond, drop)
        for i in range(4):
            one = model(z[i:i + 1], t[i:i + 1], None if cond is None else cond[i:i + 1],
                        None if drop is None else drop[i:i + 1])
            assert torch.allclose(one[0], full[i], atol=1e-5)


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("mode, cond_shape", [("vector", (4, 6)), ("sequence", (4, 3, 6))])
def test_every_parameter_gets_a_gradient(mode, cond_shape, scale_shift):
    model = tiny(cond_mode=mode, cond_dim=6, dropout=0.1, scale_shift=scale_shift).train()
    z, t = batch(B=4)
    out = model(z, t, torch.randn(cond_shape), torch.tensor([True, False, True, False]))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    assert "null_cond" in dict(model.named_parameters())


def test_null_token_gets_no_gradient_without_drop():
    model = tiny(cond_mode="vector", cond_dim=6)
    z, t = batch(B=2)
    model(z, t, torch.randn(2, 6), torch.tensor([False, False])).sum().backward()
    assert model.null_cond.grad is None or model.null_cond.grad.abs().sum() == 0


def test_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny(cond_mode="sequence", cond_dim=6).eval()
    with torch.no_grad():  # move off the init so a fresh model cannot match by accident
        model.null_cond.add_(1.0)
    path = tmp_path / "unet.safetensors"
    save_file(model.state_dict(), str(path))
    assert "null_cond" in load_file(str(path))
    torch.manual_seed(123)
    other = UNet(**TINY, cond_mode="sequence", cond_dim=6).eval()
    z, t = batch()
    cond, drop = torch.randn(3, 2, 6), torch.tensor([True, False, False])
    with torch.no_grad():
        assert not torch.allclose(other(z, t, cond, drop), model(z, t, cond, drop))
        other.load_state_dict(load_file(str(path)))
        assert torch.equal(other(z, t, cond, drop), model(z, t, cond, drop))


def test_channels_last_gives_same_output():
    model = tiny(cond_mode="sequence", cond_dim=6).eval()
    z, t = batch()
    cond = torch.randn(3, 2, 6)
    with torch.no_grad():
        ref = model(z, t, cond)
        model = model.to(memory_format=torch.channels_last)
        out = model(z.to(memory_format=torch.channels_last), t, cond)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("mode, cond, match", [
    ("vector", torch.randn(3, 5), r"cond must be B x D = 3 x 6 .*got \(3, 5\)"),
    ("vector", torch.randn(3, 2, 6), r"cond must be B x D = 3 x 6 .*got \(3, 2, 6\)"),
    ("vector", torch.randn(2, 6), r"cond must be B x D = 3 x 6 .*got \(2, 6\)"),
    ("sequence", torch.randn(3, 6), r"cond must be B x L x D = 3 x L x 6 .*got \(3, 6\)"),
    ("sequence", torch.randn(3, 4, 5), r"cond must be B x L x D = 3 x L x 6 .*got \(3, 4, 5\)"),
    ("none", torch.randn(3, 6), r"unconditional"),
])
def test_bad_cond_shape_is_a_clear_error(mode, cond, match):
    model = tiny(cond_mode=mode, cond_dim=None if mode == "none" else 6)
    z, t = batch()
    with pytest.raises(SpecError, match=match) as err:
        model(z, t, cond)
    assert "\n" not in str(err.value)


def test_other_bad_inputs_are_clear_errors():
    model = tiny()
    z, t = batch()
    with pytest.raises(SpecError, match=r"z_t must be B x 4 x h x w"):
        model(z[:, :3], t)
    with pytest.raises(SpecError, match=r"not divisible by 2"):
        model(torch.randn(3, 4, 7, 7), t)
    with pytest.raises(SpecError, match=r"one timestep per sample"):
        model(z, t[:2])
    with pytest.raises(SpecError, match=r"drop must be 3 bools"):
        tiny(cond_mode="vector", cond_dim=6)(z, t, torch.randn(3, 6), torch.tensor([True]))
    with pytest.raises(SpecError, match=r"norm_groups \(8\) must divide"):
        tiny(base_channels=12)
    with pytest.raises(SpecError, match=r"needs cond_dim"):
        tiny(cond_mode="vector")


def test_registry_builds_from_spec():
    registry = get_registry()
    spec = registry.validate_spec("denoiser", {"type": "unet", **TINY, "prediction_type": "v"})
    model = registry.build("denoiser", spec, BuildContext(latent_channels=4, conditioning=Conditioning("vector", 384)))
    assert isinstance(model, UNet)
    assert (model.in_channels, model.out_channels) == (4, 4)
    assert model.conditioning == Conditioning("vector", 384)
    assert model.prediction_type == "v"
    z, t = batch()
    assert model(z, t, torch.randn(3, 384)).shape == z.shape

    # Unconditional run: auto follows; the latent channels come from the autoencoder.
    spec = registry.validate_spec("denoiser", {"type": "unet", **TINY})
    model = registry.build("denoiser", spec, BuildContext(latent_channels=3))
    assert model.conditioning.kind == "none" and model.in_channels == 3 and model.prediction_type == "epsilon"
    assert registry.build("denoiser", spec, BuildContext()).in_channels == 4


def test_registry_spec_errors_are_one_liners():
    registry = get_registry()
    with pytest.raises(SpecError, match=r"norm_groups \(32\) must divide"):
        registry.validate_spec("denoiser", {"type": "unet", "base_channels": 48})
    with pytest.raises(SpecError, match=r"attention_levels \[2\] out of range"):
        registry.validate_spec("denoiser", {"type": "unet", "attention_levels": [2]})
    with pytest.raises(SpecError, match=r"num_heads \(3\) must divide"):
        registry.validate_spec("denoiser", {"type": "unet", "num_heads": 3})
    with pytest.raises(SpecError, match=r"denoiser.*prediction_type"):
        registry.validate_spec("denoiser", {"type": "unet", "prediction_type": "x0"})
    with pytest.raises(SpecError, match=r"base_chanels.*did you mean 'base_channels'"):
        registry.validate_spec("denoiser", {"type": "unet", "base_chanels": 32})
    spec = registry.validate_spec("denoiser", {"type": "unet", **TINY, "cond_mode": "sequence"})
    with pytest.raises(SpecError, match=r"denoiser.cond_mode: 'sequence' but the conditioner gives a vector"):
        registry.build("denoiser", spec, BuildContext(conditioning=Conditioning("vector", 8)))
    with pytest.raises(SpecError, match=r"denoiser.cond_dim: cond_mode is 'sequence'"):
        registry.build("denoiser", spec, BuildContext())
    spec = registry.validate_spec("denoiser", {"type": "unet", **TINY, "cond_dim": 16})
    with pytest.raises(SpecError, match=r"denoiser.cond_dim: 16 but the conditioner gives D=8"):
        registry.build("denoiser", spec, BuildContext(conditioning=Conditioning("vector", 8)))
    assert issubclass(SpecError, N2AError)


@pytest.mark.slow
def test_tiny_unet_overfits_fixed_noise():
    """Memorising the noise of 4 fixed latents at a fixed t: MSE falls more than 5x."""
    model = tiny()
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    alpha_bar = 0.5
    z_t = math.sqrt(alpha_bar) * z0 + math.sqrt(1 - alpha_bar) * eps  # DDPM eq. 4
    t = torch.full((4,), 500.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        loss = (model(z_t, t) - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"MSE {losses[0]:.3f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] / 5, f"MSE {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.slow
def test_torch_compile_matches_eager():
    # Inductor compiles C++ on the CPU; this machine and CI have g++, a bare container may not.
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (none on PATH)")
    model = tiny(cond_mode="vector", cond_dim=6).eval()
    z, t = batch(B=2)
    cond, drop = torch.randn(2, 6), torch.tensor([True, False])
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: no graph breaks in forward
    with torch.no_grad():
        out = compiled(z, t, cond, drop)
        ref = model(z, t, cond, drop)
    assert torch.allclose(out, ref, atol=1e-4)


def test_bf16_model_takes_float32_condition():
    model = tiny(cond_mode="sequence", cond_dim=6).to(torch.bfloat16)
    z, t = batch()
    out = model(z.bfloat16(), t, torch.randn(3, 2, 6), torch.tensor([True, False, False]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_scale_shift_block_is_adms_adaptive_group_norm():
    """The same weights in diffusers' ResnetBlock2D(time_embedding_norm="scale_shift") give
    the same output (diffusers applies the SiLU to the embedding inside each block)."""
    # diffusers is in the dev extra, so CI and the README's test command run this; the skip
    # only spares a bare `pip install -e .` checkout that never asked for the reference.
    diffusers = pytest.importorskip("diffusers.models.resnet")
    from n2a_plugins.unet import ResBlock

    torch.manual_seed(0)
    ours = ResBlock(16, 32, 24, groups=8, dropout=0.0, scale_shift=True).eval()
    theirs = diffusers.ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=24, groups=8,
                                     time_embedding_norm="scale_shift", eps=1e-5).eval()
    names = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut"}
    theirs.load_state_dict({names.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v
                            for k, v in ours.state_dict().items()})
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, torch.nn.functional.silu(emb)), theirs(x, emb))
        additive = ResBlock(16, 32, 24, groups=8, dropout=0.0).eval()
        assert additive.emb_proj.out_features == 32 and ours.emb_proj.out_features == 64
