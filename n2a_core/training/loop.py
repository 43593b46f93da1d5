"""The one training loop both stages run: optimizers, accumulation, precision, logging,
checkpoints and exact resume. A stage (autoencoder or diffusion) supplies its losses.

Exact resume: every source of randomness is either a generator whose state is saved (the
stage's own noise generator, torch's global RNG used by dropout, Python and NumPy RNGs)
or a function of the seed and the data position (the shuffling order of each epoch). A
stage that starts from no checkpoint seeds the global RNGs afresh, so that it draws the same
whether stage 1 ran in the same process or in one that was stopped before. On CPU a run
stopped at step N and resumed reaches the same weights at step M as a run that never
stopped.

Several processes (n2a_core.training.distributed): every rank's generator states are saved, so a
resume on the same number of processes is exact too. The data position is counted in
samples of the global, seeded order of an epoch, so a run also resumes on a different
number of processes: it then sees the same samples in the same optimizer steps and reaches
the same weights up to float rounding of the gradient average, but ranks without a saved
state draw fresh noise (seeded from the run seed, their rank and the step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from n2a_core.checkpoint import (
    load_checkpoint,
    load_latest_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from n2a_core.errors import CheckpointError
from n2a_core.safe_files import write_atomic
from n2a_core.specs import OptimSpec
from n2a_core.tracking import JsonlTracker, Trackers
from n2a_core.training.batching import BatchStream
from n2a_core.training.distributed import SINGLE, Dist, peer_failures, rank_seed

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed torch's, Python's and NumPy's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    ddp: bool = False
    """The gradients are averaged over processes by DistributedDataParallel during backward;
    otherwise (several processes) the loop averages them before clipping."""


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float, betas=(0.9, 0.999),
          grad_clip: float | None = None) -> OptimizerSlot:
    """AdamW on `params` (fused/foreach kernels where torch has them for the device)."""
    device_type = params[0].device.type if params else "cpu"
    # Fused kernels exist for CPU and CUDA; on the CPU the step took 10 ms instead of 31-35 ms (R64 UNet).
    kwargs: dict[str, Any] = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
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
    def losses(self, batch: Any, step: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One micro-batch: a loss per optimizer and float logs. `step` is where schedules
        stand: the step, or with a time budget a fractional position (see the loop's
        `schedule_position`)."""

    def after_step(self, step: float) -> None:
        """Called after every optimizer step (EMA updates live here); `step` as in `losses`."""

    def state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Extra tensors and JSON to checkpoint, as rank 0 holds them (the EMA); generators
        that differ between processes belong in `rank_state`."""
        return {}, {}

    def load_state(self, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
        """Restore what `state` returned."""

    def rank_state(self) -> dict[str, torch.Tensor]:
        """Tensors that differ between processes (noise generators); saved for every rank,
        while `state` is rank 0's alone."""
        return {}

    def load_rank_state(self, tensors: dict[str, torch.Tensor] | None, seed: int) -> None:
        """Restore `rank_state`; None when the checkpoint holds none for this rank (it was
        written by fewer processes): start this rank's streams from `seed` instead."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Where a stage trains through DistributedDataParallel: its `no_sync()`, so that
        micro-steps before the last of an accumulation keep their gradients local."""
        return contextlib.nullcontext()

    def periodic(self, step: int, final: bool) -> dict[str, float]:
        """Sample grids and validation when due: called after every step and at the end."""
        return {}


