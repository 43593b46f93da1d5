"""Training on several processes: torch.distributed with Gloo on the CPU, over loopback only.

Two processes must take the optimizer steps one process takes with the whole global
batch, see every sample of an epoch once, write checkpoints that resume on another number
of processes at the same data position, and stop with one clear error when a peer dies or
hangs. The last test launches `n2a train` under torchrun and samples from the result.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from typer.testing import CliRunner

from n2a_core.checkpoint import latest_checkpoint, load_checkpoint
from n2a_core.errors import SpecError
from n2a_core.specs import DiffusionTrainingSpec, OptimSpec
from n2a_core.training import distributed
from n2a_core.training.batching import BatchStream, RankBlocks
from n2a_core.training.distributed import SINGLE, Dist, DistributedError, local_batch, rank_seed
from n2a_core.training.loop import Stage, TrainingLoop, adamw

CPU = torch.device("cpu")
# Gloo binds the interface named here; without it, the one the hostname resolves to.
LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
            **({"GLOO_SOCKET_IFNAME": "lo"} if Path("/sys/class/net/lo").exists() else {})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_job(rank: int, world_size: int, port: int, timeout_s: float = 60) -> Dist:
    """What torchrun does for a worker: the launch variables, then n2a's own init."""
    os.environ.update(LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), N2A_DIST_TIMEOUT=str(timeout_s))
    torch.set_num_threads(1)
    d, device = distributed.init("cpu")
    assert device == CPU and d == Dist(rank, world_size, rank)
    return d


