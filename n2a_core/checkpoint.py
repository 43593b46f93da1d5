"""Checkpoints that can be trusted: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``step-00001234/`` holding ``tensors.safetensors`` (model, EMA,
optimizer state and RNG states, as flat ``group/name`` keys) and ``state.json`` (step,
spec digest, data position, optimizer hyper-parameters, the tensors file's sha256). It is
written under a temporary name and renamed into place, and ``latest`` is replaced
atomically afterwards, so a crash mid-write never leaves a broken latest checkpoint; a
killed save leaves a hidden ``.step-*`` folder that `remove_partial_saves` clears at the
next start. Nothing is ever unpickled.

Reading validates ``state.json`` like a spec (`CheckpointState`) and checks the tensors
against their sha256; `load_latest_checkpoint` falls back past a damaged checkpoint to the
newest one that loads, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from n2a_core import strict_json
from n2a_core.autoencoder import Autoencoder
from n2a_core.errors import CheckpointError
from n2a_core.safe_files import remove_leftovers, temp_path, write_atomic

TENSORS, STATE = "tensors.safetensors", "state.json"
PARTIAL_PREFIX = ".step-"
"""Hidden folders a save writes before renaming them to ``step-*``."""
DAMAGED_PREFIX = "damaged-"
"""A resume moves a damaged checkpoint aside under this prefix (kept for inspection)."""

log = logging.getLogger("n2a.checkpoint")


# -- the metadata, validated --------------------------------------------------------------
class DataPosition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epoch: int = Field(ge=0)
    samples: int | None = Field(None, ge=0)
    """Samples of the epoch consumed by all ranks together."""
    batch: int | None = Field(None, ge=0)
    """Per-process batch index (checkpoints written before `samples`)."""

    @model_validator(mode="after")
    def _one_position(self) -> DataPosition:
        if self.samples is None and self.batch is None:
            raise ValueError("needs 'samples' (or the older 'batch')")
        return self


class CheckpointState(BaseModel):
    """What ``state.json`` must hold for a resume or for sampling. Unknown keys are kept
    (older checkpoints held their RNG state here)."""

    model_config = ConfigDict(extra="allow", strict=True)
    step: int = Field(ge=0)
    spec_digest: str
    stage: str
    optimizers: dict[str, dict[str, Any]]
    data: DataPosition
    stage_state: dict[str, Any] = {}
    world_size: int = Field(1, ge=1)
    ranks: list[dict[str, Any]] = []
    tensors_sha256: str | None = None
    """sha256 of tensors.safetensors (checkpoints written before it have none)."""
    spent_s: float = Field(0.0, ge=0)
    """Seconds the stage had trained, over all its processes (a time budget counts them)."""


def validate_state(path: Path, text: str) -> dict[str, Any]:
    """The parsed ``state.json`` at `path`, or CheckpointError naming the first bad field."""
    try:
        CheckpointState.model_validate_json(text)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "json_invalid":
            raise CheckpointError(f"{path}: not valid JSON ({error['msg']})") from None
        raise CheckpointError(f"{path}: {where or 'state'}: {error['msg']}") from None
    return json.loads(text)


# -- flat tensor dicts ------------------------------------------------------------------
def flatten(groups: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{'model': {'w': t}} -> {'model/w': t}, contiguous CPU copies (safetensors needs them)."""
    return {f"{g}/{k}": v.detach().to("cpu").contiguous().clone() for g, d in groups.items() for k, v in d.items()}


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        group, _, name = key.partition("/")
        groups.setdefault(group, {})[name] = value
    return groups


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as tensors (per-parameter state) and JSON (param groups)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


# -- RNG states --------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": _to_json(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    random.setstate(_from_json(meta["python"]))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))


def _to_json(value):
    return [_to_json(v) for v in value] if isinstance(value, tuple | list) else value


def _from_json(value):
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


