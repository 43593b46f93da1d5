"""The `vqgan` autoencoder plugin: quantizer, losses, model, spec and registry.

Math is checked against closed forms written out here (not the code's own output); the
models are tiny so the whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch import nn

from n2a_core import Autoencoder, N2AError, get_registry
from n2a_core.errors import CheckpointError, SpecError
from n2a_plugins.vqgan import losses
from n2a_plugins.vqgan.losses import (
    LPIPS,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    gan_ramp,
    generator_loss,
    group_count,
    load_lpips,
)
from n2a_plugins.vqgan.model import GAN_LOG_KEYS, VQGAN, AdversarialAutoencoder, KLAutoencoder
from n2a_plugins.vqgan.quantizer import VectorQuantizer

TINY = {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "z_channels": 4, "codebook_size": 32}


def tiny(**overrides) -> VQGAN:
    return VQGAN(**{**TINY, "disc_weight": 0.0, **overrides})


def images(b=2, h=16, w=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / F.mse_loss(x, y).item())


def shapes(n=8, size=32, seed=0) -> torch.Tensor:
    """n images of 2 coloured ellipses/rectangles on a coloured background, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(2):
            x0, y0 = rng.integers(0, size - 10, 2)
            x1, y1 = x0 + rng.integers(8, size // 2), y0 + rng.integers(8, size // 2)
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
        out.append(torch.tensor(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


# -- quantizer ---------------------------------------------------------------------------------
def test_quantizer_picks_the_nearest_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8)
    nn.init.normal_(vq.embedding.weight)
    z = torch.randn(2, 8, 5, 7)
    codes, indices = vq.quantize(z)
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    brute = torch.cdist(z_flat.double(), vq.embedding.weight.double()).argmin(1)
    assert indices.shape == (2, 5, 7) and indices.dtype == torch.long
    assert torch.equal(indices.flatten(), brute)
    assert torch.equal(codes.permute(0, 2, 3, 1).reshape(-1, 8), vq.embedding.weight[brute])


def test_l2_normalised_codes_pick_the_most_similar_direction():
    torch.manual_seed(1)
    vq = VectorQuantizer(32, 6, l2_normalize=True)
    nn.init.normal_(vq.embedding.weight)
    z = torch.randn(3, 6, 4, 4) * 5
    codes, indices = vq.quantize(z)
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 6)
    cosine = F.normalize(z_flat, dim=1) @ F.normalize(vq.embedding.weight, dim=1).t()
    assert torch.equal(indices.flatten(), cosine.argmax(1))
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(3, 4, 4))


def test_straight_through_gradient_is_identity_and_skips_the_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, dead_code_reseed=False)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    for z_q in (vq.quantize(z)[0], vq(z).z_q):
        z.grad = None
        (z_q * upstream).sum().backward()
        torch.testing.assert_close(z.grad, upstream)  # d z_q / d z = identity
    assert vq.embedding.weight.grad is None  # only L_VQ moves the codes


def test_beta_weights_the_commitment_term_on_the_encoder_side():
    torch.manual_seed(0)
    beta = 0.3
    vq = VectorQuantizer(8, 4, beta=beta, dead_code_reseed=False)
    nn.init.normal_(vq.embedding.weight)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    q = vq(z)
    vq.loss(q).backward()

    n = z.numel()
    z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    idx = q.indices.flatten()
    e = vq.embedding.weight.detach()[idx]
    # d/dz of beta * mean((z - sg[e])^2) = beta * 2 (z - e) / n
    expected_z = (beta * 2 * (z_flat - e) / n).view(2, 3, 3, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(z.grad, expected_z)
    # d/de_k of mean((sg[z] - e)^2) = sum over the z assigned to k of 2 (e_k - z) / n, no beta
    expected_e = torch.zeros_like(vq.embedding.weight).index_add_(0, idx, 2 * (e - z_flat) / n)
    torch.testing.assert_close(vq.embedding.weight.grad, expected_e)


def test_usage_and_perplexity_match_the_code_histogram():
    vq = VectorQuantizer(4, 4, dead_code_reseed=False)
    with torch.no_grad():
        vq.embedding.weight.copy_(10 * torch.eye(4))
    # Six vectors: three on code 0, two on code 1, one on code 2, none on code 3.
    picks = torch.tensor([0, 0, 0, 1, 1, 2])
    z = (10 * torch.eye(4))[picks].t().reshape(1, 4, 2, 3) + 0.01
    q = vq(z)
    p = torch.tensor([3, 2, 1]) / 6
    assert q.usage.item() == pytest.approx(3 / 4)
    assert q.perplexity.item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-5)