# -- toy stages ---------------------------------------------------------------------------
class PairData(torch.utils.data.Dataset):
    """(id, x, y) with y a fixed function of x, so every run sees the same samples."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.sin(self.x).sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return torch.tensor(i), self.x[i], self.y[i]


class PairStage(Stage):
    """body and head with their own optimizers, each loss routed to its own parameters as
    in a GAN (the head's loss on detached features); no RNG, so runs on any number of
    processes must agree up to float rounding."""

    name = "pair"

    def __init__(self):
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(4, 16), nn.Linear(16, 1)
        self.model = nn.Sequential(self.body, nn.Tanh(), self.head)
        self.slots = {"body": adamw(list(self.body.parameters()), 1e-2, 0.01),
                      "head": adamw(list(self.head.parameters()), 5e-3, 0.0)}
        self.seen: list[list[int]] = []

    def modules(self):
        return {"model": self.model}

    def optimizers(self):
        return self.slots

    def losses(self, batch, step):
        ids, x, y = batch
        self.seen.append(ids.tolist())
        features = torch.tanh(self.body(x))
        body_loss = (self.head(features) - y).pow(2).mean()
        head_loss = (self.head(features.detach()) - y).pow(2).mean()
        return {"body": body_loss, "head": head_loss}, {"x_mean": float(x.mean())}


class NoisyStage(PairStage):
    """With dropout (torch's global RNG) and its own noise generator: per-rank random streams."""

    name = "noisy"

    def __init__(self, seed: int, rank: int):
        super().__init__()
        self.dropout = nn.Dropout(0.3)
        self.generator = torch.Generator().manual_seed(rank_seed(seed, rank))

    def losses(self, batch, step):
        ids, x, y = batch
        noise = 0.1 * torch.randn(y.shape, generator=self.generator)
        out = self.head(self.dropout(torch.tanh(self.body(x))))
        loss = (out - y - noise).pow(2).mean()
        return {"body": loss, "head": None}, {}

    def rank_state(self):
        return {"generator": self.generator.get_state()}

    def load_rank_state(self, tensors, seed):
        if tensors is None:
            self.generator.manual_seed(seed)
        else:
            self.generator.set_state(tensors["generator"])


def toy_spec(steps: int, accum: int = 1) -> OptimSpec:
    # A small grad_clip that always bites: clipping per rank before averaging would show.
    return OptimSpec(max_steps=steps, batch_size=8, grad_accum=accum, warmup_steps=2, lr=1e-2, grad_clip=0.05,
                     checkpoint_every=100, log_every=1, keep_last=5, precision="fp32")


def toy_run(d: Dist, out: Path, steps: int, stage_cls=PairStage, accum: int = 1) -> dict:
    stage = stage_cls() if stage_cls is PairStage else stage_cls(3, d.rank)
    spec = toy_spec(8, accum)  # a run stopped early keeps the learning-rate schedule of 8 steps
    stream = BatchStream(PairData(), local_batch(8, accum, d.world_size, "batch_size"), seed=3,
                         rank=d.rank, world_size=d.world_size)
    loop = TrainingLoop(stage, spec, stream, out, device=CPU, spec_digest="toy", dist=d)
    torch.manual_seed(999 + d.rank)  # a resumed process starts from unrelated RNG states
    loop.resume()
    start = loop.step
    loop.run(steps)
    return {"start": start, "seen": stage.seen, "weights": {k: v.clone() for k, v in stage.model.state_dict().items()}}


# -- a real diffusion stage (UNet + class embedding, DDP) with noise fixed per micro-batch --
def diffusion_stage(d: Dist, out: Path):
    from n2a_core.diffusion_model import DiffusionModel
    from n2a_core.training.diffusion_stage import DiffusionStage
    from n2a_plugins.conditioners.class_label import ClassLabelConditioner
    from n2a_plugins.schedules import LinearSchedule
    from n2a_plugins.unet import UNet

    class KeyedNoise(DiffusionStage):
        """Noise drawn from a generator seeded by the micro-batch's keys: the same batch gets
        the same noise in every run, whichever process trains on it."""

        def losses(self, batch, step):
            self.model.train()
            g = torch.Generator().manual_seed(zlib.crc32("|".join(batch["key"]).encode()))
            return {"model": self.batch_loss(batch, g, self.spec.p_uncond)}, {}

    torch.manual_seed(0)
    unet = UNet(in_channels=4, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                num_heads=2, norm_groups=8, cond_mode="vector", cond_dim=8)
    model = DiffusionModel(unet, ClassLabelConditioner(["a", "b", "c"], dim=8))
    spec = DiffusionTrainingSpec(max_steps=3, batch_size=8, grad_accum=2 // d.world_size, warmup_steps=1, p_uncond=0.3,
                                 ema_decay=0.9, ema_warmup=0, checkpoint_every=100, precision="fp32")
    stage = KeyedNoise(model, None, LinearSchedule(num_timesteps=100), None, spec, CPU, 0, out, (4, 4, 4), dist=d)
    # Plain SGD: Adam would blow the rounding noise of gradients that are zero in exact
    # arithmetic (attention's key bias) up to full-size steps of random sign.
    slot = stage.optimizers()["model"]
    slot.optimizer, slot.lr = torch.optim.SGD(slot.params, lr=0.05, momentum=0.9), 0.05
    return stage, spec


def latents(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    labels = ["a", "b", "c", ""]  # '' has no label: the class embedding skips that row
    return [{"latent": torch.randn(4, 4, 4, generator=g), "label": labels[i % 4], "caption": "", "key": f"k{i}"}
            for i in range(n)]


def diffusion_run(d: Dist, out: Path) -> dict:
    from n2a_core.training.run import collate_latents

    stage, spec = diffusion_stage(d, out)
    local = local_batch(spec.batch_size, spec.grad_accum, d.world_size, "training.batch_size")
    stream = BatchStream(latents(), local, seed=0, collate=collate_latents, rank=d.rank, world_size=d.world_size)
    loop = TrainingLoop(stage, spec, stream, out, device=CPU, spec_digest="diffusion", dist=d)
    loop.run()
    return {"weights": {k: v.clone() for k, v in stage.model.state_dict().items()},
            "ema": None if stage.ema is None else {k: v.clone() for k, v in stage.ema.shadow.items()}}


# -- one job of two processes runs every scenario; the tests below read its results ----------
def two_rank_scenarios(d: Dist, tmp: Path) -> dict:
    return {
        "straight": toy_run(d, tmp / "w2-straight", 8),
        "part": toy_run(d, tmp / "w2-part", 5),
        "from_one": toy_run(d, tmp / "w1-part", 8),  # made by one process up to step 3
        "noisy_straight": toy_run(d, tmp / "w2-noisy-straight", 6, NoisyStage),
        "noisy_part": toy_run(d, tmp / "w2-noisy", 3, NoisyStage),
        "noisy_resumed": toy_run(d, tmp / "w2-noisy", 6, NoisyStage),
        "diffusion": diffusion_run(d, tmp / "w2-diffusion"),
        "average": gradient_average_case(d),
        "cache": latent_cache_case(d, tmp / "cache"),
    }


def latent_cache_case(d: Dist, directory: Path) -> dict:
    """Each rank builds its slice of a 10-item 'dataset'; all read back the joined file."""
    from n2a_core.training.latent_cache import load_or_build

    def build_part(rank, world_size):
        lo, hi = 10 * rank // world_size, 10 * (rank + 1) // world_size
        keys = [f"k{i}" for i in range(lo, hi)]
        return torch.arange(lo, hi).float().view(-1, 1), None, {"label": keys, "caption": keys, "key": keys}

    built = load_or_build(directory, "key", None, d, build_part)
    again = load_or_build(directory, "key", None, d, build_part=None)  # found: nobody builds
    return {"latents": built.latents, "keys": built.keys, "again": again.keys,
            "files": sorted(p.name for p in directory.iterdir())}


def gradient_average_case(d: Dist) -> dict:
    """average_gradients on hand-made gradients, one of them missing on rank 1 only and
    one missing everywhere."""
    a, b, c = (nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), float(d.rank + 1))  # 1 and 2: mean 1.5
    b.grad = torch.full((3,), 4.0) if d.rank == 0 else None  # (4 + 0) / 2 = 2
    d.average_gradients([a, b, c])
    return {"a": a.grad.clone(), "b": b.grad.clone(), "c": c.grad}


def _worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    d = join_job(rank, world_size, port)
    try:
        torch.save(two_rank_scenarios(d, Path(tmp)), Path(tmp) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    toy_run(SINGLE, tmp / "w1-part", 3)  # for the two processes to resume
    one = {}
    mp.start_processes(_worker, args=(2, free_port(), str(tmp)), nprocs=2, start_method="spawn", join=True)
    two = [torch.load(tmp / f"rank{r}.pt") for r in range(2)]
    one["straight"] = toy_run(SINGLE, tmp / "w1-straight", 8)
    one["accum"] = toy_run(SINGLE, tmp / "w1-accum", 8, accum=2)
    shutil.copytree(tmp / "w2-part", tmp / "w2-part-on-1")
    one["from_two"] = toy_run(SINGLE, tmp / "w2-part-on-1", 8)
    one["diffusion"] = diffusion_run(SINGLE, tmp / "w1-diffusion")
    return {"one": one, "two": two, "tmp": tmp}


def assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def per_step(seen_by_rank: list[list[list[int]]]) -> list[set[int]]:
    """The samples each optimizer step trained on, over all ranks (grad_accum 1)."""
    return [set().union(*step) for step in zip(*seen_by_rank, strict=True)]


@pytest.mark.slow
def test_two_processes_step_like_one_process_with_the_whole_batch(job):
    one, two = job["one"], job["two"]
    assert_close(two[0]["straight"]["weights"], two[1]["straight"]["weights"], atol=0)  # replicas agree exactly
    assert_close(two[0]["straight"]["weights"], one["straight"]["weights"])  # batch 8 on 1 process
    assert_close(one["accum"]["weights"], one["straight"]["weights"])
    assert per_step([r["straight"]["seen"] for r in two]) == [set(s) for s in one["straight"]["seen"]]
    assert all(len(s) == 4 for r in two for s in r["straight"]["seen"])  # 8 = 2 processes x 4


@pytest.mark.slow
def test_gradients_average_like_ddp(job):
    for rank in job["two"]:
        got = rank["average"]
        torch.testing.assert_close(got["a"], torch.full((3,), 1.5))
        torch.testing.assert_close(got["b"], torch.full((3,), 2.0))  # missing on rank 1 counts as zero
        assert got["c"] is None  # missing everywhere stays missing: the optimizer skips it


@pytest.mark.slow
def test_latent_cache_is_built_in_slices_and_joined_in_order(job):
    for rank in job["two"]:
        cache = rank["cache"]
        assert cache["latents"].flatten().tolist() == list(range(10))
        assert cache["keys"] == cache["again"] == [f"k{i}" for i in range(10)]
        assert cache["files"] == ["latents-key.json", "latents-key.safetensors"]  # the slices are gone


@pytest.mark.slow
def test_each_sample_once_per_epoch_across_ranks(job):
    ranks = [r["straight"]["seen"] for r in job["two"]]
    steps = per_step(ranks)
    # 32 samples, global batch 8: an epoch is 4 steps; every sample once in each.
    for epoch in range(2):
        taken = [i for rank in ranks for batch in rank[4 * epoch:4 * epoch + 4] for i in batch]
        assert len(taken) == len(set(taken)) == 32
    assert steps[:4] != steps[4:]  # a new order each epoch


@pytest.mark.slow
def test_ddp_diffusion_stage_matches_one_process(job):
    """UNet + class embedding under DDP (2 x 4 samples) equals one process accumulating the
    same two micro-batches; rank 0 alone keeps the EMA."""
    two, one = job["two"], job["one"]
    assert_close(two[0]["diffusion"]["weights"], two[1]["diffusion"]["weights"], atol=0)
    assert_close(two[0]["diffusion"]["weights"], one["diffusion"]["weights"])
    assert_close(two[0]["diffusion"]["ema"], one["diffusion"]["ema"])
    assert two[1]["diffusion"]["ema"] is None
    initial = diffusion_stage(SINGLE, job["tmp"] / "unused")[0].model.state_dict()
    moved = [k for k in initial if not torch.equal(initial[k], one["diffusion"]["weights"][k])]
    assert "conditioner.embedding.weight" in moved and len(moved) > len(initial) // 2


@pytest.mark.slow
def test_checkpoint_from_two_processes_resumes_on_one(job):
    one = job["one"]
    state = load_checkpoint(latest_checkpoint(job["tmp"] / "w2-part" / "checkpoints"))[1]
    assert state["world_size"] == 2 and state["data"] == {"epoch": 1, "samples": 8}
    resumed = one["from_two"]
    assert resumed["start"] == 5
    assert [set(s) for s in resumed["seen"]] == [set(s) for s in one["straight"]["seen"][5:]]
    assert_close(resumed["weights"], one["straight"]["weights"])


@pytest.mark.slow
def test_checkpoint_from_one_process_resumes_on_two(job):
    one, two = job["one"], job["two"]
    assert all(r["from_one"]["start"] == 3 for r in two)
    assert per_step([r["from_one"]["seen"] for r in two]) == [set(s) for s in one["straight"]["seen"][3:]]
    assert_close(two[0]["from_one"]["weights"], one["straight"]["weights"])


@pytest.mark.slow
def test_resume_on_the_same_processes_is_exact(job):
    """Dropout and noise differ per rank; each rank's streams are saved, so stopping at step 3
    and resuming on two processes gives bit-identical weights."""
    two = job["two"]
    for rank in two:
        assert rank["noisy_resumed"]["start"] == 3
        assert_close(rank["noisy_resumed"]["weights"], rank["noisy_straight"]["weights"], atol=0)
    tensors, _ = load_checkpoint(latest_checkpoint(job["tmp"] / "w2-noisy" / "checkpoints"))
    assert not torch.equal(tensors["rank0"]["stage.generator"], tensors["rank1"]["stage.generator"])
    assert not torch.equal(tensors["rank0"]["rng.torch"], tensors["rank1"]["rng.torch"])


@pytest.mark.slow
def test_only_rank_zero_writes(job):
    lines = (job["tmp"] / "w2-straight" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if "loss/body" in r] == list(range(1, 9))  # once per step, not per rank
    assert all(abs(r["x_mean"]) < 2 for r in records if "x_mean" in r)


# -- data positions, without processes ---------------------------------------------------------
class Stream(torch.utils.data.IterableDataset):
    """Items 0..n-1 in order; `skip` as the streamed image datasets have it."""

    def __init__(self, n):
        self.n, self.start = n, 0

    def skip(self, n):
        self.start = n
        return self

    def __iter__(self):
        yield from range(self.start, self.n)


class Ints(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def take(stream: BatchStream, k: int) -> list[list[int]]:
    it = iter(stream)
    return [next(it).tolist() for _ in range(k)]


@pytest.mark.parametrize("streamed", [False, True])
def test_first_batches_of_all_ranks_are_the_same_samples_on_any_world_size(streamed):
    def dataset():
        return Stream(50) if streamed else Ints(50)

    prefix = {}
    for world in (1, 2, 4):
        ranks = [take(BatchStream(dataset(), 8 // world, seed=5, rank=r, world_size=world), 3) for r in range(world)]
        seen = [i for rank in ranks for batch in rank for i in batch]
        assert len(seen) == len(set(seen)) == 24
        prefix[world] = [sorted(i for rank in ranks for i in rank[k]) for k in range(3)]
    assert prefix[1] == prefix[2] == prefix[4]
    if streamed:
        assert prefix[1] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


@pytest.mark.parametrize("streamed", [False, True])
def test_position_maps_across_world_sizes(streamed):
    def dataset():
        return Stream(44) if streamed else Ints(44)

    two = [BatchStream(dataset(), 4, seed=5, rank=r, world_size=2) for r in range(2)]
    for s in two:
        take(s, 3)
    position = two[0].position
    assert position == {"epoch": 0, "samples": 24}
    nxt = sorted(i for s in two for i in take(s, 1)[0])
    one = BatchStream(dataset(), 8, seed=5)
    one.restore(position)
    assert sorted(take(one, 1)[0]) == nxt
    four = [BatchStream(dataset(), 2, seed=5, rank=r, world_size=4) for r in range(4)]
    for s in four:
        s.restore(position)
    assert sorted(i for s in four for i in take(s, 1)[0]) == nxt


def test_streamed_epochs_restart_from_the_beginning_after_a_resume():
    stream = BatchStream(Stream(10), 4, seed=0)
    stream.restore({"epoch": 0, "samples": 4})
    assert take(stream, 3) == [[4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


def test_rank_blocks_drop_an_incomplete_run_on_every_rank():
    got = [list(RankBlocks(Stream(11), 2, r, 2)) for r in range(2)]
    assert got == [[0, 1, 4, 5], [2, 3, 6, 7]]  # 8..10 do not fill a run of 4: nobody takes them


def test_restore_inside_a_micro_batch_goes_back_to_its_start_and_reads_old_positions(caplog):
    """A batch size changed on resume leaves the saved position inside a micro-batch."""
    data = Ints(40)
    stream = BatchStream(data, 4, seed=0, world_size=2)
    with caplog.at_level("WARNING", logger="n2a_core"):
        stream.restore({"epoch": 1, "samples": 12})
    assert stream.position == {"epoch": 1, "samples": 8}
    assert "epoch 1 continues from sample 8, not 12" in caplog.text
    old = BatchStream(data, 4, seed=0)
    old.restore({"epoch": 2, "batch": 3})  # written by a one-process run before "samples"
    assert old.position == {"epoch": 2, "samples": 12}


class OldNoisy(NoisyStage):
    """Keeps its generator in `state`, as stages did before per-rank states."""

    def state(self):
        return {"gen": {"state": self.generator.get_state()}}, {}

    def load_state(self, tensors, meta):
        self.generator.set_state(tensors["gen"]["state"])

    def rank_state(self):
        return {}


def test_a_checkpoint_from_before_per_rank_states_still_resumes_exactly(tmp_path):
    from n2a_core.checkpoint import save_checkpoint

    straight = toy_run(SINGLE, tmp_path / "straight", 6, OldNoisy)
    toy_run(SINGLE, tmp_path / "old", 3, OldNoisy)
    path = latest_checkpoint(tmp_path / "old" / "checkpoints")
    tensors, state = load_checkpoint(path)
    # The layout the loop wrote before: rank 0's RNGs as "rng", the position in batches.
    tensors["rng"] = {k[len("rng."):]: v for k, v in tensors.pop("rank0").items()}
    state["rng"] = state.pop("ranks")[0]["rng"]
    state["data"] = {"epoch": state["data"]["epoch"], "batch": state["data"]["samples"] // 8}
    del state["world_size"]
    shutil.rmtree(path)
    save_checkpoint(path.parent, state.pop("step"), tensors, state)
    resumed = toy_run(SINGLE, tmp_path / "old", 6, OldNoisy)
    assert resumed["start"] == 3
    assert_close(resumed["weights"], straight["weights"], atol=0)


# -- the launch, without processes ---------------------------------------------------------------
def test_global_batch_that_does_not_split_is_refused_with_the_field():
    assert local_batch(32, 2, 4, "training.batch_size") == 4
    with pytest.raises(SpecError) as err:
        local_batch(10, 1, 4, "training.batch_size")
    message = str(err.value)
    assert message.startswith("training.batch_size: 10") and "4 processes" in message and "8 or 12" in message
    assert "\n" not in message
    with pytest.raises(SpecError, match=r"autoencoder_training.batch_size: 2 .* \(6\)"):
        local_batch(2, 3, 2, "autoencoder_training.batch_size")


@pytest.mark.parametrize("command, wrong", [("train", "training.batch_size=8"),
                                            ("train-autoencoder", "autoencoder_training.batch_size=8")])
def test_cli_refuses_the_batch_before_any_work(monkeypatch, tmp_path, command, wrong):
    from cli.main import create_app

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    args = ["--set", "training.batch_size=9", "--set", "autoencoder_training.batch_size=9", "--set", wrong]
    result = CliRunner().invoke(create_app(), [command, "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 1
    assert f"{wrong.split('=')[0]}: 8 does not split over 3 processes" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_launch_variables_are_checked(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.launch_env() == (0, 1, 0)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(DistributedError, match="not both WORLD_SIZE and RANK"):
        distributed.launch_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedError, match="0 <= RANK < WORLD_SIZE"):
        distributed.launch_env()
    monkeypatch.setenv("N2A_DIST_TIMEOUT", "soon")
    with pytest.raises(DistributedError, match="N2A_DIST_TIMEOUT"):
        distributed.timeout()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert distributed.init("cpu") == (SINGLE, CPU)  # torchrun with one process: no process group


def test_rank_seeds():
    assert rank_seed(7, 0) == 7  # one process keeps the run seed
    seeds = {rank_seed(7, r) for r in range(1, 64)} | {rank_seed(7, 1, step) for step in (1, 2)} | {7}
    assert len(seeds) == 66 and rank_seed(7, 3) == rank_seed(7, 3)


# -- a peer that dies or hangs ----------------------------------------------------------------------
class Failing(PairStage):
    """Rank 1 dies (or hangs) in its third step."""

    def __init__(self, rank: int, mode: str):
        super().__init__()
        self.rank, self.mode = rank, mode

    def losses(self, batch, step):
        if self.rank == 1 and step == 2:
            if self.mode == "die":
                os._exit(3)
            time.sleep(120)
        return super().losses(batch, step)


def _failing_worker(rank: int, port: int, mode: str, timeout_s: float, out: str) -> None:
    d = join_job(rank, 2, port, timeout_s)
    stage = Failing(rank, mode)
    stream = BatchStream(PairData(), 4, seed=3, rank=rank, world_size=2)
    loop = TrainingLoop(stage, toy_spec(10), stream, Path(out), device=CPU, spec_digest="toy", dist=d)
    try:
        loop.run()
    except DistributedError as exc:
        Path(out, f"error{rank}.txt").write_text(str(exc))
        sys.exit(1)


@pytest.mark.slow
@pytest.mark.parametrize("mode, timeout_s, bound_s", [("die", 60, 30), ("hang", 3, 30)])
def test_a_failed_peer_ends_the_job_with_one_clear_error(tmp_path, mode, timeout_s, bound_s):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_failing_worker, args=(r, port, mode, timeout_s, str(tmp_path))) for r in range(2)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    try:
        procs[0].join(bound_s)
        elapsed = time.perf_counter() - started
        assert procs[0].exitcode is not None, f"rank 0 still running after {elapsed:.0f} s"
        assert procs[0].exitcode == 1
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    message = (tmp_path / "error0.txt").read_text()
    assert message.startswith("rank 0: another process of the job failed or stopped answering")
    assert "--resume" in message and "\n" not in message
    if mode == "hang":
        assert elapsed >= timeout_s  # it waited for the timeout, and not much longer
    assert latest_checkpoint(tmp_path / "checkpoints") is None  # nothing half-written


# -- the real command under torchrun --------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_trains_and_the_run_samples_and_resumes_on_one_process(tmp_path):
    from test_end_to_end import sets

    from cli.main import create_app

    out = tmp_path / "run"
    env = {**os.environ, **LOOPBACK, "N2A_DIST_TIMEOUT": "120", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1",
               "-m", "cli", "train", "--conditioner", "class-label", "--out", str(out), *sets()]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.perf_counter() - started < 240
    tensors, state = load_checkpoint(latest_checkpoint(out / "diffusion" / "checkpoints"))
    assert state["world_size"] == 2 and state["step"] == 4 and {"rank0", "rank1"} <= tensors.keys()
    records = [json.loads(line) for line in (out / "diffusion" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/model" in r] == [4]  # log_every 10: the last step, once
    assert not list((out / "cache").glob("*.part*"))  # the shares were joined into one cache
    labels = json.loads((out / "labels.json").read_text())

    runner = CliRunner()
    sampled = runner.invoke(create_app(), ["sample", str(out), "--label", labels[0], "--steps", "3", "--n", "2",
                                           "--out", str(tmp_path / "s")], catch_exceptions=False)
    assert sampled.exit_code == 0, sampled.output
    assert len(list((tmp_path / "s").glob("0*.png"))) == 2

    resumed = runner.invoke(create_app(), ["train", "--out", str(out), "--resume", "--conditioner", "class-label",
                                           *sets("training.max_steps=6")], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    state = load_checkpoint(latest_checkpoint(out / "diffusion" / "checkpoints"))[1]
    assert state["step"] == 6 and state["world_size"] == 1 and state["data"]["samples"] % 8 == 0
