"""Locks, exclusive names, atomic writes, damaged checkpoints and the sample writer, without
training anything: what keeps concurrent processes and `kill -9` from costing files."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from n2a_core.checkpoint import (
    load_checkpoint,
    load_latest_checkpoint,
    remove_partial_saves,
    save_checkpoint,
)
from n2a_core.errors import CheckpointError, RunLockedError, SpecError
from n2a_core.generate import SampleWriter, new_samples_folder
from n2a_core.images import make_grid_image
from n2a_core.safe_files import RunLock, new_folder, write_atomic

# Other processes are forked: they start at once with everything imported (a fresh Python
# takes 15 s to import torch on a busy 2-core machine). POSIX only, like SIGKILL.
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL are POSIX")
fork = multiprocessing.get_context("fork")


def run_processes(target, *arg_lists) -> None:
    """Run target(*args) in one forked process per argument list, all at once; each must exit 0."""
    procs = [fork.Process(target=target, args=args) for args in arg_lists]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"a writer process failed (exit code {p.exitcode})"


# -- the run lock ---------------------------------------------------------------------------
def test_second_lock_on_a_run_folder_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run")
    first.acquire()
    try:
        with pytest.raises(RunLockedError) as refused:
            RunLock(tmp_path / "run").acquire()
        message = str(refused.value)
        assert f"process {os.getpid()} on " in message and "is training in this run folder" in message
        assert "\n" not in message
    finally:
        first.release()
    again = RunLock(tmp_path / "run")
    again.acquire()  # released: free again
    again.release()
    assert not (tmp_path / "run" / RunLock.NAME).exists()


def hold_lock(root: Path, ready) -> None:
    RunLock(root).acquire()
    ready.set()
    time.sleep(120)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    ready = fork.Event()
    holder = fork.Process(target=hold_lock, args=(tmp_path / "run", ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunLockedError, match=f"process {holder.pid} "):
            RunLock(tmp_path / "run").acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    assert (tmp_path / "run" / RunLock.NAME).exists()  # the file stays, the lock does not
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    lock.release()


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    lock = RunLock(tmp_path / "new")
    lock.acquire()
    lock.release()
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EACCES])
def test_a_folder_that_cannot_be_locked_warns_or_refuses_in_one_line(tmp_path, monkeypatch, caplog, code):
    import n2a_core.safe_files as safe_files

    def refuse(fd, blocking):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safe_files, "_try_lock", refuse)
    lock = RunLock(tmp_path / "run")
    if code == errno.ENOLCK:  # a filesystem without locks: train, but say so
        with caplog.at_level(logging.WARNING, logger="n2a.files"):
            lock.acquire()
        assert not lock.held and "cannot lock files" in caplog.text
    else:
        with pytest.raises(SpecError, match="cannot lock the run folder .*--out must be a folder you can write to"):
            lock.acquire()


# -- exclusive names and atomic writes --------------------------------------------------------
def make_folders(parent: Path, tag: str) -> None:
    names = [new_folder(parent, "same").name for _ in range(20)]
    (parent / f"{tag}.json").write_text(json.dumps(names))


def test_new_folder_never_hands_out_a_taken_name(tmp_path):
    run_processes(make_folders, *[(tmp_path, tag) for tag in "abc"])
    names = [name for tag in "abc" for name in json.loads((tmp_path / f"{tag}.json").read_text())]
    assert len(names) == 60 and len(set(names)) == 60
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(names)


def test_write_atomic_leaves_old_content_and_no_debris_when_it_fails(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    write_atomic(target, "step-1")

    def broken_replace(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomic(target, "step-2")
    monkeypatch.undo()
    assert target.read_text() == "step-1" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def write_many(path: Path, tag: str) -> None:
    for _ in range(200):
        write_atomic(path, tag * 1000)


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    run_processes(write_many, (tmp_path / "latest", "a"), (tmp_path / "latest", "b"))
    assert tmp_path.joinpath("latest").read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


# -- checkpoints: damage, fallback, leftovers ---------------------------------------------
def valid_state(**extra) -> dict:
    return {"spec_digest": "abc", "stage": "toy", "optimizers": {}, "data": {"epoch": 0, "samples": 8}, **extra}


def two_checkpoints(directory: Path) -> tuple[Path, Path]:
    old = save_checkpoint(directory, 2, {"m": {"w": torch.full((64,), 2.0)}}, valid_state())
    new = save_checkpoint(directory, 4, {"m": {"w": torch.full((64,), 4.0)}}, valid_state())
    return old, new


def flip_byte(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated tensors": lambda p: (p / "tensors.safetensors").write_bytes(
        (p / "tensors.safetensors").read_bytes()[:100]),
    "zero-byte tensors": lambda p: (p / "tensors.safetensors").write_bytes(b""),
    "flipped byte in the tensor data": lambda p: flip_byte(p / "tensors.safetensors", 0.9),
    "flipped byte in the header": lambda p: flip_byte(p / "tensors.safetensors", 0.01),
    "missing tensors": lambda p: (p / "tensors.safetensors").unlink(),
    "missing state": lambda p: (p / "state.json").unlink(),
    "zero-byte state": lambda p: (p / "state.json").write_bytes(b""),
    "bad JSON": lambda p: (p / "state.json").write_text('{"step": 4, '),
    "empty state {}": lambda p: (p / "state.json").write_text("{}"),
    "ill-typed step": lambda p: (p / "state.json").write_text(
        json.dumps({**json.loads((p / "state.json").read_text()), "step": "four"})),
    "binary state": lambda p: (p / "state.json").write_bytes(b"\xff\xfe\x00garbage"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    _, new = two_checkpoints(tmp_path)
    DAMAGE[damage](new)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(new)
    message = str(error.value)
    assert "\n" not in message and str(new) in message and "None" not in message


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage, caplog):
    old, new = two_checkpoints(tmp_path)
    DAMAGE[damage](new)
    with caplog.at_level(logging.WARNING, logger="n2a.checkpoint"):
        path, tensors, state = load_latest_checkpoint(tmp_path)
    assert path == old and state["step"] == 2 and torch.equal(tensors["m"]["w"], torch.full((64,), 2.0))
    assert any(str(new) in r.message and "using the older step-00000002" in r.message for r in caplog.records)
    assert new.exists()  # a reader leaves it where it is


def test_the_writer_sets_a_damaged_checkpoint_aside_and_saves_on(tmp_path, caplog):
    _, new = two_checkpoints(tmp_path)
    DAMAGE["empty state {}"](new)
    path, _, _ = load_latest_checkpoint(tmp_path, set_aside_damaged=True)
    assert path.name == "step-00000002" and (tmp_path / "damaged-step-00000004").is_dir()
    assert "moved to damaged-step-00000004" in caplog.text
    save_checkpoint(tmp_path, 3, {"m": {"w": torch.zeros(64)}}, valid_state())
    save_checkpoint(tmp_path, 4, {"m": {"w": torch.ones(64)}}, valid_state())
    assert load_latest_checkpoint(tmp_path)[0].name == "step-00000004"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]


def test_every_checkpoint_damaged_is_one_line(tmp_path):
    old, new = two_checkpoints(tmp_path)
    DAMAGE["bad JSON"](new)
    DAMAGE["zero-byte tensors"](old)
    with pytest.raises(CheckpointError) as error:
        load_latest_checkpoint(tmp_path, set_aside_damaged=True)
    assert "\n" not in str(error.value) and "no older checkpoint loads either" in str(error.value)
    assert new.exists() and old.exists()  # nothing moved when nothing loads


def test_partial_saves_are_removed(tmp_path):
    old, _ = two_checkpoints(tmp_path)
    (tmp_path / ".step-00000006-abc123").mkdir()
    (tmp_path / ".step-00000006-abc123" / "tensors.safetensors").write_bytes(b"partial")
    (tmp_path / ".latest.123-abcd.n2a-tmp").write_text("step-6")
    removed = remove_partial_saves(tmp_path)
    assert len(removed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000004"]


# -- samples: never overwritten, on disk as they come --------------------------------------
def records_for(seeds: list[int], condition: str = "") -> list[dict]:
    return [{"index": i, "seed": s, "condition": condition} for i, s in enumerate(seeds)]


def check_sample_folder(folder: Path, expected_images: int) -> list[dict]:
    """Every PNG has exactly one record, every record its PNG, whose metadata it repeats."""
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    pngs = sorted(p.name for p in folder.glob("[0-9]*.png"))
    assert len(pngs) == expected_images == len(records)
    assert sorted(r["file"] for r in records) == pngs
    for record in records:
        meta = json.loads(Image.open(folder / record["file"]).text["n2a"])
        assert meta == {k: v for k, v in record.items() if k != "file"}
    return records


def test_sample_writers_into_one_folder_keep_every_file(tmp_path):
    first = SampleWriter(tmp_path, records_for([7, 8]))
    first(torch.zeros(2, 3, 8, 8))
    second = SampleWriter(tmp_path, records_for([7, 8], "again"))  # the same seeds, the same folder
    second(torch.ones(2, 3, 8, 8))
    assert first.files == ["0000-seed7.png", "0001-seed8.png"]
    assert second.files == ["0002-seed7.png", "0003-seed8.png"]
    grids = [first.write_grid(torch.zeros(2, 3, 8, 8)), second.write_grid(torch.ones(2, 3, 8, 8))]
    assert [g.name for g in grids] == ["grid.png", "grid-2.png"]
    check_sample_folder(tmp_path, 4)


def write_twelve(folder: Path, tag: str) -> None:
    writer = SampleWriter(folder, records_for(list(range(12)), tag))
    for start in range(0, 12, 3):
        writer(torch.rand(3, 3, 8, 8) * 2 - 1, start)
    writer.write_grid(torch.zeros(12, 3, 8, 8))


def test_concurrent_sample_writers_share_a_folder(tmp_path):
    run_processes(write_twelve, *[(tmp_path, tag) for tag in "abc"])
    records = check_sample_folder(tmp_path, 36)
    numbers = sorted(int(r["file"].split("-")[0]) for r in records)
    assert numbers == list(range(36))
    assert sorted(p.name for p in tmp_path.glob("grid*.png")) == ["grid-2.png", "grid-3.png", "grid.png"]


def test_default_sample_folders_are_never_shared(tmp_path):
    folders = {new_samples_folder(tmp_path) for _ in range(5)}  # within one second
    assert len(folders) == 5 and all(f.is_dir() and not any(f.iterdir()) for f in folders)


def test_images_are_on_disk_before_the_grid_fails(tmp_path, monkeypatch):
    import n2a_core.generate as generate

    writer = SampleWriter(tmp_path, records_for([1, 2, 3]))
    writer(torch.zeros(2, 3, 8, 8), 0)
    writer(torch.zeros(1, 3, 8, 8), 2)

    def broken(*args, **kwargs):
        raise RuntimeError("grid failed")

    monkeypatch.setattr(generate, "make_grid_image", broken)
    with pytest.raises(RuntimeError):
        writer.write_grid(torch.zeros(3, 3, 8, 8))
    check_sample_folder(tmp_path, 3)
    assert not list(tmp_path.glob("grid*"))


@pytest.mark.parametrize("caption", [
    "a red apple\non a table\n\nwith a\ttab", "x" * 50_000, "日本語のプロンプト", "🍎🔥 emoji only 🎨",
    "\u200b\u0000control\u202echars", "   ",
])
def test_any_caption_renders_in_a_grid(caption):
    start = time.perf_counter()
    sheet = make_grid_image(torch.zeros(2, 3, 16, 16), captions=[caption, "short"])
    assert sheet.size[0] > 32 and time.perf_counter() - start < 5