def test_dead_code_reseeding_raises_usage_and_is_deterministic():
    def run(reseed: bool, seed: int = 0):
        torch.manual_seed(seed)
        vq = VectorQuantizer(16, 4, dead_code_reseed=reseed, dead_code_after=2)
        with torch.no_grad():  # every code far from the data: one of them wins everything
            vq.embedding.weight.copy_(100 + torch.randn(16, 4))
        z = torch.randn(4, 4, 4, 4)
        usage = [vq(z).usage.item() for _ in range(4)]
        return usage, vq.embedding.weight.detach().clone(), z

    usage_off, _, _ = run(False)
    usage_on, codebook, z = run(True)
    assert usage_off == [1 / 16] * 4
    assert usage_on[0] == 1 / 16 and usage_on[-1] >= 0.75
    # Re-seeded codes are encoder outputs of the batch.
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    from_batch = (codebook[:, None, :] == z_flat[None]).all(-1).any(1).sum().item()
    assert from_batch == 15
    assert torch.equal(run(True)[1], codebook)  # same seed, same codebook
    assert not torch.equal(run(True, seed=1)[1], codebook)


def test_quantizer_rejects_wrong_latent_shape():
    with pytest.raises(ValueError, match="4 x h x w"):
        VectorQuantizer(8, 4).quantize(torch.randn(2, 3, 4, 4))


# -- losses ------------------------------------------------------------------------------------
def test_adaptive_weight_matches_hand_computed_gradient_norms():
    torch.manual_seed(0)
    B, hid, out = 5, 6, 3
    x, target, a = torch.randn(B, 4), torch.randn(B, out), torch.randn(out)
    h = torch.tanh(x @ torch.randn(4, hid))
    W = torch.randn(out, hid, requires_grad=True)  # the "decoder's last layer"
    y = h @ W.t()
    rec_loss = (y - target).abs().mean()
    g_loss = -(y @ a).mean()  # hinge generator loss of a linear discriminator
    lam = adaptive_weight(rec_loss, g_loss, W)
    # Closed forms: dL/dW = (dL/dy)^T h
    grad_rec = (torch.sign(y - target) / (B * out)).t() @ h
    grad_gan = (-a[None, :].expand(B, out) / B).t() @ h
    expected = grad_rec.norm() / (grad_gan.norm() + 1e-4)
    torch.testing.assert_close(lam, expected.detach())
    assert not lam.requires_grad

    # A GAN loss with no gradient gives ||grad_rec|| / 1e-4, clamped at 1e4.
    big = 1e3 * (h @ W.t()).abs().mean()
    assert adaptive_weight(big, 0 * y.sum(), W).item() == pytest.approx(1e4)


def test_gan_losses_match_their_definitions():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # hinge: 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) = 0.5 * (0.25 + 0.5)
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(0.375)
    assert generator_loss("hinge", fake).item() == pytest.approx(1.5)
    # non-saturating, D = sigmoid(logits): -log D(real), -log(1 - D(fake)), -log D(fake)

    def sig(t):
        return 1 / (1 + math.exp(-t))

    d_ns = 0.5 * (-(math.log(sig(2.0)) + math.log(sig(0.5))) / 2 - (math.log(1 - sig(-3.0)) + math.log(0.5)) / 2)
    assert discriminator_loss("non-saturating", real, fake).item() == pytest.approx(d_ns, rel=1e-5)
    g_ns = -(math.log(sig(-3.0)) + math.log(0.5)) / 2
    assert generator_loss("non-saturating", fake).item() == pytest.approx(g_ns, rel=1e-5)
    with pytest.raises(ValueError, match="hinge"):
        generator_loss("wgan", fake)


def test_gan_ramp():
    assert [gan_ramp(s, 10, 4) for s in (0, 9, 10, 11, 13, 100)] == [0, 0, 0.25, 0.5, 1, 1]
    assert gan_ramp(10, 10, 0) == 1.0


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_patch_discriminator_grid_and_minimum_size(norm):
    d = PatchDiscriminator(3, 8, n_layers=2, norm=norm)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)  # 32 / 2^2 - 2
    assert d.min_size() == 12 and d(torch.randn(2, 3, 12, 12)).shape == (2, 1, 1, 1)


