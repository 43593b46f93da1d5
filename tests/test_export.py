"""A trained model leaves its run folder: Pipeline, `n2a export`, model cards, Hub ids."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from cli.main import create_app
from n2a_core import Pipeline
from n2a_core.checkpoint import load_latest_checkpoint
from n2a_core.errors import CheckpointError, PluginError, SpecError
from n2a_core.export import WEIGHTS, export_run, folder_size
from n2a_core.model_card import CardFacts, StageRecord, read_front_matter, render
from n2a_core.specs import load_run_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.image_size=16", "data.limit=32", "data.val_fraction=0.25",
    "autoencoder.base_channels=16", "autoencoder.channel_mult=[1,2,2]",
    "autoencoder.disc_weight=0.8",  # the preset has no discriminator: one here shows the export leaves it out
    "autoencoder_training.max_steps=2", "autoencoder_training.batch_size=8",
    "autoencoder_training.sample_every=2", "autoencoder_training.checkpoint_every=2",
    "denoiser.base_channels=16", "denoiser.channel_mult=[1,2]", "denoiser.num_res_blocks=1",
    "denoiser.num_heads=2", "denoiser.norm_groups=8", "schedule.num_timesteps=100",
    "training.max_steps=2", "training.batch_size=8", "training.sample_every=2", "training.val_every=2",
    "training.checkpoint_every=2", "training.sample_steps=2", "training.warmup_steps=1",
    "training.preview_captions=[red apple,cat face]", "sampler.steps=3",
]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(create_app(), list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny caption-conditioned run trained by `n2a train` (stage 1 and 2, two steps each)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = invoke("train", "--conditioner", "minilm", "--sampler", "ddim", "--out", str(out),
                    *[a for s in TINY for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "tiny-export"
    result = invoke("export", str(run), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "smaller than the run" in result.output
    return out


# -- model card ---------------------------------------------------------------------------------
def test_train_writes_a_model_card_with_hub_front_matter(run):
    meta = read_front_matter(run / "README.md")
    assert meta["license"] == "cc-by-sa-4.0"  # OpenMoji's licence, declared by its data plugin
    assert meta["library_name"] == "n2a" and meta["pipeline_tag"] == "text-to-image"
    assert {"n2a", "latent-diffusion", "text-to-image"} <= set(meta["tags"])
    text = (run / "README.md").read_text()
    spec = load_run_spec(run / "spec.yaml")
    assert f"`{spec.digest()}`" in text
    assert "Trained for 2 steps (of 2 planned)" in text  # both stages
    assert re.search(r"\| val/loss \| \d+\.\d+ \| \d+\.\d+ \|", text)
    assert "| preview/psnr |" in text
    grid = re.search(r"!\[samples\]\((.*?)\)", text).group(1)
    assert (run / grid).is_file()
    assert "derived works" in text and "minilm" in text


def test_a_card_for_data_of_unknown_licence_says_so(tmp_path):
    spec = load_run_spec(None, overrides=[f"data={json.dumps({'type': 'imagefolder', 'path': str(tmp_path)})}"])
    card = render(CardFacts(spec, StageRecord(), StageRecord(), None, "mine"))
    assert "license: unknown" in card and "licence of the training data is **unknown**" in card
    spec = load_run_spec(None, overrides=[f"data={json.dumps({'type': 'imagefolder', 'path': str(tmp_path)})}",
                                          "data.license=cc-by-4.0"])
    assert "license: cc-by-4.0" in render(CardFacts(spec, StageRecord(), StageRecord(), None, "mine"))


def test_the_data_licence_is_no_part_of_the_spec_digest():
    a = load_run_spec(None)
    b = load_run_spec(None, overrides=["data.license=cc0-1.0"])
    assert a.digest() == b.digest() and b.data.data_license() == "cc0-1.0"


# -- export ------------------------------------------------------------------------------------
def test_export_holds_only_what_sampling_needs(run, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "grid.png", "labels.json",
                                                          "model.safetensors", "spec.yaml"]
    with safe_open(str(exported / WEIGHTS), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["license"] == "cc-by-sa-4.0" and meta["step"] == "2" and meta["dtype"] == "fp32"
    assert all(k.startswith(("autoencoder.", "diffusion.")) for k in keys)
    assert not any("discriminator" in k for k in keys)
    assert folder_size(exported) * 5 < folder_size(run)
    assert read_front_matter(exported / "README.md")["license"] == "cc-by-sa-4.0"
    assert "![samples](grid.png)" in (exported / "README.md").read_text()
    assert Image.open(exported / "grid.png").size[0] > 16


def test_exported_weights_draw_the_same_images_as_the_run(run, exported, tmp_path):
    options = dict(seeds=[0, 1], guidance=2.0, steps=3, output_type="pt")
    from_run = Pipeline.from_pretrained(run)(["red apple", "cat face"], **options)
    from_export = Pipeline.from_pretrained(exported)(["red apple", "cat face"], **options)
    assert torch.equal(from_run, from_export)  # fp32: the same EMA weights, bit for bit
    half = export_run(run, tmp_path / "half", dtype="bf16")
    assert half.export_bytes < folder_size(exported) * 0.75
    rounded = Pipeline.from_pretrained(tmp_path / "half")(["red apple", "cat face"], **options)
    # Guided sampling amplifies the rounding of single weights into single pixels (up to 0.5
    # on this barely trained model, 0.26 on a trained one), so the images are compared as a
    # whole, against how far other seeds draw: rounding must move them far less.
    other_seeds = Pipeline.from_pretrained(run)(["red apple", "cat face"], **{**options, "seeds": [5, 6]})
    rounding = (rounded - from_run).abs().mean()
    assert 0 < rounding < 0.25 * (other_seeds - from_run).abs().mean()


def test_export_refuses_a_used_folder_and_a_bad_dtype(run, exported):
    with pytest.raises(SpecError, match="--out: .* already exists"):
        export_run(run, exported)
    with pytest.raises(SpecError, match="--dtype"):
        export_run(run, exported.parent / "other", dtype="int8")
    result = invoke("export", str(exported), "--out", str(exported.parent / "again"))
    assert result.exit_code == 1 and "already an exported folder" in result.output


def test_n2a_sample_loads_an_exported_folder(exported, tmp_path):
    out = tmp_path / "s"
    result = invoke("sample", str(exported), "--prompt", "red apple", "--n", "2", "--steps", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("0*.png"))) == 2 and (out / "grid.png").is_file()
    assert not (exported / "samples").exists()  # the export stays as shipped


# -- Pipeline ------------------------------------------------------------------------------------
def test_pipeline_returns_pil_images_one_per_seed(exported):
    pipe = Pipeline.from_pretrained(exported)
    images = pipe(["red apple", "cat face"], seeds=[5, 6], steps=2)
    assert [im.size for im in images] == [(16, 16), (16, 16)] and images[0].mode == "RGB"
    one = pipe("cat face", seeds=[6], steps=2, output_type="pt")
    both = pipe(["red apple", "cat face"], seeds=[5, 6], steps=2, output_type="pt")
    assert torch.allclose(one[0], both[1], atol=1e-4)  # an image depends on its seed, not its batch
    assert len(pipe("red apple", n=3, steps=2)) == 3
    assert pipe.condition_field == "caption" and "tiny-export" in repr(pipe)


def test_pipeline_loads_a_runs_raw_or_ema_weights_and_an_export_only_its_ema(run, exported):
    _, tensors, _ = load_latest_checkpoint(run / "diffusion" / "checkpoints")
    for ema, group in ((True, "stage.ema"), (False, "module.model")):
        loaded = Pipeline.from_pretrained(run, ema=ema).loaded.model.state_dict()
        assert all(torch.equal(loaded[name], value) for name, value in tensors[group].items())
    assert any(not torch.equal(tensors["stage.ema"][name], raw) for name, raw in tensors["module.model"].items())
    with pytest.raises(SpecError, match="ema=False needs a run folder"):
        Pipeline.from_pretrained(exported, ema=False)


def test_pipeline_rejects_mismatched_seeds_and_unknown_options(exported):
    pipe = Pipeline.from_pretrained(exported)
    with pytest.raises(SpecError, match="seeds: 1 seeds for 2 images"):
        pipe(["a", "b"], seeds=[0])
    with pytest.raises(PluginError, match="sampler: unknown plugin 'ddmi'"):
        pipe("a", sampler="ddmi")
    with pytest.raises(TypeError, match="no_such_option"):
        pipe("a", steps=1, no_such_option=True)  # options reach generate() as they are


def test_readme_example_runs(run, tmp_path, monkeypatch):
    """The README's Python example, run as written against a tiny run at runs/my-run."""
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(from n2a_core import Pipeline\n.*?)```", readme, flags=re.S).group(1)
    (tmp_path / "runs").mkdir()
    os.symlink(run, tmp_path / "runs" / "my-run")
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert Image.open(tmp_path / "apple.png").size == (16, 16)


# -- Hub ids --------------------------------------------------------------------------------------
@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_hub_id_offline_fails_in_one_line_naming_it(offline_hub):
    with pytest.raises(CheckpointError) as info:
        Pipeline.from_pretrained("someone/no-such-model")
    message = str(info.value)
    assert message.startswith("someone/no-such-model: ") and "\n" not in message and "Hub" in message


def test_a_hub_id_in_the_cache_loads_through_snapshot_download(exported, offline_hub):
    commit = "0" * 40
    repo = offline_hub / "models--someone--tiny"
    shutil.copytree(exported, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pipe = Pipeline.from_pretrained("someone/tiny")
    assert pipe.loaded.run.root == repo / "snapshots" / commit
    assert len(pipe("red apple", steps=1)) == 1


def test_a_missing_local_path_is_not_taken_for_a_hub_id():
    with pytest.raises(SpecError, match="no such folder"):
        Pipeline.from_pretrained("./nowhere/at/all")
