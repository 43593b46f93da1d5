"""Checkpoints that can be trusted: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``step-00001234/`` holding ``tensors.safetensors`` (model, EMA,
optimizer state and RNG states, as flat ``group/name`` keys) and ``state.json`` (step,
spec digest, data position, optimizer hyper-parameters). It is written under a temporary
name and renamed into place, and ``latest`` is replaced atomically afterwards, so a crash
mid-write never leaves a broken latest checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from n2a_core.autoencoder import Autoencoder
from n2a_core.errors import CheckpointError

TENSORS, STATE = "tensors.safetensors", "state.json"


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
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}-", dir=directory))
    try:
        save_file(flatten(tensors), str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1))
        for f in (tmp / TENSORS, tmp / STATE):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(directory / "latest", final.name)
    for old in sorted(directory.glob("step-*"))[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    """(tensor groups, state) of a checkpoint folder; CheckpointError if missing or corrupt."""
    path = Path(path)
    if not (path / TENSORS).is_file() or not (path / STATE).is_file():
        raise CheckpointError(f"{path}: not a checkpoint (expected {TENSORS} and {STATE} inside)")
    try:
        flat = load_file(str(path / TENSORS))
        state = json.loads((path / STATE).read_text())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: checkpoint is corrupt ({str(exc).splitlines()[0]}); delete it to fall back to an older one"
        ) from None
    return unflatten(flat), state


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One module's weights as a standalone safetensors file, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


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
