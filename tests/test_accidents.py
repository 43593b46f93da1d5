"""Accidents on a shared machine, end to end: `kill -9` at any moment, two trainers on one
run folder, two samplers into one folder, damaged checkpoints. None may cost a file, a
step of training or a traceback.

Other processes are forked from the test process (they start at once, with everything
imported) and run the CLI in-process; POSIX only, like SIGKILL.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_end_to_end import invoke, sets
from test_safe_files import DAMAGE, check_sample_folder

from n2a_core.checkpoint import latest_checkpoint, load_checkpoint
from n2a_core.components import RunDir
from n2a_core.errors import RunLockedError
from n2a_core.safe_files import RunLock
from n2a_core.training.run import lock_run_folder

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL are POSIX")
fork = multiprocessing.get_context("fork")

UNCONDITIONAL = ("--conditioner", "none", "--sampler", "ddim")


def cli_in_child(*args: str) -> None:
    """The body of a forked process: one CLI command, its exit code as the process's."""
    result = invoke(*args)
    os._exit(result.exit_code)


def start(*args: str) -> multiprocessing.Process:
    process = fork.Process(target=cli_in_child, args=args)
    process.start()
    return process


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """An unconditional run with stage-2 checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("accidents") / "run"
    result = invoke("train", *UNCONDITIONAL, "--out", str(out), *sets())
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "diffusion" / "checkpoints").glob("step-*")) == [
        "step-00000002", "step-00000004"]
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("✗")]
    assert len(lines) == 1, result.output
    return lines[0]


# -- --resume without a run ------------------------------------------------------------------
def test_resume_of_a_folder_without_a_run_refuses(tmp_path):
    missing = tmp_path / "never-trained"
    line = one_line_error(invoke("train", *UNCONDITIONAL, "--resume", "--out", str(missing), *sets()))
    assert "holds no run" in line and "drop --resume" in line
    assert not missing.exists()  # nothing was created
    (tmp_path / "empty").mkdir()
    line = one_line_error(invoke("train", *UNCONDITIONAL, "--resume", "--out", str(tmp_path / "empty"), *sets()))
    assert "holds no run" in line and not any((tmp_path / "empty").iterdir())


# -- damaged checkpoints ------------------------------------------------------------------
FAST_DAMAGE = ("empty state {}", "flipped byte in the tensor data", "missing tensors")


@pytest.mark.parametrize("damage", [
    pytest.param(kind, marks=() if kind in FAST_DAMAGE else pytest.mark.slow) for kind in DAMAGE])
def test_damaged_newest_checkpoint_sample_and_resume_fall_back(tiny_run, tmp_path, damage, caplog):
    run = copy_of(tiny_run, tmp_path)
    newest = run / "diffusion" / "checkpoints" / "step-00000004"
    DAMAGE[damage](newest)
    with caplog.at_level(logging.WARNING, logger="n2a.checkpoint"):
        sampled = invoke("sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s"))
    assert sampled.exit_code == 0, sampled.output
    assert "using the older step-00000002" in caplog.text
    records = check_sample_folder(tmp_path / "s", 2)
    assert {r["step"] for r in records} == {2}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="n2a.checkpoint"):
        resumed = invoke("train", "--resume", "--out", str(run), *UNCONDITIONAL, *sets())
    assert resumed.exit_code == 0, resumed.output
    assert "moved to damaged-step-00000004" in caplog.text
    _, state = load_checkpoint(latest_checkpoint(run / "diffusion" / "checkpoints"))
    assert state["step"] == 4 and (run / "diffusion" / "checkpoints" / "damaged-step-00000004").is_dir()


def test_no_loadable_checkpoint_is_one_line_for_sample_and_resume(tiny_run, tmp_path):
    run = copy_of(tiny_run, tmp_path)
    for step, damage in ((4, "empty state {}"), (2, "truncated tensors")):
        DAMAGE[damage](run / "diffusion" / "checkpoints" / f"step-{step:08d}")
    for args in (("sample", str(run), "--n", "1"), ("train", "--resume", "--out", str(run), *UNCONDITIONAL, *sets())):
        line = one_line_error(invoke(*args))
        assert "step-00000004/state.json: step: Field required" in line and "no older checkpoint" in line
        assert "None" not in line


def test_checkpoint_of_another_spec_keeps_its_clear_message(tiny_run, tmp_path):
    run = copy_of(tiny_run, tmp_path)
    state_file = run / "diffusion" / "checkpoints" / "step-00000004" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "spec_digest": "0123abcd"}))
    line = one_line_error(invoke("train", "--resume", "--out", str(run), *UNCONDITIONAL, *sets()))
    assert "made by a different spec (digest 0123abcd" in line


# -- two processes, one folder --------------------------------------------------------------
def test_a_second_trainer_on_a_run_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = start("train", *UNCONDITIONAL, "--out", str(out), *sets("training.max_steps=8"))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and f'"pid": {first.pid}' not in _read(out / RunLock.NAME):
            time.sleep(0.05)
        line = one_line_error(invoke("train", *UNCONDITIONAL, "--out", str(out), *sets()))
        assert f"process {first.pid} on " in line and "is training in this run folder" in line
        line = one_line_error(invoke("train", *UNCONDITIONAL, "--resume", "--out", str(out), *sets()))
        assert f"process {first.pid} on " in line
    finally:
        first.join(600)
    assert first.exitcode == 0  # the first trainer never noticed
    logged = [json.loads(line)["step"] for line in (out / "diffusion" / "metrics.jsonl").read_text().splitlines()
              if "loss/model" in line]
    assert logged == sorted(set(logged)) and logged[-1] == 8
    assert not (out / RunLock.NAME).exists()  # released at the end


def _lock_two_folders(rank: int, port: int, held: str, free: str, results) -> None:
    from test_distributed import join_job

    d = join_job(rank, 2, port)
    try:
        lock_run_folder(RunDir(held), d, resume=False)
        results.put((rank, "held", "not refused"))
    except RunLockedError as exc:
        results.put((rank, "held", str(exc)))
    lock = lock_run_folder(RunDir(free), d, resume=False)
    results.put((rank, "free", "holds the lock" if lock is not None and lock.held else "no lock"))
    d.barrier()
    # os._exit skips the queue's feeder thread: flush it first, or the parent may never see the results
    results.close()
    results.join_thread()
    os._exit(0)


def test_under_torch_distributed_rank_zero_holds_the_lock_and_every_rank_obeys_it(tmp_path):
    from test_distributed import free_port

    holder = RunLock(tmp_path / "held")
    holder.acquire()
    try:
        results, port = fork.Queue(), free_port()
        workers = [fork.Process(target=_lock_two_folders,
                                args=(r, port, str(tmp_path / "held"), str(tmp_path / "free"), results))
                   for r in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
            assert w.exitcode == 0
    finally:
        holder.release()
    got = {(rank, folder): text for rank, folder, text in (results.get(timeout=5) for _ in range(4))}
    assert got[0, "held"].startswith(f"{tmp_path / 'held'}: process {os.getpid()} on ")
    assert got[1, "held"].startswith(f"rank 1: {tmp_path / 'held'}: process {os.getpid()} on ")
    assert got[0, "free"] == "holds the lock" and got[1, "free"] == "no lock"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_samplers_sharing_a_folder_or_a_second_never_overwrite(tiny_run, tmp_path):
    shared = tmp_path / "shared"
    args = ("sample", str(tiny_run), "--n", "3", "--steps", "2", "--seed", "7")
    samplers = [start(*args, "--out", str(shared)) for _ in range(2)] + [start(*args) for _ in range(2)]
    for sampler in samplers:
        sampler.join(300)
        assert sampler.exitcode == 0
    check_sample_folder(shared, 6)  # the same seeds twice: six files, six records
    assert sorted(p.name for p in shared.glob("grid*.png")) == ["grid-2.png", "grid.png"]
    own = [p for p in (tiny_run / "samples").iterdir() if p.name != "final"]
    assert len(own) == 2  # each default call got its own folder, even within one second
    for folder in own:
        check_sample_folder(folder, 3)


# -- kill -9 at random moments -----------------------------------------------------------
KILL_SPEC = ("autoencoder_training.max_steps=6", "autoencoder_training.checkpoint_every=1",
             "training.max_steps=6", "training.checkpoint_every=1")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, state = load_checkpoint(latest_checkpoint(run / "diffusion" / "checkpoints"))
    assert state["step"] == 6
    weights = {f"ae/{k}": v for k, v in load_file(run / "autoencoder" / "weights.safetensors").items()}
    for group in ("module.model", "stage.ema"):
        weights.update({f"{group}/{k}": v for k, v in tensors[group].items()})
    return weights


def start_and_wait_for_set_up(out: Path, *args: str) -> tuple[multiprocessing.Process, float]:
    """Start `n2a train --out out ...`; return it once it has (re)written out/spec.yaml, that
    is once it has read the data, built the models and begins to train, with the seconds
    that took."""
    started, started_ns = time.monotonic(), time.time_ns()
    trainer = start("train", "--out", str(out), *args)
    spec = out / "spec.yaml"
    while trainer.is_alive() and not (spec.is_file() and spec.stat().st_mtime_ns >= started_ns):
        time.sleep(0.005)
    return trainer, time.monotonic() - started


@pytest.mark.slow
def test_runs_killed_at_random_moments_resume_to_the_same_weights(tmp_path):
    args = (*UNCONDITIONAL, *sets(*KILL_SPEC))
    started = time.monotonic()
    straight, set_up_s = start_and_wait_for_set_up(tmp_path / "straight", *args)
    straight.join(900)
    assert straight.exitcode == 0
    training_s = time.monotonic() - started - set_up_s

    run, rng, kills = tmp_path / "killed", random.Random(13), 0
    for _attempt in range(20):
        resume = ("--resume",) if (run / "spec.yaml").is_file() else ()
        trainer, _ = start_and_wait_for_set_up(run, *resume, *args)
        if kills < 5:
            # Timed from the set-up's end: it takes longer than this tiny training, and
            # differently long on each machine.
            trainer.join(rng.uniform(0.0, 0.35) * training_s)  # each resume has less left to do
            if trainer.is_alive():
                os.kill(trainer.pid, signal.SIGKILL)
                kills += 1
        trainer.join(900)
        print(f"attempt {_attempt}: exit code {trainer.exitcode}; saved so far:",
              sorted(str(p.relative_to(run)) for p in run.glob("*/checkpoints/*step-*")))
        if trainer.exitcode == 0:
            break
        assert trainer.exitcode == -signal.SIGKILL, f"attempt {_attempt} failed with exit code {trainer.exitcode}"
    assert kills >= 3, "the run ended before it could be killed often enough; kill sooner"
    assert_resumed_like_straight(tmp_path / "straight", run)


@pytest.mark.slow
def test_a_run_killed_between_its_stages_resumes_to_the_same_weights(tmp_path):
    """Stage 2 then starts in a process that never ran stage 1: its random streams (flips of
    the latent cache, dropout) must not depend on what stage 1 drew before them."""
    args = (*UNCONDITIONAL, *sets(*KILL_SPEC))
    straight = start("train", "--out", str(tmp_path / "straight"), *args)
    run = tmp_path / "killed"
    trainer = start("train", "--out", str(run), *args)
    while trainer.is_alive() and not (run / "autoencoder" / "weights.safetensors").is_file():
        time.sleep(0.002)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.join(60)
    assert trainer.exitcode == -signal.SIGKILL
    assert latest_checkpoint(run / "diffusion" / "checkpoints") is None, "stage 2 had saved already; kill sooner"
    resumed = start("train", "--out", str(run), "--resume", *args)
    for process in (straight, resumed):
        process.join(900)
        assert process.exitcode == 0
    assert_resumed_like_straight(tmp_path / "straight", run)


def assert_resumed_like_straight(straight: Path, run: Path) -> None:
    expected, got = final_weights(straight), final_weights(run)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert not list(run.rglob(".step-*")) and not list(run.rglob("*.n2a-tmp"))
    for stage in ("autoencoder", "diffusion"):  # the same losses, each step once, no line cut short
        assert losses(run / stage / "metrics.jsonl") == losses(straight / stage / "metrics.jsonl")


def losses(path: Path) -> list[dict]:
    """The training records of a metrics.jsonl without their timings. (Not the evaluation at
    the end: a kill between the last checkpoint and that record loses it.)"""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("steps_per_s", "elapsed_s")}
            for r in records if any(k.startswith("loss/") for k in r)]
