"""What every benchmark shares: the matched n2a / diffusers configurations, a weight
converter that proves the match, the interleaved A/B timer, machine facts, and output.

Timing rules (the machine is shared and noisy): both sides run in one process with the
same torch thread count, alternating A B B A ... after warm-up, and every figure is a
ratio of medians. Each repeat records wall time (`time.perf_counter`) and the process's
CPU time (`time.process_time`). On a shared CPU the wall time also measures the
neighbours (a case descheduled for 100 ms gets 100 ms slower), the CPU time much less,
so on the CPU the headline ratios use CPU time (`--clock wall` switches) and the JSON
always holds both.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
NO_DIFFUSERS = "diffusers is not installed; the benchmarks compare against it: pip install -e '.[bench]'"


def have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def require_diffusers() -> None:
    """Exit 2 with one line when diffusers is missing (the scripts' contract)."""
    if not have_diffusers():
        print(NO_DIFFUSERS, file=sys.stderr)
        raise SystemExit(2)


# -- the matched configurations ------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """One n2a configuration and its diffusers twin.

    R64 is the issue's reference: 64 x 64 images, f = 4, 4 x 16 x 16 latents, UNet channels
    (64, 128, 128), 2 ResNet blocks per level, attention at 8 x 8, 4 x 4 and in the middle,
    8 channels per head; the VQGAN is n2a's default (64, 128, 128 channels, 1 block per level).
    """

    name: str
    image_size: int = 64
    latent_channels: int = 4
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1, 2)
    head_channels: int = 8
    norm_groups: int = 32
    batch: int = 16
    """Latents per training step and images per sampling run."""
    classes: int = 10
    """Class labels of the guided sampling benchmark."""
    cond_dim: int = 128
    """D of the class embedding n2a's UNet reads (the class-label conditioner's default)."""
    ae_channel_mult: tuple[int, ...] = (1, 2, 2)
    ae_base_channels: int = 64
    ae_res_blocks: int = 1
    codebook_size: int = 512

    @property
    def downsample(self) -> int:
        """f of the autoencoder."""
        return 2 ** (len(self.ae_channel_mult) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.image_size // self.downsample
        return (self.latent_channels, s, s)

    def unet_spec(self, conditional: bool = False) -> dict[str, Any]:
        """The n2a denoiser spec (what a user writes under `denoiser:`)."""
        spec = {"type": "unet", "base_channels": self.base_channels, "channel_mult": list(self.channel_mult),
                "num_res_blocks": self.num_res_blocks, "attention_levels": list(self.attention_levels),
                "mid_attention": True, "head_channels": self.head_channels, "norm_groups": self.norm_groups,
                "in_channels": self.latent_channels}
        if conditional:
            spec.update(cond_mode="vector", cond_dim=self.cond_dim)
        return spec

    def vqgan_spec(self) -> dict[str, Any]:
        return {"type": "vqgan", "base_channels": self.ae_base_channels, "channel_mult": list(self.ae_channel_mult),
                "num_res_blocks": self.ae_res_blocks, "z_channels": self.latent_channels,
                "codebook_size": self.codebook_size, "disc_weight": 0.0}


R64 = Size("R64")
TINY = Size("tiny", image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
            norm_groups=8, batch=2, classes=3, cond_dim=8, ae_channel_mult=(1, 2), ae_base_channels=32,
            codebook_size=16)
SIZES = {"R64": R64, "tiny": TINY}


def n2a_unet(size: Size, conditional: bool = False) -> torch.nn.Module:
    """n2a's UNet, built through the plugin registry as a run would build it."""
    from n2a_core import BuildContext, Conditioning, get_registry

    registry = get_registry()
    spec = registry.validate_spec("denoiser", size.unet_spec(conditional))
    ctx = BuildContext(latent_channels=size.latent_channels,
                       conditioning=Conditioning("vector", size.cond_dim) if conditional else None)
    return registry.build("denoiser", spec, ctx)


def diffusers_unet(size: Size, conditional: bool = False) -> torch.nn.Module:
    """diffusers' UNet2DModel at the same size; conditional adds its class-embedding table
    (classes + 1 rows, the last one standing for "no class" under guidance)."""
    from diffusers import UNet2DModel

    levels = range(len(size.channel_mult))
    attention = set(size.attention_levels)
    return UNet2DModel(
        sample_size=size.latent_shape[1], in_channels=size.latent_channels, out_channels=size.latent_channels,
        block_out_channels=tuple(size.base_channels * m for m in size.channel_mult),
        layers_per_block=size.num_res_blocks, attention_head_dim=size.head_channels,
        norm_num_groups=size.norm_groups,
        down_block_types=tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(levels)),
        num_class_embeds=size.classes + 1 if conditional else None,
    )


