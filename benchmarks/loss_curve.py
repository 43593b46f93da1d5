"""Loss curves of stage 2 in fp32 and under bf16 autocast, on a tiny fixed data set.

Two runs of n2a's own stage-2 loop (`DiffusionStage` + `TrainingLoop.train_step`: R64
UNet, AdamW, warm-up and cosine decay, gradient clipping, EMA) that differ only in
`training.precision`: same initial weights, same batches, same t and eps draws. The
data set is 64 fixed latents (smooth random fields of unit variance, 4 x 16 x 16), so
the loss keeps falling over a few hundred steps and any precision effect shows.

Reported: the mean loss of the last 50 steps of each run, the relative gap between them,
the largest relative gap between the two 25-step moving averages, and the speed of each.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    R64,
    SIZES,
    Row,
    Size,
    base_parser,
    emit,
    machine,
    n2a_unet,
    setup_torch,
)

WINDOW = 25


def smooth_latents(count: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """`count` latents made of a few low-frequency waves per channel, scaled to unit variance."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = torch.zeros(count, c, h, w)
    for _ in range(4):
        fy, fx, phase = (torch.rand(count, c, 1, 1, generator=g) * s for s in (3, 3, 2 * math.pi))
        amplitude = torch.randn(count, c, 1, 1, generator=g)
        out += amplitude * torch.sin(2 * math.pi * (fy * y + fx * x) + phase)
    return (out - out.mean()) / out.std()


def moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[i - window:i]) / window for i in range(window, len(values) + 1)]


def train_curve(denoiser, latents: torch.Tensor, precision: str, steps: int, size: Size,
                device: torch.device, out: Path) -> tuple[list[float], float]:
    """Per-step losses of one stage-2 run, and its seconds per step."""
    from n2a_core import get_registry
    from n2a_core.diffusion_model import DiffusionModel
    from n2a_core.specs import DiffusionTrainingSpec
    from n2a_core.training.batching import BatchStream
    from n2a_core.training.diffusion_stage import DiffusionStage
    from n2a_core.training.latent_cache import LatentDataset
    from n2a_core.training.loop import TrainingLoop
    from n2a_core.training.run import collate_latents

    registry = get_registry()
    schedule = registry.build("schedule", registry.validate_spec("schedule", {"type": "cosine"}))
    spec = DiffusionTrainingSpec(batch_size=size.batch, max_steps=steps, warmup_steps=min(20, steps // 5),
                                 precision=precision)
    n = len(latents)
    dataset = LatentDataset(latents, None, {"label": [""] * n, "caption": [""] * n, "key": [str(i) for i in range(n)]})
    stage = DiffusionStage(DiffusionModel(denoiser, None), None, schedule, None, spec, device, 0, out,
                           size.latent_shape)
    stream = BatchStream(dataset, size.batch, 0, collate_latents)
    loop = TrainingLoop(stage, spec, stream, out, device=device, spec_digest="benchmark")
    batches = iter(stream)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(float(loop.train_step(batches)["loss/model"]))
    return losses, (time.perf_counter() - start) / steps


def run(size: Size = R64, steps: int = 300, device: torch.device | None = None) -> dict:
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    denoiser = n2a_unet(size).to(device)
    latents = smooth_latents(64, size.latent_shape)
    curves, speed = {}, {}
    with tempfile.TemporaryDirectory(prefix="n2a-bench-loss-") as tmp:
        for precision in ("fp32", "bf16"):
            curves[precision], speed[precision] = train_curve(copy.deepcopy(denoiser), latents, precision, steps,
                                                              size, device, Path(tmp) / precision)
    tail = min(50, steps)
    final = {p: sum(c[-tail:]) / tail for p, c in curves.items()}
    window = min(WINDOW, steps)
    fp32_avg, bf16_avg = (moving_average(curves[p], window) for p in ("fp32", "bf16"))
    max_gap = max(abs(b - a) / a for a, b in zip(fp32_avg, bf16_avg, strict=True))
    metrics = {
        "loss_steps": steps, "loss_final_fp32": final["fp32"], "loss_final_bf16": final["bf16"],
        "loss_first_fp32": curves["fp32"][0], "loss_first_bf16": curves["bf16"][0],
        "loss_final_gap": (final["bf16"] - final["fp32"]) / final["fp32"],
        "loss_max_smoothed_gap": max_gap,
        "loss_curve_bf16_speedup": speed["fp32"] / speed["bf16"],
    }
    rows = [Row(f"loss at step {i + 1} fp32 / bf16", curves["fp32"][i], "", f"bf16 {curves['bf16'][i]:.4f}")
            for i in sorted({0, *range(WINDOW - 1, steps, max(WINDOW, steps // 8)), steps - 1})]
    rows += [
        Row(f"mean loss of the last {tail} steps, fp32", final["fp32"], ""),
        Row(f"mean loss of the last {tail} steps, bf16", final["bf16"], ""),
        Row("loss_final_gap (bf16 - fp32) / fp32", metrics["loss_final_gap"], ""),
        Row(f"loss_max_smoothed_gap ({window}-step averages)", max_gap, ""),
        Row("bf16 step speed-up in this run", metrics["loss_curve_bf16_speedup"], "x",
            f"{speed['fp32'] * 1e3:.0f} vs {speed['bf16'] * 1e3:.0f} ms/step (wall)"),
    ]
    return {"benchmark": "loss_curve", "size": size.name, "batch": size.batch, "metrics": metrics, "rows": rows,
            "curves": curves}


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    args = parser.parse_args(argv)
    device = setup_torch(args.threads, args.device)
    result = run(SIZES[args.size], args.steps if not args.quick else min(args.steps, 60), device)
    rows = result.pop("rows")
    result["machine"] = machine(device)
    steps = result["metrics"]["loss_steps"]
    emit(result, rows, f"stage-2 loss, fp32 vs bf16 autocast, {result['size']}, {steps} steps")


if __name__ == "__main__":
    main()
