"""`n2a train` and `n2a sample` end to end on a tiny slice of the embedded dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import create_app
from n2a_core.checkpoint import latest_checkpoint, load_checkpoint, load_weights

TINY = [
    "data.image_size=16", "data.limit=48", "data.val_fraction=0.2",
    "autoencoder.base_channels=16", "autoencoder.channel_mult=[1,2,2]",
    "autoencoder_training.max_steps=4", "autoencoder_training.batch_size=8",
    "autoencoder_training.sample_every=2", "autoencoder_training.checkpoint_every=2",
    "denoiser.base_channels=16", "denoiser.channel_mult=[1,2]", "denoiser.num_res_blocks=1",
    "denoiser.num_heads=2", "denoiser.norm_groups=8",
    "schedule.num_timesteps=100",
    "training.max_steps=4", "training.batch_size=8", "training.sample_every=2", "training.val_every=2",
    "training.checkpoint_every=2", "training.sample_steps=3", "training.warmup_steps=2",
]


def sets(*extra: str) -> list[str]:
    return [arg for s in (*TINY, *extra) for arg in ("--set", s)]


runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(create_app(), list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "caption"
    result = invoke("train", "--conditioner", "minilm", "--sampler", "ddim", "--out", str(out),
                    *sets("training.preview_captions=[red apple,grinning face]", "training.preview_guidance=1.5"))
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_a_complete_run(caption_run):
    out = caption_run
    assert (out / "spec.yaml").is_file()
    assert (out / "autoencoder" / "weights.safetensors").is_file()
    assert latest_checkpoint(out / "diffusion" / "checkpoints").name == "step-00000004"
    assert list((out / "autoencoder" / "grids").glob("recon-*.png"))
    assert list((out / "diffusion" / "grids").glob("samples-*.png"))
    records = [json.loads(line) for line in (out / "diffusion" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in r for r in records) and any("loss/model" in r for r in records)
    assert (out / "samples" / "final" / "grid.png").is_file()
    final = [json.loads(line) for line in (out / "samples" / "final" / "samples.jsonl").read_text().splitlines()]
    assert [(r["condition"], r["seed"], r["guidance"]) for r in final] == [
        (c, s, 1.5) for c in ("red apple", "grinning face") for s in range(4)]


def test_sample_with_prompt_guidance_and_metadata(caption_run, tmp_path):
    out = tmp_path / "s"
    result = invoke("sample", str(caption_run), "--conditioner", "minilm", "--prompt", "red apple",
                    "--guidance", "3", "--sampler", "dpmpp-2m", "--steps", "4", "--n", "2", "--seed", "7",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 2
    meta = json.loads(Image.open(pngs[1]).text["n2a"])
    assert meta["seed"] == 8 and meta["condition"] == "red apple" and meta["guidance"] == 3.0
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["sampler"] == "dpmpp-2m"
    assert Image.open(out / "grid.png").size[0] >= 32


def strict_records(path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_records_say_what_was_used_in_strict_json(caption_run, tmp_path):
    """No prompt: no guidance is applied, so none is recorded; the steps are the sampler's own."""
    result = invoke("sample", str(caption_run), "--n", "2", "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    records = strict_records(tmp_path / "s" / "samples.jsonl")
    assert [(r["guidance"], r["steps"], r["condition"]) for r in records] == [(0.0, 50, ""), (0.0, 50, "")]
    assert json.loads(Image.open(tmp_path / "s" / "0000-seed0.png").text["n2a"])["steps"] == 50
    assert {r["steps"] for r in strict_records(caption_run / "samples" / "final" / "samples.jsonl")} == {50}
    assert strict_records(caption_run / "diffusion" / "metrics.jsonl")
    assert strict_records(caption_run / "autoencoder" / "metrics.jsonl")


def test_same_seed_same_image_whatever_the_batch(caption_run, tmp_path):
    from n2a_core.generate import generate, load_run

    loaded = load_run(caption_run, device="cpu")
    alone = generate(loaded, ["red apple"], [5], guidance=2.0, steps=3)
    batched = generate(loaded, ["blue car", "red apple", "cat"], [1, 5, 9], guidance=2.0, steps=3)
    torch.testing.assert_close(alone[0], batched[1], atol=1e-5, rtol=1e-4)


def test_sample_errors_are_one_line(caption_run, tmp_path):
    result = invoke("sample", str(caption_run), "--conditioner", "class-label", "--n", "1")
    assert result.exit_code == 1 and "trained with 'minilm'" in result.output
    assert "Traceback" not in result.output
    result = invoke("sample", str(caption_run), "--label", "animals-nature", "--n", "1")
    assert result.exit_code == 1 and "use --prompt" in result.output


def test_existing_run_is_not_overwritten(caption_run):
    before = (caption_run / "spec.yaml").read_text()
    result = invoke("train", "--conditioner", "minilm", "--out", str(caption_run), *sets())
    assert result.exit_code == 1 and "--resume" in result.output
    assert (caption_run / "spec.yaml").read_text() == before


@pytest.mark.slow
def test_resumed_pipeline_matches_uninterrupted(tmp_path):
    """Stage 2 stopped at step 2 and resumed to 4 equals a run that went to 4 directly."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # Stage 1 ends at 2 in both runs, so --max-steps 2 stops only stage 2 early.
    common = sets("training.p_uncond=0.3", "denoiser.dropout=0.1", "autoencoder_training.max_steps=2")
    assert invoke("train", "--conditioner", "class-label", "--out", str(straight), *common).exit_code == 0
    first = invoke("train", "--conditioner", "class-label", "--out", str(resumed), "--max-steps", "2", *common)
    assert first.exit_code == 0, first.output
    again = invoke("train", "--out", str(resumed), "--resume", "--conditioner", "class-label", *common)
    assert again.exit_code == 0, again.output
    assert_same_last_checkpoint(straight / "diffusion", resumed / "diffusion", ("module.model", "stage.ema"))


def assert_same_last_checkpoint(a_stage, b_stage, groups, step=4):
    """Both stage folders' newest checkpoints are at `step` and hold equal tensors in
    `groups`; returns the first one's tensors."""
    a, a_state = load_checkpoint(latest_checkpoint(a_stage / "checkpoints"))
    b, b_state = load_checkpoint(latest_checkpoint(b_stage / "checkpoints"))
    assert a_state["step"] == b_state["step"] == step
    for group in groups:
        for name, tensor in a[group].items():
            assert torch.equal(tensor, b[group][name]), f"{group}/{name}"
    return a


def test_autoencoder_average_is_exported_and_resumes_exactly(tmp_path):
    """With autoencoder_training.ema_decay stage 2 gets the encoder/decoder average while the
    discriminator's weights stay live; a stage 1 stopped at 2 and resumed to 4 ends where a
    straight one does, although it previews (swapping the average in and out) at every step."""
    # The preset trains without a discriminator; this asks for one to see it kept out of the average.
    common = ("autoencoder_training.ema_decay=0.5", "autoencoder.disc_weight=0.8", "autoencoder.disc_start=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert invoke("train-autoencoder", "--out", str(straight), *sets(*common)).exit_code == 0
    previews = sets(*common, "autoencoder_training.sample_every=1")
    assert invoke("train-autoencoder", "--out", str(resumed), "--max-steps", "2", *previews).exit_code == 0
    again = invoke("train-autoencoder", "--out", str(resumed), "--resume", *previews)
    assert again.exit_code == 0, again.output
    a = assert_same_last_checkpoint(straight / "autoencoder", resumed / "autoencoder",
                                    ("module.autoencoder", "stage.ema"))

    live, average = a["module.autoencoder"], a["stage.ema"]
    exported = load_weights(straight / "autoencoder" / "weights.safetensors")
    discriminator = {k for k in live if k.startswith("discriminator.")}
    assert discriminator and not discriminator & set(average)
    assert all(torch.equal(exported[k], live[k]) for k in discriminator)
    averaged = [k for k, v in average.items() if v.is_floating_point() and k != "latent_scale"]
    assert all(torch.equal(exported[k], average[k]) for k in averaged)
    assert any(not torch.equal(average[k], live[k]) for k in averaged)


def test_max_steps_caps_both_stages_and_resume_goes_on_to_the_spec(tmp_path):
    """`n2a train --max-steps 1` is a smoke test: one step of each stage, not all of stage 1."""
    out = tmp_path / "smoke"
    result = invoke("train", "--conditioner", "none", "--out", str(out), "--max-steps", "1", *sets())
    assert result.exit_code == 0, result.output
    assert latest_checkpoint(out / "autoencoder" / "checkpoints").name == "step-00000001"
    assert (out / "autoencoder" / "weights.safetensors").is_file()
    assert latest_checkpoint(out / "diffusion" / "checkpoints").name == "step-00000001"
    again = invoke("train", "--out", str(out), "--resume", *sets())
    assert again.exit_code == 0, again.output
    assert "stage 1 continues although stage 2 has started" in again.output
    assert latest_checkpoint(out / "autoencoder" / "checkpoints").name == "step-00000004"
    assert latest_checkpoint(out / "diffusion" / "checkpoints").name == "step-00000004"


def test_latent_cache_counts_each_unreadable_image_once(tmp_path, caplog):
    """Stage 1's unfinished epoch, its previews and its calibration read the two broken
    files too; the cache's line must count only its own pass: exactly 2."""
    folder = tmp_path / "art"
    folder.mkdir()
    for i in range(22):
        Image.new("RGB", (16, 16), (10 * i, 255 - 10 * i, 128)).save(folder / f"{i:02d}.png")
    (folder / "zero.png").write_bytes(b"")
    (folder / "junk.jpg").write_bytes(b"\x00" * 100)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="n2a_core"):
        result = invoke("train", "--data", "imagefolder", "--conditioner", "none", "--out", str(out),
                        "--max-steps", "1", *sets(f"data.path={folder}", "data.val_fraction=0"))
    assert result.exit_code == 0, result.output
    cache_lines = [r.getMessage() for r in caplog.records if "latent cache" in r.getMessage()]
    assert len(cache_lines) == 1 and "latent cache (train): skipped 2 unreadable images" in cache_lines[0]
    assert "zero.png" in cache_lines[0] and "junk.jpg" in cache_lines[0]


@pytest.mark.parametrize("extra, message", [
    # 24 px -> 6x6 latents (f=4), which a three-level UNet cannot halve twice
    (("data.image_size=24", "denoiser.channel_mult=[1,2,2]"),
     "denoiser (one batch checked before training, data.image_size 24 -> latents 4x6x6): unet: latent size "
     "(6, 6) is not divisible by 4"),
    (("training.batch_size=64",), "training.batch_size: the training split has"),
    (("autoencoder_training.batch_size=64",), "autoencoder_training.batch_size: the training split has"),
    (("training.precision=fp16",), "training.precision: precision fp16 needs a CUDA device"),
])
def test_mistakes_stage_two_would_meet_stop_the_run_before_stage_one(tmp_path, extra, message):
    if "fp16" in message and torch.cuda.is_available():
        pytest.skip("fp16 is fine on CUDA")  # the mistake exists only without CUDA; the CPU run checks it
    out = tmp_path / "run"
    result = invoke("train", "--conditioner", "none", "--out", str(out), *sets(*extra))
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output
    # refused before anything was written or trained (the folder may hold the run lock's file)
    assert not (out / "spec.yaml").exists() and not (out / "autoencoder").exists()


def test_resume_accepts_what_a_refusal_asks_to_change(tmp_path):
    """Stage 1 trained; stage 2 may still get another denoiser and batch size on --resume.
    Once stage 2 has trained, its batch size may change, its denoiser may not."""
    out = tmp_path / "run"
    args = ("--conditioner", "none", "--out", str(out))
    assert invoke("train-autoencoder", *args, *sets()).exit_code == 0
    result = invoke("train", *args, "--resume", "--max-steps", "2",
                    *sets("denoiser.channel_mult=[1,1]", "training.batch_size=4"))
    assert result.exit_code == 0, result.output
    assert latest_checkpoint(out / "diffusion" / "checkpoints").name == "step-00000002"
    result = invoke("train", *args, "--resume", *sets("denoiser.channel_mult=[1,1]", "training.batch_size=12"))
    assert result.exit_code == 0, result.output
    _, state = load_checkpoint(latest_checkpoint(out / "diffusion" / "checkpoints"))
    # 2 steps of 4 samples left the epoch at sample 8, inside a batch of 12: it goes back to 0
    assert state["step"] == 4 and state["data"]["samples"] == 2 * 12
    refused = invoke("train", *args, "--resume", *sets("denoiser.channel_mult=[1,2]"))
    assert refused.exit_code == 1 and "changes denoiser, which stage 2 has already trained with" in refused.output


def test_class_label_run_samples_labels(tmp_path):
    out = tmp_path / "labels"
    assert invoke("train", "--conditioner", "class-label", "--out", str(out), *sets()).exit_code == 0
    labels = json.loads((out / "labels.json").read_text())
    result = invoke("sample", str(out), "--label", labels[0], "--guidance", "2", "--steps", "3", "--n", "1",
                    "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    # Guidance only at the middle steps: other images from the same seed, and the interval on record.
    result = invoke("sample", str(out), "--label", labels[0], "--guidance", "2", "--steps", "3", "--n", "1",
                    "--guidance-interval", "-2", "2", "--out", str(tmp_path / "interval"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "interval" / "samples.jsonl").read_text().splitlines()[0])
    assert record["guidance_log_snr"] == [-2.0, 2.0]
    everywhere, interval = (np.asarray(Image.open(tmp_path / d / record["file"])) for d in ("s", "interval"))
    assert not np.array_equal(everywhere, interval)
    bad = invoke("sample", str(out), "--label", labels[0], "--n", "1", "--guidance-interval", "2", "-2")
    assert bad.exit_code == 1 and "guidance_log_snr [2.0, -2.0]: write it as [lo, hi]" in bad.output
    bad = invoke("sample", str(out), "--label", "no-such-label", "--n", "1")
    assert bad.exit_code == 1 and "unknown label" in bad.output
    bad = invoke("train", "--conditioner", "class-label", "--out", str(tmp_path / "bad"),
                 *sets("training.preview_labels=[no-such-label]", "training.preview_captions=[red apple]"))
    assert bad.exit_code == 1 and "training.preview_labels: unknown label 'no-such-label'" in bad.output
    assert not (tmp_path / "bad" / "autoencoder" / "weights.safetensors").exists()  # refused before stage 1


def eval_autoencoder(run) -> dict:
    result = invoke("eval-autoencoder", str(run), "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics["images"] > 0 and metrics["psnr"] > 5
    assert -1 <= metrics["ssim"] <= 1 and metrics["l1"] >= 0
    return metrics


def test_eval_autoencoder_reports_metrics(caption_run, tmp_path):
    assert "codebook_usage" not in eval_autoencoder(caption_run)  # the preset's KL autoencoder has no codes
    vq = tmp_path / "vq"
    result = invoke("train-autoencoder", "--autoencoder", "vqgan", "--out", str(vq),
                    *sets("autoencoder.codebook_size=32", "autoencoder_training.max_steps=2"))
    assert result.exit_code == 0, result.output
    metrics = eval_autoencoder(vq)
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 32


def test_stage_one_run_feeds_a_stage_two_run(tmp_path, monkeypatch):
    stage1 = tmp_path / "ae"
    result = invoke("train-autoencoder", "--out", str(stage1), *sets())
    assert result.exit_code == 0, result.output
    assert (stage1 / "autoencoder" / "weights.safetensors").is_file()
    stage2 = tmp_path / "diffusion"
    monkeypatch.chdir(tmp_path)  # name the stage-1 run relatively, as a user would
    result = invoke("train", "--autoencoder", "ae", "--conditioner", "none", "--out", str(stage2), *sets())
    assert result.exit_code == 0, result.output
    assert not (stage2 / "autoencoder").exists()  # stage 1 was not trained again
    monkeypatch.chdir(stage2)  # the run still finds its autoencoder from elsewhere
    assert latest_checkpoint(stage2 / "diffusion" / "checkpoints") is not None
    result = invoke("sample", str(stage2), "--n", "2", "--steps", "3", "--out", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    result = invoke("sample", str(stage2), "--prompt", "red apple", "--n", "1")
    assert result.exit_code == 1 and "without a conditioner" in result.output


def test_sample_creative_modes(caption_run, tmp_path):
    """img2img, inpainting, negative prompt and a caption interpolation through the CLI."""
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (40, 30), (220, 40, 40)).save(init)  # any size: resized and centre-cropped
    Image.new("L", (40, 30), 255).save(mask)
    common = ["--steps", "3", "--n", "1", "--prompt", "red apple"]
    result = invoke("sample", str(caption_run), *common, "--init-image", str(init), "--strength", "0.6",
                    "--negative-prompt", "blue car", "--out", str(tmp_path / "i2i"))
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "i2i" / "samples.jsonl").read_text().splitlines()[0])
    assert meta["strength"] == 0.6 and meta["negative"] == "blue car" and meta["init_image"] == str(init)
    result = invoke("sample", str(caption_run), *common, "--init-image", str(init), "--mask", str(mask),
                    "--out", str(tmp_path / "inpaint"))
    assert result.exit_code == 0, result.output
    result = invoke("sample", str(caption_run), "--steps", "3", "--interpolate", "red apple", "grinning face",
                    "--frames", "3", "--out", str(tmp_path / "morph"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "morph" / "samples.jsonl").read_text().splitlines()]
    assert [r["u"] for r in records] == [0.0, 0.5, 1.0] and records[1]["condition_end"] == "grinning face"
    assert len(list((tmp_path / "morph").glob("0*.png"))) == 3
    assert (tmp_path / "morph" / "interpolation.gif").is_file()


def test_sample_creative_errors_are_one_line(caption_run, tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "init.png")
    Image.new("L", (16, 16)).save(tmp_path / "mask.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for args, message in (
        (["--init-image", str(tmp_path / "bad.png")], "bad.png: cannot read it"),
        (["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png")], "16x16 pixels"),
        (["--mask", str(tmp_path / "mask.png")], "--mask: inpainting needs --init-image"),
        (["--negative-label", "x"], "use --prompt"),
    ):
        result = invoke("sample", str(caption_run), "--steps", "2", "--n", "1", *args)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
