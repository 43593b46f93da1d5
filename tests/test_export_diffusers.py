"""`n2a export --format diffusers` and the `diffusers` autoencoder plugin, checked with diffusers itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("diffusers", reason="diffusers is an optional extra: pip install 'n2a[diffusers]'")
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel, VQModel  # noqa: E402
from diffusers.models.embeddings import TimestepEmbedding  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from cli.main import create_app  # noqa: E402
from n2a_core.component import BuildContext  # noqa: E402
from n2a_core.errors import SpecError  # noqa: E402
from n2a_core.generate import generate, load_run  # noqa: E402
from n2a_core.plugins import get_registry, load_plugins  # noqa: E402
from n2a_plugins.unet import UNet  # noqa: E402
from n2a_plugins.vqgan.model import VQGAN  # noqa: E402

# GroupNorm groups are gcd(32, channels) in n2a's VQGAN; diffusers wants one count: base 32.
TINY = [
    "data.image_size=16", "data.limit=32", "data.val_fraction=0.25",
    "autoencoder.base_channels=32", "autoencoder.channel_mult=[1,2]",
    "autoencoder.attention_levels=[1]",
    "autoencoder_training.max_steps=2", "autoencoder_training.batch_size=8",
    "autoencoder_training.sample_every=2", "autoencoder_training.checkpoint_every=2",
    "denoiser.base_channels=16", "denoiser.channel_mult=[1,2]", "denoiser.num_res_blocks=1",
    "denoiser.num_heads=2", "denoiser.norm_groups=8", "denoiser.scale_shift=true", "schedule.num_timesteps=100",
    "training.max_steps=2", "training.batch_size=8", "training.sample_every=2", "training.val_every=2",
    "training.checkpoint_every=2", "training.sample_steps=2", "training.warmup_steps=1", "sampler.steps=3",
]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(create_app(), list(args), catch_exceptions=False)


def sets(*extra: str) -> list[str]:
    return [a for s in (*TINY, *extra) for a in ("--set", s)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny class-label run trained by `n2a train` (two steps per stage)."""
    out = tmp_path_factory.mktemp("runs") / "labels"
    result = invoke("train", "--autoencoder", "vqgan", "--conditioner", "class-label", "--sampler", "ddim",
                    "--out", str(out), *sets("autoencoder.codebook_size=32"))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "diffusers"
    result = invoke("export", str(run), "--format", "diffusers", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_the_folder_loads_with_diffusers_from_pretrained(exported):
    assert {p.name for p in exported.iterdir()} >= {"vqvae", "unet", "scheduler", "n2a.json", "README.md"}
    info = json.loads((exported / "n2a.json").read_text())
    unet = UNet2DModel.from_pretrained(exported, subfolder="unet")
    assert unet.config.num_class_embeds == len(info["labels"]) + 1 == info["null_class"] + 1
    assert VQModel.from_pretrained(exported, subfolder="vqvae").config.scaling_factor != 1.0
    assert DDIMScheduler.from_pretrained(exported, subfolder="scheduler").config.prediction_type == "epsilon"
    assert "library_name: diffusers" in (exported / "README.md").read_text()


def test_diffusers_models_compute_what_n2a_computes(run, exported):
    loaded = load_run(run)
    info = json.loads((exported / "n2a.json").read_text())
    unet = UNet2DModel.from_pretrained(exported, subfolder="unet").eval()
    vqvae = VQModel.from_pretrained(exported, subfolder="vqvae").eval()
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4, *info["latent_shape"], generator=generator)
    t = torch.tensor([0, 17, 60, 99])
    labels = [info["labels"][0], info["labels"][-1], info["labels"][1], ""]
    with torch.no_grad():
        cond, missing = loaded.model.embed(labels)
        ours = loaded.model.denoiser(z, t.float(), cond, missing)
        index = torch.tensor([0, len(info["labels"]) - 1, 1, info["null_class"]])
        theirs = unet(z, t, class_labels=index).sample
        assert (ours - theirs).abs().max() < 1e-4
        assert ours.abs().mean() > 0.01  # a real output, not two zeros agreeing
        scale = vqvae.config.scaling_factor
        decoded = vqvae.decode(z / scale).sample
        assert (loaded.components.autoencoder.decode(z) - decoded).abs().max() < 1e-4