def n2a_vqgan(size: Size) -> torch.nn.Module:
    from n2a_core import BuildContext, get_registry

    registry = get_registry()
    return registry.build("autoencoder", registry.validate_spec("autoencoder", size.vqgan_spec()), BuildContext())


def diffusers_vqmodel(size: Size) -> torch.nn.Module:
    from diffusers import VQModel

    n = len(size.ae_channel_mult)
    return VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(size.ae_base_channels * m for m in size.ae_channel_mult),
        layers_per_block=size.ae_res_blocks, latent_channels=size.latent_channels,
        num_vq_embeddings=size.codebook_size, vq_embed_dim=size.latent_channels, norm_num_groups=32,
    )


def parameter_count(module: torch.nn.Module, skip: Iterable[str] = ()) -> int:
    """Parameters of `module`, leaving out sub-modules named in `skip` (a discriminator)."""
    skip = tuple(f"{s}." for s in skip)
    return sum(p.numel() for name, p in module.named_parameters() if not name.startswith(skip))


def check_matched(what: str, n2a: int, baseline: int, tolerance: float) -> float:
    """n2a / baseline parameters; AssertionError naming both counts when off by more than tolerance."""
    ratio = n2a / baseline
    assert abs(ratio - 1) <= tolerance, (
        f"{what}: n2a has {n2a:,} parameters and diffusers {baseline:,} ({ratio:.3f}x); "
        f"a matched configuration must be within {tolerance:.0%}")
    return ratio


