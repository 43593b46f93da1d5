"""The generic training machinery: loop, checkpoints, EMA, the diffusion objective."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from n2a_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from n2a_core.errors import CheckpointError
from n2a_core.specs import DiffusionTrainingSpec, OptimSpec
from n2a_core.training import loop as loop_module
from n2a_core.training.batching import BatchStream
from n2a_core.training.loop import Stage, TrainingLoop, adamw, autocast_dtype, cpu_has_native_bf16, lr_factor
from n2a_core.training.objective import EMA, diffusion_loss, draw_condition_drop, min_snr_weight, prediction_target
from n2a_plugins.schedules import CosineSchedule, LinearSchedule


# -- a toy stage: regression with dropout, so global RNG state matters --------------------
class ToyStage(Stage):
    name = "toy"

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        self.slots = {"model": adamw(list(self.model.parameters()), 1e-2, 0.0)}
        self.generator = torch.Generator().manual_seed(seed)
        self.ema = EMA(self.model, 0.9, warmup=2)

    def modules(self):
        return {"model": self.model}

    def optimizers(self):
        return self.slots

    def losses(self, batch, step):
        x, y = batch
        noise = 0.01 * torch.randn(y.shape, generator=self.generator)
        return {"model": (self.model(x) - y - noise).pow(2).mean()}, {}

    def after_step(self, step):
        self.ema.update(self.model, step)

    def state(self):
        return {"ema": self.ema.state_dict(), "gen": {"state": self.generator.get_state()}}, {}

    def load_state(self, tensors, meta):
        self.ema.load_state_dict(tensors["ema"])
        self.generator.set_state(tensors["gen"]["state"])


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=37):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def make_loop(tmp_path, max_steps=12, seed=0, digest="d1"):
    stage = ToyStage(seed)
    spec = OptimSpec(max_steps=max_steps, batch_size=8, grad_accum=2, warmup_steps=3, checkpoint_every=5,
                     log_every=2, sample_every=100, keep_last=2)
    stream = BatchStream(ToyData(), 4, seed=seed)
    return TrainingLoop(stage, spec, stream, tmp_path, device=torch.device("cpu"), spec_digest=digest)


def test_resume_reaches_identical_weights(tmp_path):
    uninterrupted = make_loop(tmp_path / "a")
    uninterrupted.run(12)

    first = make_loop(tmp_path / "b")
    first.run(5)  # stops at step 5 (and checkpoints there)
    torch.manual_seed(999)  # the resumed process starts from a different RNG state
    resumed = make_loop(tmp_path / "b", seed=0)
    assert resumed.resume()
    assert resumed.step == 5
    resumed.run(12)

    for (k, a), b in zip(uninterrupted.stage.model.state_dict().items(), resumed.stage.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    for k, a in uninterrupted.stage.ema.shadow.items():
        assert torch.equal(a, resumed.stage.ema.shadow[k]), k


def test_loop_lowers_loss_and_writes_metrics(tmp_path):
    loop = make_loop(tmp_path, max_steps=60)
    loop.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/model"] for r in records if "loss/model" in r]
    assert losses[-1] < 0.2 * losses[0]
    assert records[-1]["step"] == 60


def test_checkpoint_from_another_spec_is_refused(tmp_path):
    make_loop(tmp_path, max_steps=5).run()
    other = make_loop(tmp_path, digest="other")
    with pytest.raises(CheckpointError, match="different spec"):
        other.resume()


def test_checkpoint_with_an_earlier_digest_of_the_same_spec_resumes(tmp_path):
    make_loop(tmp_path, max_steps=5, digest="old-hashing").run()
    loop = make_loop(tmp_path, digest="new-hashing")
    loop.earlier_digests = ("old-hashing",)
    assert loop.resume() and loop.step == 5


def test_keep_last_and_latest_pointer(tmp_path):
    make_loop(tmp_path, max_steps=15).run()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-00000010", "step-00000015"]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000015"


def valid_state(**extra) -> dict:
    """The least `state.json` that a checkpoint must hold (checkpoint.CheckpointState)."""
    return {"spec_digest": "abc", "stage": "toy", "optimizers": {}, "data": {"epoch": 0, "samples": 0}, **extra}


def test_crash_mid_write_keeps_previous_latest(tmp_path, monkeypatch):
    directory = tmp_path / "ck"
    save_checkpoint(directory, 1, {"m": {"w": torch.ones(3)}}, valid_state(x=1))
    import n2a_core.checkpoint as ck

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(OSError):
        save_checkpoint(directory, 2, {"m": {"w": torch.zeros(3)}}, valid_state(x=2))
    latest = latest_checkpoint(directory)
    assert latest.name == "step-00000001"
    tensors, state = load_checkpoint(latest)
    assert torch.equal(tensors["m"]["w"], torch.ones(3)) and state["step"] == 1
    assert not [p for p in directory.iterdir() if p.name.startswith(".step")]  # no debris


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"m": {"w": torch.ones(3)}}, valid_state())
    (path / "tensors.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)


def test_steps_per_s_counts_the_steps_of_each_window(tmp_path):
    """Each step takes one second on a fake clock, so every record must say 1.0 step/s,
    including a resumed run's first, partial window and a last step off the log_every grid."""
    def make(out):
        loop = make_loop(out, max_steps=11)
        loop.spec = loop.spec.model_copy(update={"log_every": 4})
        return with_one_second_steps(loop)

    make(tmp_path).run(5)  # logs at 4 and 5 (the end), checkpoints at 5
    resumed = make(tmp_path)
    assert resumed.resume() and resumed.step == 5
    resumed.run(11)  # logs at 8 (3 steps after the resume) and 11 (3 steps after 8)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["steps_per_s"] for r in records if "steps_per_s" in r}
    assert rates == {4: 1.0, 5: 1.0, 8: 1.0, 11: 1.0}
    assert [r["elapsed_s"] for r in records if "elapsed_s" in r] == [4.0, 5.0, 3.0, 6.0]