def test_a_guided_ddim_loop_in_diffusers_draws_n2a_images(run, exported):
    loaded = load_run(run)
    info = json.loads((exported / "n2a.json").read_text())
    unet = UNet2DModel.from_pretrained(exported, subfolder="unet").eval()
    vqvae = VQModel.from_pretrained(exported, subfolder="vqvae").eval()
    scheduler = DDIMScheduler.from_pretrained(exported, subfolder="scheduler")
    steps, w, seeds = 5, 2.0, [3, 4]
    chosen = info["labels"][:2]
    sampler = get_registry().validate_spec("sampler", {"type": "ddim", "eta": 0.0, "min_log_snr": None})
    ours = generate(loaded, chosen, seeds, guidance=w, sampler_spec=sampler, steps=steps)

    scheduler.set_timesteps(steps)
    z = torch.stack([torch.randn(info["latent_shape"], generator=torch.Generator().manual_seed(s)) for s in seeds])
    labels = torch.tensor([info["labels"].index(c) for c in chosen] + [info["null_class"]] * len(chosen))
    with torch.no_grad():
        for t in scheduler.timesteps:
            conditional, unconditional = unet(torch.cat([z, z]), t, class_labels=labels).sample.chunk(2)
            eps = unconditional + (1 + w) * (conditional - unconditional)  # guidance_scale = 1 + w
            z = scheduler.step(eps, t, z, eta=0.0).prev_sample
        theirs = vqvae.decode(z / vqvae.config.scaling_factor).sample.clamp(-1, 1)
    # Not bit for bit: diffusers keeps alphas_cumprod in float32, n2a's table is float64.
    assert (ours - theirs).abs().max() < 5e-3 and (ours - theirs).abs().mean() < 5e-4
    assert (ours - theirs).abs().mean() * 20 < (ours[0] - ours[1]).abs().mean()  # seeds differ far more


def test_an_unconditional_model_loads_as_an_ldm_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    run, out = tmp_path / "run", tmp_path / "diffusers"
    assert invoke("train", "--out", str(run), *sets("conditioner=null")).exit_code == 0
    assert invoke("export", str(run), "--format", "diffusers", "--out", str(out)).exit_code == 0
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "LDMPipeline"
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert [im.size for im in images] == [(16, 16), (16, 16)]


def test_a_kl_autoencoder_exports_as_autoencoder_kl(tmp_path):
    from diffusers import DiffusionPipeline

    run, out = tmp_path / "run", tmp_path / "diffusers"
    args = [a for s in (*TINY, "conditioner=null") if "codebook_size" not in s for a in ("--set", s)]
    result = invoke("train", "--autoencoder", "kl-vae", "--out", str(run), *args)
    assert result.exit_code == 0, result.output
    assert invoke("export", str(run), "--format", "diffusers", "--out", str(out)).exit_code == 0
    ours = load_run(run).components.autoencoder
    theirs = AutoencoderKL.from_pretrained(out, subfolder="vqvae").eval()
    assert theirs.config.scaling_factor == pytest.approx(float(ours.latent_scale))
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # decode is the same function; both take latents divided by the scale
        assert (ours.decode(z) - theirs.decode(z / theirs.config.scaling_factor).sample).abs().max() < 1e-4
    index = json.loads((out / "model_index.json").read_text())
    assert index["vqvae"] == ["diffusers", "AutoencoderKL"]
    pipe = DiffusionPipeline.from_pretrained(out)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (16, 16)


def test_a_caption_vector_model_maps_through_the_projection_embedding():
    torch.manual_seed(0)
    unet = UNet(in_channels=4, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, num_heads=2,
                norm_groups=8, cond_mode="vector", cond_dim=6).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.2)
    parts = unet.to_diffusers(8)
    assert isinstance(parts["condition_projection"], TimestepEmbedding)
    z, t, c = torch.randn(3, 4, 8, 8), torch.tensor([3.0, 40.0, 90.0]), torch.randn(3, 6)
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        rows = torch.where(drop[:, None], parts["null_condition"], c)
        theirs = parts["unet"](z, t, class_labels=parts["condition_projection"](rows)).sample
        assert (unet(z, t, c, drop) - theirs).abs().max() < 1e-4