def host_values(logs: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """The logs as Python floats, with one device-to-host copy for all tensor values."""
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(logs)
    values = torch.stack([logs[k].float().reshape(()) for k in keys]).tolist()
    return {**logs, **dict(zip(keys, values, strict=True))}


def trim_log(path: Path, step: int) -> None:
    """Keep a resumed run's log as one run would have written it: drop the records a killed
    process wrote after `step` (the resumed run logs those steps again) and a line the kill
    cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


# -- precision -----------------------------------------------------------------------------
CPUINFO = Path("/proc/cpuinfo")


def cpu_has_native_bf16(cpuinfo: Path | None = None) -> bool:
    """Whether the CPU computes in bf16 natively (x86 AVX-512 BF16 or AMX). Only there does
    bf16 autocast pay: 1.35-1.56x faster steps on such an AMD EPYC, and 17x *slower* on one
    with AVX2 only, where oneDNN emulates it (docs/quality.md, benchmarks/precision.py)."""
    try:
        text = (cpuinfo or CPUINFO).read_text(errors="replace")
    except OSError:  # not Linux, or no /proc: assume the slow path
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
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

    Hands its logs to `trackers` (by default only ``out_dir/metrics.jsonl``, one JSON
    object per logged step) and writes
    ``out_dir/checkpoints/step-*/``. With several processes (`dist`), every rank runs the
    loop; rank 0 alone logs, evaluates and writes, and the others wait for its checkpoints.
    """

    def __init__(self, stage: Stage, spec: OptimSpec, stream: BatchStream, out_dir: Path, *,
                 device: torch.device, spec_digest: str, earlier_digests: tuple[str, ...] = (),
                 progress: Callable[..., Any] | None = None, dist: Dist = SINGLE,
                 trackers: Trackers | None = None):
        self.stage, self.spec, self.stream, self.out_dir = stage, spec, stream, Path(out_dir)
        # What is logged goes to the run's trackers; alone, the loop keeps out_dir/metrics.jsonl.
        self.trackers = trackers or Trackers([JsonlTracker(self.out_dir, per_stage=False)])
        self.device, self.spec_digest, self.dist, self.progress = device, spec_digest, dist, progress
        self.earlier_digests = earlier_digests
        """The same spec's digests under an earlier n2a: checkpoints carrying them resume."""
        self.dtype = autocast_dtype(spec.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.step = 0
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.clock: Callable[[], float] = time.perf_counter
        """Seconds (replaceable by a fake clock in tests)."""
        self.budget_s: float | None = None
        """Train for this many seconds instead of to max_steps; the schedules then follow the
        fraction of it used (see `schedule_position`)."""
        self.spent_before = 0.0
        """Seconds this stage trained before this process (from the checkpoint)."""
        self._started: float | None = None

    # checkpointing ---------------------------------------------------------------------
    def rank_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This process's random streams: global RNGs and the stage's own generators."""
        rng_tensors, rng_meta = rng_state()
        tensors = {f"rng.{k}": v for k, v in rng_tensors.items()}
        tensors.update({f"stage.{k}": v for k, v in self.stage.rank_state().items()})
        return tensors, {"rng": rng_meta}

    def save(self) -> Path | None:
        per_rank = self.dist.all_gather_object(self.rank_state())
        path = None
        if self.dist.is_main:
            tensors: dict[str, dict[str, torch.Tensor]] = {
                f"module.{name}": module.state_dict() for name, module in self.stage.modules().items()
            }
            optim_meta = {}
            for name, slot in self.stage.optimizers().items():
                tensors[f"optim.{name}"], optim_meta[name] = optimizer_to_flat(slot.optimizer)
            stage_tensors, stage_meta = self.stage.state()
            tensors.update({f"stage.{k}": v for k, v in stage_tensors.items()})
            for rank, (rank_tensors, _) in enumerate(per_rank):
                tensors[f"rank{rank}"] = rank_tensors
            state = {"spec_digest": self.spec_digest, "stage": self.stage.name, "optimizers": optim_meta,
                     "world_size": self.dist.world_size, "ranks": [meta for _, meta in per_rank],
                     "data": self.stream.position, "stage_state": stage_meta, "spent_s": self.spent_s()}
            path = save_checkpoint(self.checkpoint_dir, self.step, tensors, state, self.spec.keep_last)
        self.dist.barrier()
        return path

    def resume(self, path: Path | None = None) -> bool:
        """Load the given checkpoint, else the newest one that loads (a damaged newer one is
        skipped with a warning, and set aside by rank 0); False when there is none, after
        seeding this process's global RNGs from the run seed and its rank."""
        found = None
        if path is None and self.dist.is_main:
            found = load_latest_checkpoint(self.checkpoint_dir, set_aside_damaged=True)
            path = found[0] if found else None
        if self.dist.active:
            # Rank 0 decides, so that every rank resumes from the same step.
            chosen = self.dist.broadcast_object(None if path is None else str(path))
            if chosen is not None and not (Path(chosen) / "state.json").is_file():
                raise CheckpointError(f"rank {self.dist.rank}: cannot see rank 0's checkpoint {chosen}; the run "
                                      "folder (--out) must be on a filesystem every node shares")
            path = None if chosen is None else Path(chosen)
        if path is None:
            seed_everything(rank_seed(self.stream.seed, self.dist.rank))
            return False
        tensors, state = found[1:] if found else load_checkpoint(path)
        if state.get("stage") != self.stage.name or state.get("spec_digest") not in (self.spec_digest,
                                                                                   *self.earlier_digests):
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
        self.step = int(state["step"])
        self.spent_before = float(state.get("spent_s", 0.0))
        if self.dist.is_main:
            trim_log(self.out_dir / "metrics.jsonl", self.step)
        self._load_rank_state(tensors, state)
        self.stream.restore(state["data"])
        return True

    def _load_rank_state(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
        rank = self.dist.rank
        mine = tensors.get(f"rank{rank}")
        if mine is not None:
            set_rng_state({k[len("rng."):]: v for k, v in mine.items() if k.startswith("rng.")},
                          state["ranks"][rank]["rng"])
            self.stage.load_rank_state({k[len("stage."):]: v for k, v in mine.items() if k.startswith("stage.")},
                                       self.stream.seed)
        elif rank == 0 and "rng" in tensors:
            # Written before per-rank states: rank 0's generators were part of `state`.
            set_rng_state(tensors["rng"], state["rng"])
        else:
            # The checkpoint came from fewer processes: fresh, seeded streams for this rank.
            seed = rank_seed(self.stream.seed, rank, self.step)
            seed_everything(seed)
            self.stage.load_rank_state(None, seed)

    # one optimizer step ------------------------------------------------------------------
    def train_step(self, batches: Iterator[Any]) -> dict[str, float | torch.Tensor]:
        """One optimizer step. Losses and gradient norms come back as 0-d tensors on the
        device, so a GPU step queues without waiting for the host; `host_values` reads them."""
        slots = self.stage.optimizers()
        self._zero_grad_and_set_lr(slots)
        logs = self._accumulate_gradients(batches, slots)
        logs.update(self._apply_gradients(slots))
        self.step += 1
        self.stage.after_step(self.schedule_position())
        return logs

    # time ---------------------------------------------------------------------------------
    def spent_s(self) -> float:
        """Seconds this stage has trained, over all the processes that ran it in turn."""
        running = self.clock() - self._started if self._started is not None else 0.0
        return self.spent_before + running

    def schedule_position(self) -> float:
        """Where the learning-rate, EMA and loss schedules stand, in steps: the step itself, or
        with a time budget the fraction of it used times spec.max_steps (so warm-up, decay and
        a discriminator start keep their shape, stretched over the budget)."""
        if self.budget_s is None:
            return self.step
        return min(1.0, self.spent_s() / self.budget_s) * self.spec.max_steps

    def done(self, max_steps: int | None) -> bool:
        """Step `max_steps` reached (None: no step limit) or the time budget spent; with
        several processes rank 0's clock decides, so that all stop at the same step."""
        if max_steps is not None and self.step >= max_steps:
            return True
        if self.budget_s is None:
            return max_steps is None
        out_of_time = self.spent_s() >= self.budget_s
        return bool(self.dist.broadcast_object(out_of_time)) if self.dist.active else out_of_time

    def _zero_grad_and_set_lr(self, slots: dict[str, OptimizerSlot]) -> None:
        for slot in slots.values():
            for group in slot.optimizer.param_groups:
                group["lr"] = slot.lr * lr_factor(self.schedule_position(), self.spec)
            slot.optimizer.zero_grad(set_to_none=True)

    def _accumulate_gradients(self, batches: Iterator[Any],
                              slots: dict[str, OptimizerSlot]) -> dict[str, float | torch.Tensor]:
        """Forward and backward over grad_accum micro-batches; the mean losses and stage logs."""
        accum = self.spec.grad_accum
        logs: dict[str, float | torch.Tensor] = {}
        for micro in range(accum):
            batch = next(batches)
            last = micro == accum - 1
            # DDP averages gradients in the backward of the last micro-step only.
            with contextlib.nullcontext() if last or not self.dist.active else self.stage.no_sync():
                with autocast(self.device, self.dtype):
                    losses, micro_logs = self.stage.losses(batch, self.schedule_position())
                for name, loss in losses.items():
                    if loss is None:
                        continue
                    scaled = loss / accum
                    if self.scaler is not None:
                        scaled = self.scaler.scale(scaled)
                    # Each loss reaches only its own optimizer's parameters (a GAN generator
                    # loss must not leave gradients on the discriminator).
                    scaled.backward(inputs=slots[name].params)
                    logs[f"loss/{name}"] = logs.get(f"loss/{name}", 0.0) + loss.detach().float() / accum
            for k, v in micro_logs.items():
                logs[k] = logs.get(k, 0.0) + v / accum
        return logs

    def _apply_gradients(self, slots: dict[str, OptimizerSlot]) -> dict[str, float | torch.Tensor]:
        """Average over processes, unscale, clip and step each optimizer; grad norms and lrs."""
        logs: dict[str, float | torch.Tensor] = {}
        for name, slot in slots.items():
            if not slot.ddp:
                # The mean over ranks before clipping: the clip then sees the gradient of the
                # whole global batch, as one process would.
                self.dist.average_gradients(slot.params)
            if all(p.grad is None for p in slot.params):
                continue
            if self.scaler is not None:
                self.scaler.unscale_(slot.optimizer)
            clip = slot.grad_clip if slot.grad_clip is not None else self.spec.grad_clip
            if clip is not None:
                logs[f"grad_norm/{name}"] = torch.nn.utils.clip_grad_norm_(slot.params, clip).detach()
            if self.scaler is not None:
                self.scaler.step(slot.optimizer)
            else:
                slot.optimizer.step()
            logs[f"lr/{name}"] = slot.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.update()
        if self.dist.active:
            for module in self.stage.modules().values():
                self.dist.broadcast_batchnorm_stats(module)
        return logs

    # the run -----------------------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> int:
        """Train until `max_steps` (default spec.max_steps; with a time budget, none) or until
        the budget is spent; checkpoint on the way and at the end.

        An interrupt (Ctrl-C) saves a checkpoint before leaving, so no work is lost; with
        several processes it does not (they stop at different points, and a checkpoint
        needs them all), so the last periodic checkpoint stands.
        """
        max_steps = max_steps or (None if self.budget_s is not None else self.spec.max_steps)
        batches = iter(self.stream)
        start_step = self.step
        self._started = self._window_start = self.clock()
        self._window_step = self.step
        try:
            with peer_failures(self.dist):
                while not self.done(max_steps):
                    logs = self.train_step(batches)
                    last = self.done(max_steps)
                    self._report(logs, last, max_steps)
                    if last:
                        break
                    self._evaluate_and_checkpoint_when_due()
        except KeyboardInterrupt:
            if self.step > start_step and not self.dist.active:
                self.save()
            raise
        self.save()
        if self.dist.is_main:
            self.log({"step": self.step, **self.periodic(final=True)})
        self.dist.barrier()
        return self.step

    def _report(self, logs: dict[str, float | torch.Tensor], last: bool, max_steps: int | None) -> None:
        """The progress bar every step; a metrics record every log_every steps and at the end."""
        log_now = self.step % self.spec.log_every == 0 or last
        if log_now:  # the one device-to-host read of the logs, every log_every steps
            logs = self.dist.mean_logs(host_values(logs))
        if self.progress and self.dist.is_main:
            self.progress(*self.progress_position(max_steps), logs if log_now else None)
        if log_now:
            now = self.clock()
            # Steps since the last record (or since this process started), not log_every:
            # a resumed run's first window and a last, short window are partial.
            steps_per_s = (self.step - self._window_step) / max(now - self._window_start, 1e-9)
            self.log({"step": self.step, **logs, "steps_per_s": steps_per_s, "elapsed_s": now - self._started})
            self._window_step, self._window_start = self.step, now

    def progress_position(self, max_steps: int | None) -> tuple[int, int]:
        """(done, total) for a progress bar: steps, or per mille of the time budget."""
        if self.budget_s is None:
            return self.step, max_steps
        return min(1000, round(1000 * self.spent_s() / self.budget_s)), 1000

    def _evaluate_and_checkpoint_when_due(self) -> None:
        if self.dist.is_main:
            periodic = self.periodic(final=False)
            if periodic:
                self.log({"step": self.step, **periodic})
        if self.step % self.spec.checkpoint_every == 0:
            self.save()

    def log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.trackers.log_metrics(self.stage.name, record["step"], record)

    def periodic(self, final: bool) -> dict[str, float]:
        """The stage's evaluation, isolated from the training RNG streams: whether or not a
        grid is drawn must not change what training does next (exact resume relies on it)."""
        tensors, meta = rng_state()
        try:
            return self.stage.periodic(self.step, final)
        finally:
            set_rng_state(tensors, meta)