def make_timed_loop(out, budget_s, clock_start=0.0):
    """A loop with a time budget on a fake clock where every step takes one second; the
    spec's max_steps (100) only gives the schedules' shape."""
    loop = make_loop(out, max_steps=100)
    loop.spec = loop.spec.model_copy(update={"warmup_steps": 10, "lr_decay": "linear", "log_every": 1})
    loop.budget_s = budget_s
    return with_one_second_steps(loop, clock_start)


def with_one_second_steps(loop, clock_start=0.0):
    """`loop` on a fake clock that advances one second per optimizer step."""
    clock = {"now": clock_start}
    real_losses = loop.stage.losses

    def one_second_per_step(batch, step):
        clock["now"] += 1.0 / loop.spec.grad_accum
        return real_losses(batch, step)

    loop.stage.losses = one_second_per_step
    loop.clock = lambda: clock["now"]
    return loop


def test_time_budget_ends_the_stage_and_the_schedules_follow_the_fraction_used(tmp_path):
    loop = make_timed_loop(tmp_path, budget_s=10.0)
    loop.run()
    assert loop.step == 10  # ten one-second steps, not the spec's 100
    _, state = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    assert state["step"] == 10 and state["spent_s"] == 10.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr/model"] for r in records if "lr/model" in r]
    # step k starts when k-1 of the 10 seconds are spent: schedule position (k-1)/10 of 100 steps
    assert lrs == pytest.approx([1e-2 * lr_factor((k - 1) * 10, loop.spec) for k in range(1, 11)])
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(1e-2)  # warm-up: a tenth of the budget
    assert lrs[-1] < lrs[1]  # and the linear decay ran over the rest