# -- write / read ------------------------------------------------------------------------
def save_checkpoint(
    directory: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``directory/step-XXXXXXXX`` atomically, point ``latest`` at it, prune old ones."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{step:08d}-", dir=directory))
    try:
        save_file(flatten(tensors), str(tmp / TENSORS))
        digest = file_sha256(tmp / TENSORS)
        (tmp / STATE).write_text(strict_json.dumps({**state, "step": step, "tensors_sha256": digest}, indent=1))
        for f in (tmp / TENSORS, tmp / STATE):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(directory / "latest", final.name)
    for old in sorted(directory.glob("step-*"))[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def remove_partial_saves(directory: Path) -> list[Path]:
    """Delete what killed saves left in a checkpoint folder: hidden ``.step-*`` folders and
    temporary files. Only while no one else can be saving there (the run lock is held)."""
    removed = remove_leftovers(directory)
    for partial in directory.glob(f"{PARTIAL_PREFIX}*") if directory.is_dir() else ():
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
    return removed


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``latest`` points to, else the newest complete one, else None."""
    pointer = directory / "latest"
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if (candidate / STATE).is_file():
            return candidate
    complete = [p for p in sorted(directory.glob("step-*")) if (p / STATE).is_file()]
    return complete[-1] if complete else None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(tensor groups, state) of a checkpoint folder; CheckpointError naming the file (and
    field) if it is missing, corrupt or its metadata is incomplete."""
    path = Path(path)
    missing = [name for name in (TENSORS, STATE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint ({missing[0]} is missing)")
    try:
        text = (path / STATE).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / STATE}: unreadable ({_first_line(exc)})") from None
    state = validate_state(path / STATE, text)
    if state.get("tensors_sha256") and file_sha256(path / TENSORS) != state["tensors_sha256"]:
        raise CheckpointError(f"{path / TENSORS}: its bytes do not match the sha256 in {STATE} (damaged)")
    try:
        flat = load_file(str(path / TENSORS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path / TENSORS}: checkpoint is corrupt ({_first_line(exc)})") from None
    return unflatten(flat), state


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def load_latest_checkpoint(
    directory: Path, set_aside_damaged: bool = False,
) -> tuple[Path, dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
    """(path, tensor groups, state) of the newest checkpoint in `directory` that loads; None
    when there is none.

    A damaged newer one is skipped with a warning; `set_aside_damaged` (for the holder of
    the run lock, about to write) also renames it ``damaged-step-*`` so that no later save
    or resume trips over it again. When every checkpoint is damaged, the newest one's
    CheckpointError is raised.
    """
    candidates = sorted(directory.glob("step-*"), reverse=True) if directory.is_dir() else []
    damaged: list[tuple[Path, CheckpointError]] = []
    for path in candidates:
        try:
            tensors, state = load_checkpoint(path)
        except CheckpointError as exc:
            damaged.append((path, exc))
            continue
        for bad, exc in damaged:
            note = ""
            if set_aside_damaged:
                aside = _set_aside(bad)
                note = f" (moved to {aside.name})" if aside else ""
            log.warning("%s; using the older %s instead%s", exc, path.name, note)
        return path, tensors, state
    if damaged:
        older = "no older checkpoint loads either" if len(damaged) > 1 else "there is no older checkpoint"
        raise CheckpointError(f"{damaged[0][1]}; {older}: move {directory} away to train this stage "
                              "from the start") from None
    return None


def _set_aside(path: Path) -> Path | None:
    for n in range(1, 1000):
        aside = path.with_name(f"{DAMAGED_PREFIX}{path.name}" + (f"-{n}" if n > 1 else ""))
        if not aside.exists():
            try:
                os.replace(path, aside)
                return aside
            except OSError:
                return None
    return None


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One module's weights as a standalone safetensors file, written atomically."""
    tmp = temp_path(path)
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights file is corrupt ({str(exc).splitlines()[0]})") from None


def load_autoencoder_weights(model: Autoencoder, path: Path) -> None:
    """Load exported weights; a file of another architecture fails with one line."""
    state = load_weights(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit this autoencoder spec ({first}); "
                              "use the spec the weights were trained with") from None
