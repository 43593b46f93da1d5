"""Training on several processes with torch.distributed (`torchrun`, one process per device).

A launch is read from the variables every launcher sets (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). The backend follows the device: NCCL on CUDA (device =
LOCAL_RANK), Gloo on the CPU. Every collective gives up after N2A_DIST_TIMEOUT seconds
(default 600), so a process that dies or hangs ends the job with one clear error instead
of a silent hang.

Batches: a spec's `batch_size` is the global batch of one optimizer step; every process
takes batch_size / (world_size * grad_accum) samples per micro-step, and gradients are
averaged over processes before clipping, so the step equals a one-process step on the
whole batch (up to float rounding of the sum).

Rank 0 alone writes checkpoints, metrics, grids and the EMA; the others wait at a barrier.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from n2a_core.device import resolve_device
from n2a_core.errors import N2AError, SpecError

TIMEOUT_ENV = "N2A_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
FIND_UNUSED_ENV = "N2A_DDP_FIND_UNUSED"
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class DistributedError(N2AError):
    """A launch that cannot work, or a process of the job that failed or stopped answering."""


# -- the launch -----------------------------------------------------------------------------
def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r}: expected an integer (it is set by torchrun)") from None


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's variables; (0, 1, 0) without one."""
    present = [v for v in LAUNCH_VARS if v in os.environ]
    if not present:
        return 0, 1, 0
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise DistributedError(f"{', '.join(present)} set but not both WORLD_SIZE and RANK; launch with "
                               "torchrun, or unset them for one process")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def timeout() -> datetime.timedelta:
    """How long any collective (a barrier, a gradient all-reduce) may wait for a peer."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}: expected seconds, e.g. {TIMEOUT_ENV}=600") from None
    if seconds <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}: must be positive")
    return datetime.timedelta(seconds=seconds)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of process `rank`'s random streams (noise, dropout, flips) from the run seed.

    Rank 0 keeps the run seed, so a one-process run is unchanged; other ranks (and ranks a
    checkpoint has no state for, resumed at `step`) get a hash of (seed, rank, step).
    """
    if rank == 0 and step == 0:
        return seed
    digest = hashlib.sha256(f"n2a-rank:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def local_batch(batch_size: int, grad_accum: int, world_size: int, field: str) -> int:
    """Samples per process and micro-step; SpecError naming `field` when it does not divide."""
    parts = world_size * grad_accum
    if batch_size % parts:
        below, above = batch_size // parts * parts, (batch_size // parts + 1) * parts
        options = f"{below} or {above}" if below else f"{above}"
        raise SpecError(f"{field}: {batch_size} does not split over {world_size} process"
                        f"{'es' * (world_size != 1)} x grad_accum {grad_accum} = {parts}; use a multiple of "
                        f"{parts} ({options}) or change grad_accum")
    return batch_size // parts


# -- the process group ----------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    """This process's place in the job; every method is a no-op for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            with peer_failures(self):
                dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (picklable objects only)."""
        if not self.active:
            return obj
        box = [obj]
        with peer_failures(self):
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with peer_failures(self):
            dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling download or render caches), then the rest."""
        if self.is_main:
            yield
        self.barrier()
        if not self.is_main:
            yield

    def mean_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Logged values averaged over the ranks that have them (rank 0 alone writes them)."""
        if not self.active:
            return logs
        totals: dict[str, list[float]] = defaultdict(list)
        for rank_logs in self.all_gather_object(logs):
            for k, v in rank_logs.items():
                totals[k].append(v)
        return {k: sum(v) / len(v) for k, v in totals.items()}

    @torch.no_grad()
    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Set every gradient to its mean over ranks, as DistributedDataParallel does.

        A gradient missing on some ranks counts as zero there; one missing on every rank
        stays None (the optimizer then skips that parameter, as in one process).
        """
        if not self.active:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        # One flag per parameter: how many ranks produced a gradient for it.
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        groups: dict[tuple, list[nn.Parameter]] = defaultdict(list)
        for p in params:  # same order on every rank: the optimizer's parameter order
            groups[(p.device, p.dtype)].append(p)
        with peer_failures(self):
            dist.all_reduce(used)
            users = dict(zip(map(id, params), used.tolist(), strict=True))
            for group in groups.values():
                if not any(users[id(p)] for p in group):
                    continue  # e.g. a discriminator before it starts training
                # One coalesced all-reduce per device and dtype instead of one per tensor.
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                  for p in group])
                dist.all_reduce(flat)
                flat.div_(self.world_size)
                offset = 0
                for p in group:
                    n = p.numel()
                    if users[id(p)] > 0:
                        mean = flat[offset:offset + n].view_as(p)
                        if p.grad is None:
                            p.grad = mean.clone()
                        else:
                            p.grad.copy_(mean)
                    offset += n

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every replica."""
        if not self.active:
            return
        with peer_failures(self):
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    @torch.no_grad()
    def broadcast_batchnorm_stats(self, module: nn.Module) -> None:
        """Rank 0's BatchNorm running statistics everywhere (DDP's `broadcast_buffers` for
        modules trained without DDP): forward updates them from each rank's own batch."""
        if not self.active:
            return
        norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                 and m.track_running_stats]
        with peer_failures(self):
            for m in norms:
                for tensor in (m.running_mean, m.running_var, m.num_batches_tracked):
                    if tensor is not None:
                        dist.broadcast(tensor, src=0)