def test_time_budget_resume_counts_the_time_already_spent(tmp_path):
    straight = make_timed_loop(tmp_path / "a", budget_s=10.0)
    straight.run()
    first = make_timed_loop(tmp_path / "b", budget_s=10.0)
    first.run(4)  # stopped after 4 of the 10 seconds (here by a step cap)
    torch.manual_seed(999)
    resumed = make_timed_loop(tmp_path / "b", budget_s=10.0, clock_start=5000.0)  # a new process's clock
    assert resumed.resume() and resumed.spent_before == 4.0
    resumed.run()
    assert resumed.step == 10
    for (k, a), b in zip(straight.stage.model.state_dict().items(), resumed.stage.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


CPUINFO_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
CPUINFO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16\n"


def test_auto_precision_picks_bf16_on_the_cpu_only_where_it_computes_bf16_natively(tmp_path, monkeypatch):
    avx2, bf16 = tmp_path / "avx2", tmp_path / "bf16"
    avx2.write_text(CPUINFO_AVX2)
    bf16.write_text(CPUINFO_BF16)
    (tmp_path / "amx").write_text(CPUINFO_AVX2.replace("fma", "fma amx_bf16 amx_tile"))
    # AVX-512 without its BF16 extension emulates bf16 in software, as AVX2 does
    (tmp_path / "avx512").write_text(CPUINFO_BF16.replace(" avx512_bf16", ""))
    assert not cpu_has_native_bf16(avx2) and not cpu_has_native_bf16(tmp_path / "avx512")
    assert not cpu_has_native_bf16(tmp_path / "missing")
    assert cpu_has_native_bf16(bf16) and cpu_has_native_bf16(tmp_path / "amx")

    cpu = torch.device("cpu")
    for info, auto in ((avx2, None), (bf16, torch.bfloat16)):
        monkeypatch.setattr(loop_module, "CPUINFO", info)
        assert autocast_dtype("auto", cpu) is auto
        assert autocast_dtype("fp32", cpu) is None  # an explicit setting always wins
        assert autocast_dtype("bf16", cpu) is torch.bfloat16


def test_lr_schedule_shape():
    spec = OptimSpec(max_steps=100, warmup_steps=10, lr_decay="cosine")
    assert lr_factor(0, spec) == pytest.approx(0.1)
    assert lr_factor(9, spec) == pytest.approx(1.0)
    assert lr_factor(10, spec) == pytest.approx(1.0)
    assert lr_factor(100, spec) == pytest.approx(0.1)
    assert lr_factor(55, spec) == pytest.approx(0.55)  # cosine midpoint: 0.1 + 0.9 * 0.5


def test_batch_stream_is_a_permutation_per_epoch_and_disjoint_across_ranks():
    data = ToyData(40)
    streams = [BatchStream(data, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    orders = [s.epoch_order(0) for s in streams]
    assert not set(orders[0]) & set(orders[1])
    assert sorted(orders[0] + orders[1]) == list(range(40))
    assert streams[0].epoch_order(1) != orders[0]


# -- the diffusion objective ----------------------------------------------------------------
def test_each_epoch_reports_its_own_unreadable_items_once(caplog):
    from n2a_core.training.batching import SkipCounter

    class Broken(ToyData):
        """Items 3 and 7 are unreadable: None, counted as the image datasets do."""

        def __init__(self):
            super().__init__(n=16)
            self.skipped = SkipCounter()

        def __getitem__(self, i):
            if i in (3, 7):
                self.skipped.add(f"item{i}")
                return None
            return super().__getitem__(i)

    def collate(items):
        return torch.utils.data.default_collate([item for item in items if item is not None])

    data = Broken()
    _ = [data[i] for i in range(8)]  # a preview read between passes
    batches = iter(BatchStream(data, 4, seed=0, collate=collate))
    with caplog.at_level("WARNING", logger="n2a_core"):
        for _ in range(4 + 4 + 1):  # two whole epochs and the start of a third
            next(batches)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1"], lines
    assert all("skipped 2 unreadable images" in line and "item3" in line and "item7" in line for line in lines)


def test_add_noise_matches_closed_form():
    schedule = CosineSchedule()
    z0, eps = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    t = torch.tensor([0, 10, 500, 900, 999])
    f = torch.cos(((t.double() + 1) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    a = f / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    a = a.clamp(max=1).float().view(-1, 1, 1, 1)
    expected = a.sqrt() * z0 + (1 - a).sqrt() * eps
    # the last steps are affected by beta clipping; compare where it has not happened
    torch.testing.assert_close(schedule.add_noise(z0, eps, t)[:4], expected[:4], rtol=1e-4, atol=1e-5)


def test_prediction_targets():
    z0, eps = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    a = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    assert torch.equal(prediction_target("epsilon", z0, eps, a), eps)
    assert torch.equal(prediction_target("sample", z0, eps, a), z0)
    v = prediction_target("v", z0, eps, a)
    av = a.float().view(-1, 1, 1, 1)
    torch.testing.assert_close(v, av.sqrt() * eps - (1 - av).sqrt() * z0)


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "sample"), torch.tensor([0.5, 5.0, 5.0]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))


def test_condition_drop_is_per_sample_with_rate_p_uncond():
    g = torch.Generator().manual_seed(0)
    drops = torch.stack([draw_condition_drop(64, 0.1, g) for _ in range(200)])
    rate = drops.float().mean().item()
    assert abs(rate - 0.1) < 0.01
    per_batch = drops.float().mean(1)
    assert ((per_batch > 0) & (per_batch < 1)).float().mean() > 0.9  # mixed within batches


class OracleEps(nn.Module):
    """Returns the noise it is handed through a side channel: loss must be exactly zero."""

    prediction_type = "epsilon"

    def __init__(self, schedule):
        super().__init__()
        self.schedule, self.z0 = schedule, None

    def forward(self, z_t, t, cond=None, drop=None):
        a = self.schedule.alpha_bar(t.long()).float().view(-1, 1, 1, 1)
        return (z_t - a.sqrt() * self.z0) / (1 - a).sqrt()


def test_diffusion_loss_is_zero_for_the_exact_predictor_and_positive_otherwise():
    schedule = LinearSchedule()
    oracle = OracleEps(schedule)
    z0 = torch.randn(16, 4, 4, 4)
    oracle.z0 = z0
    g = torch.Generator().manual_seed(0)
    assert diffusion_loss(oracle, schedule, z0, None, None, g).item() < 1e-8
    oracle.z0 = z0 + 0.5
    assert diffusion_loss(oracle, schedule, z0, None, None, g).item() > 1e-3


def test_ema_math():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=1)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 0.1))
    ema.update(model, step=2)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 0.19))
    warm = EMA(model, decay=0.999, warmup=10)
    assert warm.decay_at(0) == 0.0 and warm.decay_at(10) == pytest.approx(0.5)
    assert warm.decay_at(10**6) == pytest.approx(0.999)