def test_group_count_divides_small_channel_counts():
    for c in (1, 3, 6, 8, 24, 48, 64, 96, 512):
        g = group_count(c)
        assert c % g == 0 and g <= 32
    assert group_count(64) == 32 and group_count(3) == 1


# -- LPIPS -------------------------------------------------------------------------------------
def test_default_hashes_match_the_torch_hub_file_name():
    assert losses.LPIPS_SHA256[losses.VGG16_FILE].startswith(losses.VGG16_FILE.split("-")[1][:8])
    assert all(len(h) == 64 for h in losses.LPIPS_SHA256.values())


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_lpips_missing_weights_say_where_they_looked_and_what_to_do(empty_caches):
    with pytest.raises(CheckpointError) as info:
        tiny(perceptual="lpips")
    message = str(info.value)
    assert "\n" not in message
    assert "vgg16-397923af.pth" in message
    assert str(empty_caches / "home" / ".cache" / "n2a" / "lpips") in message
    assert str(empty_caches / "torch" / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert "perceptual: none" in message
    # The same error comes through the registry's factory.
    spec = get_registry().validate_spec("autoencoder", {"type": "vqgan", "perceptual": "lpips"})
    with pytest.raises(N2AError, match="never downloads"):
        get_registry().build("autoencoder", spec)


def test_lpips_path_that_does_not_exist(empty_caches):
    with pytest.raises(CheckpointError, match="perceptual_weights: .*does not exist"):
        load_lpips(empty_caches / "nowhere")


def test_lpips_checksum_mismatch_is_refused(empty_caches):
    folder = empty_caches / "weights"
    folder.mkdir()
    (folder / "vgg16-397923af.pth").write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(CheckpointError, match=r"vgg16-397923af.pth: sha256 .* does not match"):
        load_lpips(folder)


def _vgg_state(seed=0) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision VGG16 trunk, keyed like vgg16-397923af.pth."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(seed)
    return {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}


@pytest.fixture
def fake_lpips_files(empty_caches, monkeypatch):
    """vgg16-397923af.pth (random VGG) + vgg.pth (all-ones linear layers) with their hashes
    swapped into the expected-checksum table: the only test-only path."""
    folder = empty_caches / "weights"
    folder.mkdir()
    torch.save(_vgg_state(), folder / losses.VGG16_FILE)
    lin = {f"lin{i}.model.1.weight": torch.ones(1, c, 1, 1) for i, c in enumerate(LPIPS.channels)}
    torch.save(lin, folder / losses.LPIPS_FILE)
    for name in (losses.VGG16_FILE, losses.LPIPS_FILE):
        monkeypatch.setitem(losses.LPIPS_SHA256, name, hashlib.sha256((folder / name).read_bytes()).hexdigest())
    return folder


def test_lpips_with_unit_weights_is_the_summed_cosine_distance(fake_lpips_files):
    """With w_l = 1, ||x^ - y^||^2 = 2 - 2 cos(x_l, y_l) (Zhang et al. 2018, eq. 1)."""
    from torchvision.models.vgg import cfgs, make_layers

    lpips = load_lpips(fake_lpips_files)
    assert lpips.features[0].weight.abs().sum() > 0
    vgg = make_layers(cfgs["D"]).eval()
    vgg.load_state_dict({k.removeprefix("features."): v for k, v in _vgg_state().items()})
    x, y = images(2, 32, 32, seed=1), images(2, 32, 32, seed=2)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy, expected = (x - shift) / scale, (y - shift) / scale, torch.zeros(2)
    for i, layer in enumerate(vgg[:30]):
        hx, hy = layer(hx), layer(hy)
        if isinstance(layer, nn.ReLU) and i in (3, 8, 15, 22, 29):  # relu1_2 ... relu5_3
            expected += (2 - 2 * F.cosine_similarity(hx, hy, dim=1)).mean(dim=(1, 2))
    assert i == 29
    with torch.no_grad():
        torch.testing.assert_close(lpips(x, y), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lpips(x, x), torch.zeros(2))
        torch.testing.assert_close(lpips(y, x), lpips(x, y))


def test_lpips_loss_trains_the_decoder_and_stays_out_of_checkpoints(fake_lpips_files):
    model = tiny(perceptual="lpips", perceptual_weights=str(fake_lpips_files / "vgg.pth"))
    out = model.training_losses(images(2, 32, 32), step=0)
    assert out.logs["perceptual"] > 0
    out.loss.backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert not any("lpips" in k or "features" in k for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) < 1e6  # no VGG in there
    assert all(not p.requires_grad for p in model._lpips.parameters())


# -- the model ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("channel_mult", "f"), [((1, 2, 2), 4), ((1, 2, 2, 4), 8)])
def test_latent_shape(channel_mult, f):
    model = tiny(channel_mult=channel_mult, attention_levels=[len(channel_mult) - 1])
    assert model.downsample_factor == f and model.latent_channels == 4
    x = images(2, 32, 64)
    z = model.encode(x)
    assert z.shape == (2, 4, 32 // f, 64 // f)
    assert model.decode(z).shape == x.shape
    assert model.codebook_indices(x).shape == (2, 32 // f, 64 // f)


def test_encode_rejects_sizes_that_are_not_multiples_of_f():
    model = tiny(channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="30x32 .* f=4"):
        model.encode(images(1, 30, 32))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model.encode(torch.randn(1, 1, 32, 32))


def test_continuous_latent_is_quantized_at_decode():
    torch.manual_seed(0)
    model = tiny(latent="continuous").eval()
    x = images(2)
    z = model.encode(x)
    codebook = model.quantizer.embedding.weight
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.cdist(z_flat, codebook).min(1).values.min() > 1e-4  # not codes
    torch.testing.assert_close(model.decode(z), model.reconstruct(x))


def test_quantized_latent_is_made_of_codes():
    torch.manual_seed(0)
    model = tiny(latent="quantized").eval()
    x = images(2)
    model.estimate_latent_scale(x)
    assert model.latent_scale.item() != 1.0
    z = model.encode(x) / model.latent_scale
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    codebook = model.quantizer.embedding.weight
    assert torch.cdist(z_flat, codebook, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-6
    torch.testing.assert_close(model.decode(model.encode(x)), model.reconstruct(x))
    indices = model.codebook_indices(x)
    torch.testing.assert_close(model.decoder(model.quantizer.lookup(indices)), model.reconstruct(x))


def test_latent_scale_whitens_the_latents():
    torch.manual_seed(0)
    model = tiny().eval()
    x = images(4)
    reconstruction = model.reconstruct(x)
    scale = model.estimate_latent_scale(x)
    assert scale == pytest.approx(1 / model.encoder(x).std().item(), rel=1e-5)
    assert model.encode(x).std().item() == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(model.decode(model.encode(x)), reconstruction)


def test_small_channel_counts_build_and_run():
    for base in (3, 6):
        model = tiny(base_channels=base, attention_levels=[0, 1])
        assert model.training_losses(images(1), 0).loss.isfinite()


def test_save_load_safetensors_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    kwargs = {"disc_weight": 0.8, "disc_layers": 1, "disc_channels": 8}
    model = tiny(**kwargs)
    x = images(2)
    model.training_losses(x, 0).loss.backward()  # touch the usage counters
    model.estimate_latent_scale(x)
    save_file(model.state_dict(), tmp_path / "vqgan.safetensors")
    torch.manual_seed(1)
    loaded = tiny(**kwargs)
    loaded.load_state_dict(load_file(tmp_path / "vqgan.safetensors"))
    model.eval(), loaded.eval()
    assert loaded.latent_scale.item() == model.latent_scale.item() != 1.0
    assert torch.equal(loaded.quantizer.steps_unused, model.quantizer.steps_unused)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
        assert torch.equal(loaded.discriminator(x), model.discriminator(x))


def test_discriminator_is_off_before_disc_start_and_trains_on_detached_images():
    torch.manual_seed(0)
    model = tiny(disc_weight=0.8, disc_start=3, disc_layers=1, disc_channels=8)
    x = images(2)
    before = model.training_losses(x, step=2)
    assert before.discriminator_loss is None
    assert before.logs["g_loss"] == before.logs["d_weight"] == before.logs["disc_loss"] == 0.0
    before.loss.backward()
    assert all(p.grad is None for p in model.discriminator_parameters())

    model.zero_grad(set_to_none=True)
    after = model.training_losses(x, step=3)
    assert after.discriminator_loss is not None and after.logs["d_weight"] > 0
    after.discriminator_loss.backward()
    assert all(p.grad is None for p in model.autoencoder_parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.discriminator_parameters())


def test_gan_weight_is_the_adaptive_weight_ramped_in():
    torch.manual_seed(0)
    model = tiny(disc_weight=0.5, disc_start=10, disc_warmup=4, disc_layers=1, disc_channels=8,
                 dead_code_reseed=False)  # fmt: skip
    x = images(2)
    # lambda by hand: the two gradients at the decoder's last layer, in separate passes.
    last = model.decoder.conv_out.weight
    norms = []
    for loss_of in (lambda rec: (x - rec).abs().mean(), lambda rec: -model.discriminator(rec).mean()):
        rec = model.decoder(model.quantizer.quantize(model.encoder(x))[0])
        norms.append(torch.autograd.grad(loss_of(rec), last)[0].norm().item())
    lam = min(norms[0] / (norms[1] + 1e-4), 1e4)
    for step, ramp in [(10, 0.25), (11, 0.5), (13, 1.0), (50, 1.0)]:
        logs = model.training_losses(x, step).logs
        assert logs["d_weight"] == pytest.approx(0.5 * ramp * lam, rel=1e-4)


def test_disc_weight_zero_builds_no_discriminator():
    model = tiny(disc_weight=0.0, disc_start=0)
    assert model.discriminator is None and model.discriminator_parameters() == []
    logs = model.training_losses(images(2), 5).logs
    assert not set(GAN_LOG_KEYS) & set(logs)  # no discriminator, no discriminator columns
    assert model.training_losses(images(1), 100).discriminator_loss is None
    assert model.inference_modules() == []
    assert tiny(disc_weight=1.0, disc_layers=1).inference_modules() == ["discriminator"]


def test_too_small_images_for_the_discriminator_are_a_clear_error():
    model = tiny(disc_weight=0.8, disc_layers=3)
    with pytest.raises(ValueError, match="too small for disc_layers=3 .*needs >= 24"):
        model.training_losses(images(1, 16, 16), 0)


def test_logs_are_floats_with_the_documented_keys():
    model = tiny(disc_weight=0.8, disc_start=0, disc_layers=1, disc_channels=8)
    logs = model.training_losses(images(2), 0).logs
    for key in ("rec_loss", "perceptual", "codebook_loss", "commitment", "usage", "perplexity",
                "g_loss", "d_weight", "disc_loss"):  # fmt: skip
        assert isinstance(logs[key], float) and math.isfinite(logs[key])


def test_training_losses_under_bf16_autocast():
    model = tiny(disc_weight=0.8, disc_start=0, disc_layers=1, disc_channels=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.training_losses(images(2), 0)
    out.loss.backward()
    assert out.loss.isfinite() and out.discriminator_loss.isfinite()


def test_two_optimizer_loop_trains_both_players():
    """The generic stage-1 loop's order: AE step on out.loss, then disc step on disc loss."""
    torch.manual_seed(0)
    model = tiny(disc_weight=0.8, disc_start=2, disc_warmup=2, disc_layers=1, disc_channels=8)
    opt_ae = torch.optim.Adam(model.autoencoder_parameters(), lr=1e-3)
    opt_disc = torch.optim.Adam(model.discriminator_parameters(), lr=1e-3)
    assert not {id(p) for p in model.autoencoder_parameters()} & {id(p) for p in model.discriminator_parameters()}
    disc_before = [p.detach().clone() for p in model.discriminator_parameters()]
    x = images(2)
    for step in range(5):
        out = model.training_losses(x, step)
        opt_ae.zero_grad()
        out.loss.backward()
        opt_ae.step()
        if step < 2:  # the generator's backward must not have moved the discriminator
            assert all(torch.equal(a, b) for a, b in zip(disc_before, model.discriminator_parameters(), strict=True))
        if out.discriminator_loss is not None:
            opt_disc.zero_grad()
            out.discriminator_loss.backward()
            opt_disc.step()
    assert not all(torch.equal(a, b) for a, b in zip(disc_before, model.discriminator_parameters(), strict=True))


def test_feature_matching_is_the_mean_l1_between_discriminator_features():
    torch.manual_seed(0)
    model = tiny(disc_weight=0.0, feature_matching_weight=2.0, disc_start=1, disc_warmup=0, disc_layers=1,
                 disc_channels=8, dead_code_reseed=False)  # fmt: skip
    assert model.discriminator is not None  # feature matching alone still needs the discriminator
    x = images(2)
    assert model.training_losses(x, 0).logs["feature_matching"] == 0.0  # before disc_start
    rec = model.decoder(model.quantizer.quantize(model.encoder(x))[0])
    fake, real = model.discriminator.features(rec), model.discriminator.features(x)
    assert torch.equal(fake[-1], model.discriminator(rec))  # the last "feature" is the logits
    expected = sum((f - r).abs().mean() for f, r in zip(fake[:-1], real[:-1], strict=True)) / (len(fake) - 1)
    out = model.training_losses(x, 1)
    assert out.logs["feature_matching"] == pytest.approx(expected.item(), rel=1e-5)
    assert out.logs["d_weight"] == 0.0
    # The term trains the decoder: its loss is the plain one plus 2 x feature matching.
    plain = (x - rec).abs().mean() + model.quantizer.loss(model.quantizer(model.encoder(x)))
    assert out.loss.item() == pytest.approx((plain + 2.0 * expected).item(), rel=1e-5)


def tiny_kl(**overrides) -> KLAutoencoder:
    shared = {k: v for k, v in TINY.items() if k != "codebook_size"}
    return KLAutoencoder(**{**shared, "disc_weight": 0.0, **overrides})


def test_kl_bottleneck_is_the_closed_form_gaussian_kl():
    model = tiny_kl(kl_weight=0.5)
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1).expand(2, 4, 3, 3)
    log_var = torch.tensor([0.0, -2.0, 1.0, 0.3]).view(1, 4, 1, 1).expand(2, 4, 3, 3)
    neck = model.bottleneck(torch.cat([mean, log_var], dim=1))
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2 per element, summed per image.
    per_image = 9 * sum(0.5 * (m * m + math.exp(v) - 1 - v) for m, v in [(0.5, 0), (-1, -2), (2, 1), (0, 0.3)])
    assert neck.logs["kl"].item() == pytest.approx(per_image, rel=1e-5)
    image_elements = 3 * (3 * 2) * (3 * 2)  # f = 2: 3 x 3 latents decode to 6 x 6 images
    assert neck.loss.item() == pytest.approx(0.5 * per_image / image_elements, rel=1e-5)


def test_kl_bottleneck_samples_the_posterior():
    torch.manual_seed(0)
    model = tiny_kl()
    mean, log_var = torch.full((4000, 4, 1, 1), 1.5), torch.full((4000, 4, 1, 1), math.log(0.25))
    z = model.bottleneck(torch.cat([mean, log_var], dim=1)).z
    assert z.mean().item() == pytest.approx(1.5, abs=0.02)
    assert z.std().item() == pytest.approx(0.5, abs=0.02)


def test_kl_latent_noise_is_half_normal_per_image_and_relative_to_the_latents_spread():
    torch.manual_seed(0)
    model = tiny_kl(latent_noise=0.3)
    mean = 4.0 * torch.randn(2000, 4, 3, 3)  # spread 4: the noise must scale with it
    h = torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)  # posterior std ~3e-7: only the added noise
    neck = model.bottleneck(h)
    noise = neck.z - mean
    # std(noise) = 0.3 * std(mean) * sqrt(E[n^2] E[eps^2]) = 0.3 * 4
    assert noise.std().item() == pytest.approx(0.3 * 4.0, rel=0.03)
    # One scale per image: its spread across images is that of |n|, E|n| = sqrt(2 / pi).
    per_image = noise.flatten(1).std(dim=1) / mean.std()
    assert per_image.mean().item() == pytest.approx(0.3 * math.sqrt(2 / math.pi), rel=0.05)
    assert per_image.min().item() < 0.03 and per_image.max().item() > 0.6
    # The regulariser and stage 2's latents are those of the posterior, noise or not.
    plain = tiny_kl().bottleneck(h)
    assert neck.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    x = images(2)
    model.eval()
    torch.testing.assert_close(model.encode(x), model.encoder(x)[:, :4])


def test_kl_autoencoder_encodes_the_posterior_mean_and_round_trips():
    torch.manual_seed(0)
    model = tiny_kl().eval()
    x = images(3)
    mean = model.encoder(x)[:, :4]
    torch.testing.assert_close(model.encode(x), mean)
    model.estimate_latent_scale(x)
    assert model.encode(x).std().item() == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(model.decode(model.encode(x)), model.reconstruct(x), rtol=1e-5, atol=1e-5)
    assert not hasattr(model, "codebook_indices")  # no codebook: eval reports no usage


@pytest.mark.slow
def test_kl_autoencoder_learns_and_its_weights_round_trip(tmp_path):
    from n2a_core.checkpoint import load_autoencoder_weights

    torch.manual_seed(0)
    x = shapes()
    model = KLAutoencoder(base_channels=16, channel_mult=(1, 2, 2), disc_weight=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = psnr(model.reconstruct(x), x)
    for step in range(150):  # as the VQGAN's overfitting test below
        out = model.training_losses(x, step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert psnr(model.reconstruct(x), x) - start > 8.0
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = KLAutoencoder(base_channels=16, channel_mult=(1, 2, 2), disc_weight=0.0)
    load_autoencoder_weights(loaded, tmp_path / "w.safetensors")
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))


def test_registry_builds_the_kl_autoencoder():
    registry = get_registry()
    spec = registry.validate_spec("autoencoder", {"type": "kl-vae", "base_channels": 8, "z_channels": 3})
    model = registry.build("autoencoder", spec)
    assert isinstance(model, KLAutoencoder) and model.latent_channels == 3 and model.downsample_factor == 4
    with pytest.raises(SpecError, match="codebook_size"):
        registry.validate_spec("autoencoder", {"type": "kl-vae", "codebook_size": 8})


@pytest.mark.slow
def test_tiny_vqgan_overfits_eight_shape_images():
    """8 PIL shape images, 150 Adam steps on L1 + L_VQ: PSNR rises by more than 8 dB."""
    torch.manual_seed(0)
    x = shapes()
    model = VQGAN(base_channels=16, channel_mult=(1, 2, 2), z_channels=4, codebook_size=64,
                  disc_weight=0.0, dead_code_after=10)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start, t0 = psnr(model.reconstruct(x), x), time.perf_counter()
    first_loss = None
    for step in range(150):
        out = model.training_losses(x, step)
        first_loss = first_loss or out.loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    end = psnr(model.reconstruct(x), x)
    print(f"overfit: PSNR {start:.2f} -> {end:.2f} dB in {time.perf_counter() - t0:.1f} s")
    assert end - start > 8.0
    assert out.loss.item() < 0.5 * first_loss
    assert out.logs["usage"] > 0.5  # re-seeding keeps the small codebook in use


# -- spec and registry -------------------------------------------------------------------------
def test_registry_validates_and_builds_vqgan():
    registry = get_registry()
    spec = registry.validate_spec("autoencoder", {"type": "vqgan", **TINY, "channel_mult": [1, 2, 2]})
    model = registry.build("autoencoder", spec)
    assert isinstance(model, VQGAN) and isinstance(model, Autoencoder)
    assert model.downsample_factor == 4 and model.latent_channels == 4
    assert model.quantizer.num_codes == 32
    default = registry.build("autoencoder", registry.validate_spec("autoencoder", "vqgan"))
    assert default.downsample_factor == 4 and default.latent_channels == 4
    assert default.quantizer.num_codes == 512 and default.latent == "continuous"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"channel_mult": []}, "channel_mult"),
        ({"channel_mult": [1, 0]}, "channel_mult.1"),
        ({"attention_levels": [3]}, "attention_levels"),
        ({"latent": "soft"}, "latent"),
        ({"perceptual": "vgg"}, "perceptual"),
        ({"disc_loss": "wgan"}, "disc_loss"),
        ({"codebook_sizes": 10}, "codebook_size"),
    ],
)
def test_spec_rejects_bad_values(data, message):
    with pytest.raises(SpecError, match=message):
        get_registry().validate_spec("autoencoder", {"type": "vqgan", **data})


@pytest.mark.parametrize("model_class, spec_name", [(VQGAN, "VQGANSpec"), (KLAutoencoder, "KLAutoencoderSpec")])
def test_model_defaults_match_the_spec_defaults(model_class, spec_name):
    import inspect

    import n2a_plugins.vqgan

    spec = getattr(n2a_plugins.vqgan, spec_name)()
    model_defaults = {k: p.default for cls in (AdversarialAutoencoder, model_class)
                      for k, p in inspect.signature(cls).parameters.items()
                      if p.kind is p.POSITIONAL_OR_KEYWORD and k != "encoder_channels"}
    for key, value in spec.params().items():
        default = model_defaults[key]
        assert (list(default) if isinstance(default, tuple) else default) == value, key
    assert set(model_defaults) == set(spec.params())