def test_configurations_without_a_diffusers_equivalent_are_refused():
    sequence = UNet(in_channels=4, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, num_heads=2,
                    norm_groups=8, cond_mode="sequence", cond_dim=6)
    with pytest.raises(SpecError, match="denoiser.cond_mode: 'sequence'"):
        sequence.to_diffusers(8)
    heads = UNet(in_channels=4, base_channels=16, channel_mult=[1, 2], attention_levels=[0, 1], num_heads=2,
                 norm_groups=8)
    with pytest.raises(SpecError, match="denoiser.num_heads: 2 heads at widths"):
        heads.to_diffusers(8)
    with pytest.raises(SpecError, match="autoencoder.base_channels: GroupNorm groups differ"):
        VQGAN(base_channels=16, channel_mult=[1, 2]).to_diffusers(16)
    with pytest.raises(SpecError, match="autoencoder.l2_normalize_codes"):
        VQGAN(base_channels=32, channel_mult=[1, 2], l2_normalize_codes=True).to_diffusers(16)


def test_cli_refuses_in_one_line(run, tmp_path):
    result = invoke("export", str(run), "--format", "diffusers", "--out", str(run))
    assert result.exit_code == 1 and "--out" in result.output and len(result.output.strip().splitlines()) == 1


# -- the diffusers autoencoder plugin ---------------------------------------------------------------
def build_plugin_autoencoder(path: Path, subfolder: str | None = None):
    registry = get_registry()
    spec = registry.validate_spec("autoencoder", {"type": "diffusers", "path": str(path), "subfolder": subfolder})
    return registry.build("autoencoder", spec, BuildContext(training=True))


def test_an_autoencoder_kl_wraps_with_its_posterior_mean(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16).eval()
    vae.save_pretrained(tmp_path / "kl")
    ae = build_plugin_autoencoder(tmp_path / "kl")
    assert (ae.latent_channels, ae.downsample_factor, ae.pretrained) == (4, 2, True)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        scale = ae.estimate_latent_scale(x)
        assert abs(ae.encode(x).std().item() - 1) < 1e-3  # unit variance after the estimated scale
        mean = vae.encode(x).latent_dist.mean
        assert torch.allclose(ae.encode(x), mean * scale, atol=1e-5)
        assert torch.allclose(ae.decode(mean * scale), vae.decode(mean).sample, atol=1e-5)
    with pytest.raises(SpecError, match="not trained by n2a"):
        ae.training_losses(x, 0)


def test_a_missing_model_and_a_wrong_class_are_one_line_errors(tmp_path):
    with pytest.raises(SpecError, match="autoencoder.path: cannot read a diffusers model config"):
        build_plugin_autoencoder(tmp_path / "nothing")
    UNet2DModel(block_out_channels=[32, 32], down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2,
                norm_num_groups=8, layers_per_block=1).save_pretrained(tmp_path / "u")
    with pytest.raises(SpecError, match="holds a UNet2DModel"):
        build_plugin_autoencoder(tmp_path / "u")


def test_without_diffusers_the_plugin_is_listed_as_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    monkeypatch.delitem(sys.modules, "n2a_plugins.diffusers_autoencoder", raising=False)
    monkeypatch.setenv("N2A_LOAD_PLUGINS", "diffusers_autoencoder")
    status = load_plugins().plugins["diffusers_autoencoder"]
    assert status.status == "error"
    assert status.error == "PluginError: diffusers is not installed; pip install 'n2a[diffusers]'"


def test_round_trip_train_on_an_exported_vqmodel_skipping_stage_1(run, exported, tmp_path):
    """The VQModel written by item 4 comes back as stage 1 of a new run: n2a only estimates its scale."""
    out = tmp_path / "on-vqmodel"
    result = invoke("train", "--conditioner", "class-label", "--sampler", "ddim", "--out", str(out),
                    "--autoencoder", "diffusers", *sets(f"autoencoder={{type: diffusers, path: '{exported}', "
                                                        "subfolder: vqvae}"))
    assert result.exit_code == 0, result.output
    assert not (out / "autoencoder" / "checkpoints").exists()  # stage 1 skipped
    weights = load_file(str(out / "autoencoder" / "weights.safetensors"))
    original = load_file(str(run / "autoencoder" / "weights.safetensors"))
    assert weights["model.decoder.conv_out.weight"].equal(original["decoder.conv_out.weight"])
    assert float(weights["latent_scale"]) > 0 and float(weights["latent_scale"]) != 1.0
    assert (out / "diffusion" / "checkpoints" / "latest").is_file()
    # and the new run samples, through the wrapped VQModel
    images = generate(load_run(out), ["", ""], [0, 1], steps=2)
    assert images.shape == (2, 3, 16, 16) and images.isfinite().all()
