"""The one training loop both stages run: optimizers, accumulation, precision, logging,
checkpoints and exact resume. A stage (autoencoder or diffusion) supplies its losses.

Exact resume: every source of randomness is either a generator whose state is saved (the
stage's own noise generator, torch's global RNG used by dropout, Python and NumPy RNGs)
or a function of the seed and the data position (the shuffling order of each epoch). On
CPU a run stopped at step N and resumed reaches the same weights at step M as a run that
never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from n2a_core.checkpoint import (
    latest_checkpoint, load_checkpoint, optimizer_from_flat, optimizer_to_flat, rng_state,
    save_checkpoint, set_rng_state,
)
from n2a_core.data import report_skipped
from n2a_core.errors import CheckpointError, DataError
from n2a_core.specs import OptimSpec


# -- learning rate ------------------------------------------------------------------------
def lr_factor(step: int, spec: OptimSpec) -> float:
    """Linear warm-up to 1, then constant / cosine / linear decay to 0.1 at max_steps."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.lr_decay == "constant":
        return 1.0
    span = max(1, spec.max_steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    if spec.lr_decay == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - 0.9 * progress


@dataclass
class OptimizerSlot:
    """One optimizer, the parameters it owns and its peak learning rate."""

    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    lr: float
    grad_clip: float | None = None


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float, betas=(0.9, 0.999),
          grad_clip: float | None = None) -> OptimizerSlot:
    """AdamW on `params` (fused/foreach kernels where torch has them for the device)."""
    device_type = params[0].device.type if params else "cpu"
    kwargs: dict[str, Any] = {"fused": True} if device_type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, **kwargs)
    return OptimizerSlot(optimizer, params, lr, grad_clip)


