"""The benchmark code paths at a tiny size (so the scripts cannot rot), the checks that make
their comparisons like for like, and the UNet's performance paths (float32 attention under
bf16 autocast, channels_last on the CPU). No timing is asserted anywhere."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common
from benchmarks.common import TINY, Timing, check_matched, interleave, speedup

ROOT = Path(__file__).resolve().parents[1]

# diffusers is the baseline of every ratio; it is in the `dev` extra, so CI runs these.
# The skip only spares a contributor who installed n2a without it.
needs_diffusers = pytest.mark.skipif(not common.have_diffusers(),
                                     reason="diffusers is not installed (pip install -e '.[bench]')")


# -- the harness ----------------------------------------------------------------------------
def test_interleave_alternates_order_and_counts_calls():
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = interleave(cases, repeats=4, warmup=1)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc") + list("cba")
    assert all(len(t.wall) == len(t.cpu) == 4 for t in timings.values())
    assert all(w >= 0 for t in timings.values() for w in t.wall)


def test_speedup_is_baseline_over_n2a_time():
    fast, slow = Timing(wall=[1.0, 9.0, 1.0], cpu=[2.0, 2.0, 2.0]), Timing(wall=[3.0, 3.0, 0.5], cpu=[5.0, 5.0, 5.0])
    assert speedup(fast, slow) == {"wall": 3.0, "cpu": 2.5}  # medians: 1 vs 3, 2 vs 5
    assert fast.spread() == pytest.approx(8.0)


def test_check_matched_names_both_counts():
    assert check_matched("UNet", 1040, 1000, 0.05) == pytest.approx(1.04)
    with pytest.raises(AssertionError, match=r"UNet: n2a has 1,100 parameters and diffusers 1,000"):
        check_matched("UNet", 1100, 1000, 0.05)


def test_missing_diffusers_is_one_line_and_exit_2(monkeypatch, capsys):
    from benchmarks import run

    monkeypatch.setattr(common, "have_diffusers", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--quick"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "diffusers is not installed" in err and "\n" not in err


def test_memory_measurement_sees_a_known_allocation(monkeypatch):
    """64 MiB written inside the measured work shows up as at least that much peak."""
    from benchmarks import memory

    size = 64 * 2**20

    def write_fresh_pages():
        # Fresh anonymous pages from the kernel: a torch or malloc allocation may reuse
        # memory that earlier tests left resident, and then no new peak would show.
        pages = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            pages[offset] = 1
        pages.close()

    monkeypatch.setattr(memory, "workload", lambda *a: write_fresh_pages)
    result = memory.measure_here("train", "n2a", TINY, torch.device("cpu"))
    assert size * 0.9 <= result["peak_bytes"] < size * 3, result


# -- the UNet's performance paths (no diffusers needed) ----------------------------------------
def tiny_unet(**kw):
    from n2a_plugins.unet import UNet

    torch.manual_seed(0)
    return UNet(**{"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                   "head_channels": 8, "norm_groups": 8, **kw})


def test_prefers_channels_last_only_for_float32_cpu_without_autocast():
    from n2a_core.layout import prefers_channels_last

    x = torch.randn(2, 4, 8, 8)
    assert prefers_channels_last(x)
    assert not prefers_channels_last(x.bfloat16())
    with torch.autocast("cpu", torch.bfloat16):
        assert not prefers_channels_last(x)


def test_channels_last_path_keeps_values_and_the_callers_layout(monkeypatch):
    from n2a_plugins import unet

    model = tiny_unet(cond_mode="sequence", cond_dim=6).eval()
    z, t, cond = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 500.0, 999.0]), torch.randn(3, 2, 6)
    seen = []
    model.conv_in.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        out = model(z, t, cond)
        assert out.is_contiguous()  # given NCHW, returned NCHW
        assert model(z.contiguous(memory_format=torch.channels_last), t, cond).is_contiguous(
            memory_format=torch.channels_last)
        monkeypatch.setattr(unet, "prefers_channels_last", lambda x: False)
        reference = model(z, t, cond)
    assert seen == [True, True, False]  # the convs ran in NHWC until the switch was off
    assert torch.allclose(out, reference, atol=1e-5)


def test_attention_core_runs_in_float32_under_cpu_bf16_autocast(monkeypatch):
    from n2a_plugins import unet

    real = torch.nn.functional.scaled_dot_product_attention
    dtypes = []

    def spy(q, k, v, *args, **kwargs):
        dtypes.append(q.dtype)
        return real(q, k, v, *args, **kwargs)

    q, k, v = (torch.randn(2, 16, 32) for _ in range(3))
    reference = unet.attend(q, k, v, heads=4)
    monkeypatch.setattr(unet.F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", torch.bfloat16):
        out = unet.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=4)
    assert dtypes == [torch.float32] and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=5e-2)


def test_bf16_autocast_training_step_tracks_float32():
    """One loss and its gradients under bf16 autocast stay within bf16 precision of fp32."""
    grads = {}
    for bf16 in (False, True):
        model = tiny_unet()
        z, eps = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(4, 4, 8, 8)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = (model(z, torch.tensor([10.0, 200.0, 600.0, 990.0])).float() - eps).square().mean()
        loss.backward()
        grads[bf16] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    (l32, g32), (l16, g16) = grads[False], grads[True]
    assert l16 == pytest.approx(l32, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.98


# -- the matched configurations ------------------------------------------------------------
@needs_diffusers
def test_r64_parameter_counts_match():
    r64 = common.R64
    n2a_count, diffusers_count = (common.parameter_count(m) for m in (common.n2a_unet(r64), common.diffusers_unet(r64)))
    assert n2a_count == diffusers_count == 6_804_868
    n, d = (common.parameter_count(m) for m in (common.n2a_unet(r64, True), common.diffusers_unet(r64, True)))
    check_matched("conditional UNet", n, d, 0.05)
    vqgan = common.n2a_vqgan(r64)
    check_matched("autoencoder", common.parameter_count(vqgan, vqgan.inference_modules()),
                  common.parameter_count(common.diffusers_vqmodel(r64)), 0.10)


@needs_diffusers
def test_converted_weights_make_the_same_network():
    torch.manual_seed(0)
    n2a, baseline = common.n2a_unet(TINY).eval(), common.diffusers_unet(TINY).eval()
    z, t = torch.randn(3, *TINY.latent_shape), torch.tensor([0.0, 421.0, 999.0])
    with torch.no_grad():
        before = (n2a(z, t) - baseline(z, t).sample).abs().max()
        common.load_diffusers_unet_into_n2a(n2a, baseline)
        after = (n2a(z, t) - baseline(z, t).sample).abs().max()
    assert before > 1e-2 and after < 1e-5


# -- every benchmark through the entry point -------------------------------------------------
@pytest.mark.slow
@needs_diffusers
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 vs diffusers' DPM-Solver scheduler
def test_run_quick_tiny_prints_a_table_then_the_json_line(monkeypatch, capsys):
    from benchmarks import memory, run

    # In-process memory cases: a subprocess per case would cost seconds of imports each.
    monkeypatch.setattr(memory, "measure", lambda case, impl, size, device, threads:
                        memory.measure_here(case, impl, size, device, iterations=1))
    assert run.main(["--quick", "--size", "tiny", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    for key in ("train_ratio", "train_ratio_bf16", "sample_ratio_20", "sample_ratio_50", "fast_sampler_ratio",
                "ae_ratio", "flop_efficiency", "cache_speedup"):
        assert result[key] > 0, key
    # In-process, pages freed by earlier tests can absorb a tiny model's peak: only >= 0 holds.
    assert result["peak_mem_ratio"] >= 0
    assert "errors" not in result and "summary against the targets" in "\n".join(lines)
    # The like-for-like checks: same weights give the same first loss and the same samples.
    assert result["first_loss"] == pytest.approx(result["first_loss_diffusers"], rel=1e-5)
    assert result["step_gflop"] == pytest.approx(result["step_gflop_diffusers"])
    assert result["ddim_max_abs_diff"] < 1e-3 and result["dpmpp_2m_max_abs_diff"] < 1e-3
    assert result["guided_forwards_per_step"] == 1 and result["guided_forward_batch"] == 4
    assert result["ae_channels_last_max_abs_diff"] < 1e-4
    assert result["cache_steps_per_epoch"] == 16 and result["machine"]["threads"] == 1


def test_loss_curve_runs_both_precisions_from_the_same_start():  # n2a only: no diffusers needed
    from benchmarks import loss_curve

    result = loss_curve.run(TINY, steps=4)
    curves, metrics = result["curves"], result["metrics"]
    assert len(curves["fp32"]) == len(curves["bf16"]) == 4
    assert metrics["loss_first_bf16"] == pytest.approx(metrics["loss_first_fp32"], rel=2e-2)
    assert abs(metrics["loss_final_gap"]) < 0.05


def test_stage1_compares_the_quickstarts_autoencoder_with_the_vqgan_in_both_phases():
    from benchmarks import stage1

    specs = stage1.recipes()
    baseline, preset = specs.values()
    assert baseline.autoencoder.type == "vqgan" and baseline.autoencoder_training.ema_decay is None
    assert preset.autoencoder.type != "vqgan"  # the preset moved on; the benchmark says by how much
    assert preset.model_dump(exclude={"autoencoder", "autoencoder_training"}) == baseline.model_dump(
        exclude={"autoencoder", "autoencoder_training"})

    result = stage1.run(steps=1, repeats=1, batch=2)
    per_step, weights = result["per_step_s"], result["phase_weights"]
    assert len(per_step) == 4 and all(t > 0 for t in per_step.values())
    for name, spec in zip(result["recipes"], specs.values(), strict=True):
        tspec = spec.autoencoder_training
        assert weights[name]["before"] == spec.autoencoder.disc_start / tspec.max_steps
        assert weights[name]["before"] + weights[name]["after"] == pytest.approx(1.0)
    stage_s = [sum(w * per_step[f"{name}, {phase} disc_start"] for phase, w in weights[name].items())
               for name in result["recipes"]]
    assert result["metrics"]["stage1_cost_ratio"] == pytest.approx(stage_s[1] / stage_s[0])


def test_precision_times_each_stage_of_a_spec_in_fp32_and_bf16(tmp_path):
    import yaml

    from benchmarks import precision
    from n2a_core.specs import read_spec_file, resolve_run_spec

    data = read_spec_file(precision.DEFAULT_SPEC)
    data["autoencoder_training"]["batch_size"] = data["training"]["batch_size"] = 2
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data))
    spec = resolve_run_spec(data)

    bf16 = spec.training.model_copy(update={"precision": "bf16"})
    loop = precision.diffusion_loop(spec, bf16, torch.device("cpu"), tmp_path / "dm", ["a", "b"])
    assert loop.dtype == torch.bfloat16
    assert torch.isfinite(loop.train_step(iter(loop.stream))["loss/model"])

    result = precision.run(spec_path, steps=1, repeats=1)
    per_step, metrics = result["per_step_s"], result["metrics"]
    assert len(per_step) == 6 and all(t > 0 for t in per_step.values())
    for part in ("stage 1 before disc_start", "stage 1 after disc_start", "stage 2"):
        ratio = per_step[f"{part}, fp32"] / per_step[f"{part}, bf16"]
        assert metrics["bf16_speedup_" + part.replace(" ", "_")] == pytest.approx(ratio)


# -- how they are run ------------------------------------------------------------------------
def test_benchmarks_run_as_modules_without_a_path_shim():
    """`python -m benchmarks.x` from the repository root; no script edits sys.path to get there."""
    shims = [p.name for p in (ROOT / "benchmarks").glob("*.py") if "sys.path" in p.read_text()]
    assert shims == []
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout


# -- the yardstick's reconstruction side ---------------------------------------------------------
def test_yardstick_reconstructions_are_the_autoencoders_round_trip(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from benchmarks.yardstick import load_image, reconstruct_split
    from cli.main import create_app
    from n2a_core.generate import load_run

    split = tmp_path / "test"
    for category, colour in (("flags", (200, 30, 30, 255)), ("symbols", (0, 0, 0, 0))):
        (split / category).mkdir(parents=True)
        for i in range(3):
            Image.new("RGBA", (16, 16), colour[:3] + (colour[3] if i else 255,)).save(split / category / f"{i}.png")
    # fully transparent pixels count as white, as the yardstick's scorer composites them
    assert torch.equal(load_image(split / "symbols" / "1.png"), torch.ones(3, 16, 16))

    run = tmp_path / "run"
    sets = ["data.image_size=16", "data.limit=16", "data.val_fraction=0.25", "autoencoder.base_channels=8",
            "autoencoder.channel_mult=[1,2]", "autoencoder_training.max_steps=2", "autoencoder_training.batch_size=4",
            "training.max_steps=1", "training.batch_size=4", "denoiser.base_channels=8", "denoiser.channel_mult=[1]",
            "denoiser.num_heads=1", "denoiser.norm_groups=4", "denoiser.attention_levels=[]", "sampler.steps=2",
            "training.sample_steps=2", "training.warmup_steps=0", "conditioner=null"]
    args = ["train", "--autoencoder", "kl-vae", "--out", str(run), *[a for s in sets for a in ("--set", s)]]
    result = CliRunner().invoke(create_app(), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    out = tmp_path / "recon"
    assert reconstruct_split(run, split, out, batch_size=4) == 6
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted((r["category"], r["file"]) for r in rows) == sorted(
        (p.parent.name, f"{p.parent.name}/{p.name}") for p in split.glob("*/*.png"))
    model = load_run(run).components.autoencoder
    for row in rows:
        x = load_image(split / row["file"])
        with torch.no_grad():
            expected = model.decode(model.encode(x[None]))[0].clamp(-1, 1)
        assert (load_image(out / row["file"]) - expected).abs().max() <= 1.01 / 127.5  # one 8-bit step

    # --latent-noise: the same round trip with N(0, sigma^2) added to the unit-variance
    # latents, one generator per batch seeded by its first index
    noisy = tmp_path / "noisy"
    assert reconstruct_split(run, split, noisy, batch_size=4, latent_noise=0.5) == 6
    files = sorted(split.glob("*/*.png"))
    for start in range(0, len(files), 4):
        chunk = files[start:start + 4]
        with torch.no_grad():
            latents = model.encode(torch.stack([load_image(f) for f in chunk]))
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(start))
            expected = model.decode(latents + 0.5 * noise).clamp(-1, 1)
        for f, x in zip(chunk, expected, strict=True):
            got = load_image(noisy / f.parent.name / f.name)
            assert (got - x).abs().max() <= 1.01 / 127.5
            assert (got - load_image(out / f.parent.name / f.name)).abs().max() > 2 / 127.5
