"""`n2a eval` and `training.eval_every` on a tiny class-label run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.main import create_app

TINY = [
    "data.image_size=16", "data.limit=48", "data.val_fraction=0.25",
    "autoencoder.base_channels=16", "autoencoder.channel_mult=[1,2,2]",
    "autoencoder_training.max_steps=2", "autoencoder_training.batch_size=8",
    "denoiser.base_channels=16", "denoiser.channel_mult=[1,2]", "denoiser.num_res_blocks=1",
    "denoiser.num_heads=2", "denoiser.norm_groups=8", "schedule.num_timesteps=100", "sampler.steps=3",
    "training.max_steps=4", "training.batch_size=8", "training.sample_every=2", "training.val_every=2",
    "training.checkpoint_every=2", "training.sample_steps=3", "training.warmup_steps=2",
    "training.eval_every=2", "training.eval_images=8",
]

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(create_app(), list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def label_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "labels"
    sets = [a for s in TINY for a in ("--set", s)]
    result = invoke("train", "--conditioner", "class-label", "--tracker", "tensorboard", "--out", str(out), *sets)
    assert result.exit_code == 0, result.output
    return out


def strict_json(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: {c} is not strict JSON"))


def test_eval_every_scores_the_generator_during_training(label_run):
    files = sorted((label_run / "eval").glob("*.json"))
    assert [f.name for f in files] == ["step-00000002-random-conv.json", "step-00000004-random-conv.json"]
    result = strict_json(files[-1])
    assert result["images"] == 8 and result["reference"]["split"] == "val"
    m = result["metrics"]
    assert m["fd"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert 0 <= m["conditional_accuracy"] <= 1 and 0 <= m["real_accuracy"] <= 1
    logged = [json.loads(line) for line in (label_run / "diffusion" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval/fd" in r] == [2, 4]
    assert next(r for r in logged if r["step"] == 4 and "eval/fd" in r)["eval/fd"] == pytest.approx(m["fd"])
    page = (label_run / "report.html").read_text()  # refreshed at the end, with the last eval
    assert "<svg" in page and f"{m['fd']:.4g}" in page


def test_n2a_eval_writes_strict_json_and_is_seeded(label_run):
    first = invoke("eval", str(label_run), "--n", "10", "--json")
    assert first.exit_code == 0, first.output
    again = invoke("eval", str(label_run), "--n", "10", "--json")
    a, b = (json.loads(r.output.strip().splitlines()[-1]) for r in (first, again))
    assert a["metrics"] == b["metrics"] and a["images"] == 10 and a["step"] == 4
    assert strict_json(label_run / "eval" / "step-00000004-random-conv.json")["images"] == 10
    other_seed = json.loads(invoke("eval", str(label_run), "--n", "10", "--seed", "1", "--json")
                            .output.strip().splitlines()[-1])
    assert other_seed["metrics"]["fd"] != a["metrics"]["fd"]


def test_n2a_eval_table_and_errors(label_run, tmp_path, monkeypatch):
    shown = invoke("eval", str(label_run), "--n", "6")
    assert shown.exit_code == 0 and "kid" in shown.output and "conditional_accuracy" in shown.output
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    missing = invoke("eval", str(label_run), "--n", "6", "--extractor", "inception")
    assert missing.exit_code == 1
    assert "pt_inception-2015-12-05-6726825d.pth not found" in missing.output
    assert "--extractor random-conv" in missing.output
    typo = invoke("eval", str(label_run), "--extractor", "incepton")
    assert typo.exit_code == 1 and "did you mean 'inception'" in typo.output
    not_a_run = invoke("eval", str(tmp_path))
    assert not_a_run.exit_code == 1 and "not an n2a run" in not_a_run.output


def test_training_hands_metrics_grids_and_evals_to_the_trackers(label_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(label_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    expected = {"diffusion/loss/model", "diffusion/val/loss", "diffusion/eval/fd", "autoencoder/loss/autoencoder"}
    assert expected <= set(tags["scalars"])
    assert {"diffusion/samples", "autoencoder/recon"} <= set(tags["images"])
    # Training's evals at steps 2 and 4; `n2a eval` (other tests here) adds more at step 4.
    assert [e.step for e in events.Scalars("diffusion/eval/fd")][:2] == [2, 4]
    assert [e.step for e in events.Images("diffusion/samples")] == [2, 4]