def test_ema_skips_what_it_is_told_and_copies_the_rest():
    """The autoencoder's average leaves the discriminator out: skipped tensors are neither
    averaged nor overwritten, and a module of another shape is refused."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.0)
        model[1].weight.fill_(5.0)
    ema = EMA(model, decay=0.5, warmup=0, skip=frozenset({"1.weight"}))
    assert set(ema.shadow) == {"0.weight"}
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[1].weight.fill_(7.0)
    ema.update(model, step=1)
    ema.copy_to(model)
    torch.testing.assert_close(model[0].weight, torch.full((1, 2), 1.0))
    torch.testing.assert_close(model[1].weight, torch.full((1, 1), 7.0))
    with pytest.raises(KeyError, match="does not match"):
        ema.copy_to(nn.Sequential(nn.Linear(2, 1, bias=False)))


def test_diffusion_spec_defaults_are_paperlike():
    spec = DiffusionTrainingSpec()
    assert spec.p_uncond == 0.1 and 0.99 <= spec.ema_decay < 1


def test_loop_reads_logs_from_the_device_only_when_it_logs(tmp_path, monkeypatch):
    """On a GPU every float(tensor) waits for the queue: the step must not read its loss or
    gradient norm back; the loop does, once for all values, every log_every steps."""
    from n2a_core.training import loop as loop_module

    reads, logged_steps = [], []
    real_host_values = loop_module.host_values

    def counting_host_values(logs):
        logged_steps.append(loop.step)
        return real_host_values(logs)

    def refuse(self, *args):
        reads.append(tuple(self.shape))
        raise AssertionError("a tensor value was read inside the training step")

    loop = make_loop(tmp_path, max_steps=7)
    monkeypatch.setattr(loop_module, "host_values", counting_host_values)
    real_step = loop.train_step

    def guarded_step(batches):
        # Loading reads CPU index tensors, which costs no GPU wait: draw the batches first.
        drawn = [next(batches) for _ in range(loop.spec.grad_accum)]
        with monkeypatch.context() as m:
            for name in ("item", "__float__"):
                m.setattr(torch.Tensor, name, refuse)
            logs = real_step(iter(drawn))
        assert isinstance(logs["loss/model"], torch.Tensor) and isinstance(logs["grad_norm/model"], torch.Tensor)
        return logs

    loop.train_step = guarded_step
    loop.run()
    assert not reads and logged_steps == [2, 4, 6, 7]  # log_every=2, and the last step
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["loss/model"], float) for r in records if "loss/model" in r)