def load_diffusers_unet_into_n2a(n2a: torch.nn.Module, baseline: torch.nn.Module) -> None:
    """Copy an unconditional UNet2DModel's weights into n2a's UNet of the same size.

    The two are the same network block for block (DDPM layout), so after this both compute
    the same function; the benchmark tests check that, which is what makes the timings a
    like-for-like comparison. Two differences in form: n2a fuses q, k, v into one linear,
    and its sinusoidal embedding puts the sines first where diffusers' default
    (flip_sin_to_cos=True) puts the cosines first.
    """
    sd = {k: v.detach() for k, v in baseline.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def res(n_prefix: str, d_prefix: str) -> None:
        for n_name, d_name in (("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"),
                               ("norm2", "norm2"), ("conv2", "conv2"), ("skip", "conv_shortcut")):
            for p in ("weight", "bias"):
                if f"{d_prefix}.{d_name}.{p}" in sd:
                    out[f"{n_prefix}.{n_name}.{p}"] = sd[f"{d_prefix}.{d_name}.{p}"]

    def attn(n_prefix: str, d_prefix: str) -> None:
        for p in ("weight", "bias"):
            out[f"{n_prefix}.norm.{p}"] = sd[f"{d_prefix}.group_norm.{p}"]
            out[f"{n_prefix}.qkv.{p}"] = torch.cat([sd[f"{d_prefix}.to_{x}.{p}"] for x in "qkv"])
            out[f"{n_prefix}.proj.{p}"] = sd[f"{d_prefix}.to_out.0.{p}"]

    w1 = sd["time_embedding.linear_1.weight"]
    half = w1.shape[1] // 2
    out["time_mlp.0.weight"] = torch.cat([w1[:, half:], w1[:, :half]], dim=1)
    out["time_mlp.0.bias"] = sd["time_embedding.linear_1.bias"]
    for p in ("weight", "bias"):
        out[f"time_mlp.2.{p}"] = sd[f"time_embedding.linear_2.{p}"]
        out[f"conv_in.{p}"] = sd[f"conv_in.{p}"]
        out[f"norm_out.{p}"] = sd[f"conv_norm_out.{p}"]
        out[f"conv_out.{p}"] = sd[f"conv_out.{p}"]

    levels = len(baseline.config.block_out_channels)
    blocks = baseline.config.layers_per_block
    i = 0
    for level in range(levels):
        block = f"down_blocks.{level}"
        for j in range(blocks):
            res(f"down.{i}.res", f"{block}.resnets.{j}")
            if f"{block}.attentions.{j}.to_q.weight" in sd:
                attn(f"down.{i}.attn", f"{block}.attentions.{j}")
            i += 1
        if level < levels - 1:
            for p in ("weight", "bias"):
                out[f"down.{i}.conv.{p}"] = sd[f"{block}.downsamplers.0.conv.{p}"]
            i += 1
    res("mid.res", "mid_block.resnets.0")
    attn("mid.attn", "mid_block.attentions.0")
    res("mid_res", "mid_block.resnets.1")
    i = 0
    for k in range(levels):  # diffusers' up block k is n2a's level levels - 1 - k
        block = f"up_blocks.{k}"
        for j in range(blocks + 1):
            res(f"up.{i}.res", f"{block}.resnets.{j}")
            if f"{block}.attentions.{j}.to_q.weight" in sd:
                attn(f"up.{i}.attn", f"{block}.attentions.{j}")
            if j == blocks and k < levels - 1:
                for p in ("weight", "bias"):
                    out[f"up.{i}.resample.conv.{p}"] = sd[f"{block}.upsamplers.0.conv.{p}"]
            i += 1
    n2a.load_state_dict(out, strict=True)


# -- the machine ----------------------------------------------------------------------------
def setup_torch(threads: int, device: str) -> torch.device:
    """Fix the thread count (the same for both sides) and resolve the device."""
    torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": str(device), "python": platform.python_version(), "load": load_average(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if have_diffusers():
        import diffusers

        info["diffusers"] = diffusers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- the A/B timer ----------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds per call of one case: wall and process CPU time, one entry per repeat."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def spread(self) -> float:
        """(max - min) / median of the wall times: how noisy this case was."""
        return (max(self.wall) - min(self.wall)) / self.median


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleave(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
               device: torch.device | None = None) -> dict[str, Timing]:
    """Time every case `repeats` times, alternating the order each round (A B C, C B A, ...)
    so slow drifts of the machine's load hit all cases alike. Python's garbage collector
    is off while a case runs so it cannot land in one case's timing."""
    sync = synchronizer(device or torch.device("cpu"))
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    sync()
    timings = {name: Timing() for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect(1)  # the young generations: cheap, and a full pass cannot start mid-case
            gc.disable()
            try:
                w0, c0 = time.perf_counter(), time.process_time()
                cases[name]()
                sync()
                timings[name].wall.append(time.perf_counter() - w0)
                timings[name].cpu.append(time.process_time() - c0)
            finally:
                gc.enable()
    return timings


def speedup(n2a: Timing, baseline: Timing) -> dict[str, float]:
    """Throughput ratio n2a / baseline by each clock ({"wall": .., "cpu": ..}): > 1 is faster."""
    return {"wall": baseline.median / n2a.median, "cpu": baseline.cpu_median / n2a.cpu_median}


def headline(metrics: dict[str, Any], key: str, ratios: dict[str, float], clock: str) -> float:
    """Store `key` by the chosen clock, plus `key_wall` and `key_cpu`; returns the headline."""
    metrics[key] = ratios[clock]
    metrics[f"{key}_wall"], metrics[f"{key}_cpu"] = ratios["wall"], ratios["cpu"]
    return ratios[clock]


def default_clock(device: torch.device) -> str:
    """CPU time on the CPU (a shared machine's neighbours barely move it); wall time on a
    GPU, whose work the process's CPU time does not see."""
    return "cpu" if device.type == "cpu" else "wall"


# -- output ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of a benchmark's table."""

    name: str
    value: float
    unit: str
    note: str = ""

    def format(self, width: int) -> str:
        if self.value != 0 and abs(self.value) < 0.01:
            value = f"{self.value:.2e}"
        else:
            value = f"{self.value:,.3f}" if abs(self.value) < 100 else f"{self.value:,.1f}"
        return f"{self.name:<{width}}  {value:>12} {self.unit:<10} {self.note}".rstrip()


def table(rows: list[Row], title: str | None = None) -> str:
    width = max((len(r.name) for r in rows), default=10)
    lines = [f"== {title}"] if title else []
    lines += [r.format(width) for r in rows]
    return "\n".join(lines)


def emit(result: dict[str, Any], rows: list[Row], title: str) -> None:
    """The script contract: a short table, then one JSON object as the last line."""
    print(table(rows, title), flush=True)
    print(json.dumps(result, sort_keys=True), flush=True)


def time_rows(timings: dict[str, Timing], unit_scale: float = 1e3, unit: str = "ms") -> list[Row]:
    return [Row(name, t.median * unit_scale, unit, f"cpu {t.cpu_median * unit_scale:.4g} {unit}, "
                f"spread {t.spread():.0%}, n={len(t.wall)}") for name, t in timings.items()]


def base_parser(description: str):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases (the CI smoke run)")
    parser.add_argument("--size", choices=sorted(SIZES), default="R64", help="matched configuration")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default by --quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both sides (1: on a loaded 2-core machine more "
                             "threads spin at their barriers; see README)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="clock of the headline ratios (default: cpu on a CPU, wall on a GPU); "
                             "the JSON always holds both as *_cpu and *_wall")
    return parser