# -- the stage interface ------------------------------------------------------------------
class Stage(ABC):
    """What the loop needs from a stage of training."""

    name: str

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Modules whose state is checkpointed (trainable ones and anything they need)."""

    @abstractmethod
    def optimizers(self) -> dict[str, OptimizerSlot]:
        """Named optimizers; `losses` returns one loss per name."""

    @abstractmethod
    def losses(self, batch: Any, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One micro-batch: a loss per optimizer and float logs."""

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (EMA updates live here)."""

    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Extra tensors and JSON to checkpoint (EMA, generators)."""
        return {}, {}

    def load_state(self, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        """Restore what `state` returned."""

    def periodic(self, step: int, final: bool) -> dict[str, float]:
        """Sample grids and validation when due: called after every step and at the end."""
        return {}


# -- data with a position ------------------------------------------------------------------
class BatchStream:
    """Endless batches in a seeded order that can restart from a saved position.

    Map-style datasets are shuffled per epoch with a generator seeded by (seed, epoch) and
    sharded by rank; streamed datasets are read in order and skip what was consumed.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, collate: Callable | None = None,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.collate, self.num_workers = collate, num_workers
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batch_index = 0, 0
        self.streamed = isinstance(dataset, IterableDataset)
        if not self.streamed and len(dataset) < batch_size * world_size:
            raise DataError(
                f"the training split has {len(dataset)} samples, fewer than one global batch of "
                f"{batch_size * world_size}; lower the batch size or add data")

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch_index}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.batch_index = position["epoch"], position["batch"]

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's sample indices for `epoch` (whole batches only, same count per rank)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        per_rank = len(order) // self.world_size // self.batch_size * self.batch_size
        return order[self.rank::self.world_size][:per_rank]

    def _loader(self, indices: list[int] | None) -> DataLoader:
        # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG,
        # which would make a resumed run diverge from an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 104729 + self.rank)
        if indices is None:
            dataset = self.dataset
            if self.batch_index and hasattr(dataset, "skip"):
                dataset = dataset.skip(self.batch_index * self.batch_size)
            return DataLoader(dataset, batch_size=self.batch_size, collate_fn=self.collate,
                              num_workers=self.num_workers, generator=generator)
        subset = torch.utils.data.Subset(self.dataset, indices)
        return DataLoader(subset, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers, drop_last=True,
                          generator=generator, pin_memory=torch.cuda.is_available())

    def __iter__(self) -> Iterator[Any]:
        while True:
            if self.streamed:
                loader = self._loader(None)
            else:
                order = self.epoch_order(self.epoch)
                loader = self._loader(order[self.batch_index * self.batch_size:])
            for batch in loader:
                self.batch_index += 1
                yield batch
            if self.streamed and self.batch_index == 0:
                raise DataError("the streamed training split yielded no batch; check the data source")
            report_skipped(self.dataset, f"epoch {self.epoch}")
            self.epoch, self.batch_index = self.epoch + 1, 0


# -- precision -----------------------------------------------------------------------------
def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- the loop ---------------------------------------------------------------------------
class TrainingLoop:
    """Runs a Stage for `spec.max_steps` optimizer steps with checkpoints under `out_dir`.

    Writes ``out_dir/metrics.jsonl`` (one JSON object per logged step) and
    ``out_dir/checkpoints/step-*/``.
    """

    def __init__(self, stage: Stage, spec: OptimSpec, stream: BatchStream, out_dir: Path, *,
                 device: torch.device, spec_digest: str, is_main: bool = True,
                 progress: Callable[..., Any] | None = None, sync: Callable[[], None] | None = None):
        self.stage, self.spec, self.stream, self.out_dir = stage, spec, stream, Path(out_dir)
        self.device, self.spec_digest, self.is_main = device, spec_digest, is_main
        self.progress = progress
        self.sync = sync or (lambda: None)
        self.dtype = autocast_dtype(spec.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.step = 0
        self.checkpoint_dir = self.out_dir / "checkpoints"

    # checkpointing ---------------------------------------------------------------------
    def save(self) -> Path | None:
        tensors: dict[str, dict[str, torch.Tensor]] = {
            f"module.{name}": module.state_dict() for name, module in self.stage.modules().items()
        }
        optim_meta = {}
        for name, slot in self.stage.optimizers().items():
            tensors[f"optim.{name}"], optim_meta[name] = optimizer_to_flat(slot.optimizer)
        rng_tensors, rng_meta = rng_state()
        tensors["rng"] = rng_tensors
        stage_tensors, stage_meta = self.stage.state()
        tensors.update({f"stage.{k}": v for k, v in stage_tensors.items()})
        state = {"spec_digest": self.spec_digest, "stage": self.stage.name, "optimizers": optim_meta,
                 "rng": rng_meta, "data": self.stream.position, "stage_state": stage_meta}
        path = None
        if self.is_main:
            path = save_checkpoint(self.checkpoint_dir, self.step, tensors, state, self.spec.keep_last)
        self.sync()
        return path

    def resume(self, path: Path | None = None) -> bool:
        """Load the latest (or the given) checkpoint; False when there is none."""
        path = path or latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return False
        tensors, state = load_checkpoint(path)
        if state.get("stage") != self.stage.name or state.get("spec_digest") != self.spec_digest:
            raise CheckpointError(
                f"{path}: checkpoint was made by a different spec (digest {state.get('spec_digest')}, "
                f"this run {self.spec_digest}); resume with the run's own spec.yaml or start a new --out"
            )
        for name, module in self.stage.modules().items():
            module.load_state_dict(tensors[f"module.{name}"])
        for name, slot in self.stage.optimizers().items():
            optimizer_from_flat(slot.optimizer, tensors.get(f"optim.{name}", {}), state["optimizers"][name])
        self.stage.load_state({k[len("stage."):]: v for k, v in tensors.items() if k.startswith("stage.")},
                              state["stage_state"])
        set_rng_state(tensors["rng"], state["rng"])
        self.stream.restore(state["data"])
        self.step = int(state["step"])
        return True

    # one optimizer step ------------------------------------------------------------------
    def train_step(self, batches: Iterator[Any]) -> dict[str, float]:
        slots = self.stage.optimizers()
        for slot in slots.values():
            for group in slot.optimizer.param_groups:
                group["lr"] = slot.lr * lr_factor(self.step, self.spec)
            slot.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for _ in range(self.spec.grad_accum):
            batch = next(batches)
            with autocast(self.device, self.dtype):
                losses, micro_logs = self.stage.losses(batch, self.step)
            for name, loss in losses.items():
                if loss is None:
                    continue
                scaled = loss / self.spec.grad_accum
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                # Each loss reaches only its own optimizer's parameters (a GAN generator
                # loss must not leave gradients on the discriminator).
                scaled.backward(inputs=slots[name].params)
                logs[f"loss/{name}"] = logs.get(f"loss/{name}", 0.0) + float(loss.detach()) / self.spec.grad_accum
            for k, v in micro_logs.items():
                logs[k] = logs.get(k, 0.0) + v / self.spec.grad_accum
        for name, slot in slots.items():
            if all(p.grad is None for p in slot.params):
                continue
            if self.scaler is not None:
                self.scaler.unscale_(slot.optimizer)
            clip = slot.grad_clip if slot.grad_clip is not None else self.spec.grad_clip
            if clip is not None:
                logs[f"grad_norm/{name}"] = float(torch.nn.utils.clip_grad_norm_(slot.params, clip))
            if self.scaler is not None:
                self.scaler.step(slot.optimizer)
            else:
                slot.optimizer.step()
            logs[f"lr/{name}"] = slot.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.update()
        self.step += 1
        self.stage.after_step(self.step)
        return logs

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def run(self, max_steps: int | None = None) -> int:
        """Train until `max_steps` (default spec.max_steps); checkpoint on the way and at the end.

        An interrupt (Ctrl-C) saves a checkpoint before leaving, so no work is lost.
        """
        max_steps = max_steps or self.spec.max_steps
        batches = iter(self.stream)
        start_step, t0, window = self.step, time.perf_counter(), time.perf_counter()
        try:
            while self.step < max_steps:
                logs = self.train_step(batches)
                if self.progress:
                    self.progress(self.step, max_steps, logs)
                if self.step % self.spec.log_every == 0 or self.step == max_steps:
                    now = time.perf_counter()
                    steps_done = self.spec.log_every if self.step % self.spec.log_every == 0 else 1
                    self.log({"step": self.step, **logs, "steps_per_s": steps_done / max(now - window, 1e-9),
                              "elapsed_s": now - t0})
                    window = now
                if self.step != max_steps:
                    periodic = self.periodic(final=False)
                    if periodic:
                        self.log({"step": self.step, **periodic})
                if self.step % self.spec.checkpoint_every == 0 and self.step != max_steps:
                    self.save()
        except KeyboardInterrupt:
            if self.step > start_step:
                self.save()
            raise
        self.save()
        self.log({"step": self.step, **self.periodic(final=True)})
        return self.step

    def periodic(self, final: bool) -> dict[str, float]:
        """The stage's evaluation, isolated from the training RNG streams: whether or not a
        grid is drawn must not change what training does next (exact resume relies on it)."""
        tensors, meta = rng_state()
        try:
            return self.stage.periodic(self.step, final)
        finally:
            set_rng_state(tensors, meta)