SINGLE = Dist()


def device_for(name: str, local_rank: int, world_size: int) -> torch.device:
    """The device of this process: `name` resolved, with CUDA pinned to LOCAL_RANK."""
    device = resolve_device(name)
    if device.type != "cuda" or world_size == 1:
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedError(f"LOCAL_RANK={local_rank} but this node has {count} CUDA device"
                               f"{'s' * (count != 1)}; launch at most {count} processes per node "
                               "(torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


def init(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Join the job the launcher started (once per process) and pick this process's device.

    Without launcher variables, or with WORLD_SIZE=1, this is a plain single process.
    """
    rank, world, local = launch_env()
    if dist.is_available() and dist.is_initialized():  # joined earlier (a second stage, a harness)
        rank, world = dist.get_rank(), dist.get_world_size()
        joined = Dist(rank, world, local if "LOCAL_RANK" in os.environ else rank)
        return joined, device_for(device_name, joined.local_rank, world)
    device = device_for(device_name, local, world)
    if world == 1:
        return SINGLE, device
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} unset; launch with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    try:
        dist.init_process_group(backend_for(device), rank=rank, world_size=world, timeout=timeout(), **kwargs)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {rank}: could not join the job at {os.environ['MASTER_ADDR']}:"
                               f"{os.environ['MASTER_PORT']} ({_first_line(exc)}); check that every "
                               f"process got the same rendezvous address and that they start within "
                               f"{TIMEOUT_ENV} seconds") from None
    atexit.register(shutdown)
    return Dist(rank, world, local), device


_broken = False
"""Set when a collective failed because of another process: the group can no longer be left."""


def shutdown() -> None:
    """Leave the process group (safe to call twice; registered at exit by `init`).

    After a peer failed, leaving is not possible: destroying a Gloo or NCCL group whose peer
    is gone can hang, and tearing it down at interpreter exit can abort the process
    ("terminate called without an active exception") after its error was printed. Such a
    process ends here at once, with exit code 1, once its output is flushed; what it wrote
    is on disk already (checkpoints are written atomically, the lock is the kernel's).
    """
    if _broken and dist.is_available() and dist.is_initialized():
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(1)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- failures of other processes --------------------------------------------------------------
# Gloo and NCCL raise plain RuntimeErrors; their messages name the transport.
_PEER_SIGNS = ("gloo", "nccl", "processgroup", "c10d")


def is_peer_failure(exc: BaseException) -> bool:
    """Did a collective fail because another process died or went silent?"""
    if dist.is_available() and isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in _PEER_SIGNS)


@contextlib.contextmanager
def peer_failures(d: Dist) -> Iterator[None]:
    """Turn a collective that failed because of another process into one DistributedError;
    the process then exits without touching the broken group (see `shutdown`)."""
    global _broken
    try:
        yield
    except Exception as exc:
        if not d.active or isinstance(exc, N2AError) or not is_peer_failure(exc):
            raise
        _broken = True
        raise DistributedError(
            f"rank {d.rank}: another process of the job failed or stopped answering ({_first_line(exc)}); "
            f"its own log says why. Fix that and continue with --resume from the last checkpoint "
            f"(collectives wait at most {TIMEOUT_ENV}={timeout().total_seconds():g} s)") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def find_unused_parameters(default: bool) -> bool:
    """DDP's `find_unused_parameters`: `default`, unless N2A_DDP_FIND_UNUSED=0/1 says otherwise."""
    raw = os.environ.get(FIND_UNUSED_ENV, "").strip().lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    return default
