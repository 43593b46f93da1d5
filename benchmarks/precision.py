"""bf16 autocast against fp32: what one optimizer step of each stage of a run spec costs.

`precision: auto` picks bf16 on CUDA devices that have it and on CPUs that compute bf16
natively (AVX-512 BF16, AMX), fp32 elsewhere. This measures whether bf16 pays on the
machine at hand, for a real spec's models and batch sizes (default: the yardstick
candidate, benchmarks/specs/yardstick-candidate.yaml). Each stage
is built twice from the same initial weights, once per precision, and trained through
`TrainingLoop.train_step` alternately in one process: stage 1 on fixed random images, timed
before and after the discriminator starts (`disc_start`), stage 2 on fixed random latents
of the autoencoder's shape. Whether a run *trains as well* in bf16 is a separate question,
answered on the yardstick (docs/quality.md).

    python -m benchmarks.precision [--spec SPEC] [--threads 2]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    REPO,
    Row,
    base_parser,
    default_clock,
    emit,
    headline,
    interleave,
    machine,
    setup_torch,
    speedup,
    time_rows,
)
from benchmarks.stage1 import Images, autoencoder_loop, steps_case

DEFAULT_SPEC = REPO / "benchmarks" / "specs" / "yardstick-candidate.yaml"
PRECISIONS = ("fp32", "bf16")


class Latents(torch.utils.data.Dataset):
    """Fixed random latents with labels from the conditioner's vocabulary."""

    def __init__(self, count: int, shape: tuple[int, int, int], labels: list[str]):
        self.latents = torch.randn(count, *shape, generator=torch.Generator().manual_seed(0))
        self.labels = labels

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        label = self.labels[i % len(self.labels)]
        return {"latent": self.latents[i], "label": label, "caption": label, "key": str(i)}


def diffusion_loop(spec, tspec, device: torch.device, out: Path, vocabulary: list[str]):
    """A TrainingLoop over `spec`'s stage 2 (denoiser and conditioner freshly built from seed 0)."""
    from n2a_core.components import build_components
    from n2a_core.diffusion_model import DiffusionModel
    from n2a_core.training.batching import BatchStream
    from n2a_core.training.diffusion_stage import DiffusionStage
    from n2a_core.training.loop import TrainingLoop
    from n2a_core.training.run import collate_latents

    torch.manual_seed(0)
    p = build_components(spec, vocabulary=vocabulary, device=device)
    size = spec.data.image_size // p.autoencoder.downsample_factor
    shape = (p.autoencoder.latent_channels, size, size)
    model = DiffusionModel(p.denoiser.to(device), p.conditioner.to(device) if p.conditioner else None)
    stage = DiffusionStage(model, p.autoencoder.to(device), p.schedule, None, tspec, device, spec.seed, out, shape)
    stream = BatchStream(Latents(tspec.batch_size * 4, shape, vocabulary), tspec.batch_size, 0, collate_latents)
    return TrainingLoop(stage, tspec, stream, out, device=device, spec_digest="benchmark")


def run(spec_path: Path = DEFAULT_SPEC, steps: int = 3, repeats: int = 5, device: torch.device | None = None,
        clock: str | None = None) -> dict:
    from n2a_core.specs import read_spec_file, resolve_run_spec

    device = device or torch.device("cpu")
    clock = clock or default_clock(device)
    spec = resolve_run_spec(read_spec_file(spec_path))
    vocabulary = [f"class-{i}" for i in range(9)]
    disc_start = getattr(spec.autoencoder, "disc_start", 0)

    cases = {}
    with tempfile.TemporaryDirectory(prefix="n2a-bench-precision-") as tmp:
        for precision in PRECISIONS:
            ae_spec = spec.autoencoder_training.model_copy(update={"precision": precision})
            dm_spec = spec.training.model_copy(update={"precision": precision})
            images = Images(ae_spec.batch_size * 4, spec.data.image_size)
            loop1 = autoencoder_loop(spec, ae_spec, device, Path(tmp) / f"ae-{precision}", images)
            loop2 = diffusion_loop(spec, dm_spec, device, Path(tmp) / f"dm-{precision}", vocabulary)
            cases[f"stage 1 before disc_start, {precision}"] = steps_case(loop1, steps)
            cases[f"stage 1 after disc_start, {precision}"] = steps_case(loop1, steps, disc_start)
            cases[f"stage 2, {precision}"] = steps_case(loop2, steps)
        timings = interleave(cases, repeats, warmup=1, device=device)

    seconds = (lambda t: t.median) if clock == "wall" else (lambda t: t.cpu_median)
    per_step = {name: seconds(t) / steps for name, t in timings.items()}
    metrics: dict[str, Any] = {"clock": clock}
    rows = time_rows(timings, 1e3 / steps, "ms/step")
    for part in ("stage 1 before disc_start", "stage 1 after disc_start", "stage 2"):
        key = "bf16_speedup_" + part.replace(" ", "_")
        value = headline(metrics, key, speedup(timings[f"{part}, bf16"], timings[f"{part}, fp32"]), clock)
        rows.append(Row(f"{part}: fp32 time / bf16 time", value, "x", "> 1: bf16 steps are faster"))
    return {"benchmark": "precision", "spec": str(spec_path), "steps": steps, "repeats": repeats,
            "clock": clock, "metrics": metrics, "rows": rows, "per_step_s": per_step}


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="run spec whose stages are timed")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed repeat")
    args = parser.parse_args(argv)
    device = setup_torch(args.threads, args.device)
    repeats = args.repeats or (2 if args.quick else 7)
    result = run(args.spec, args.steps, repeats, device, args.clock)
    rows = result.pop("rows")
    result["machine"] = machine(device)
    emit(result, rows, f"bf16 autocast against fp32, one optimizer step of each stage of {args.spec.name}")


if __name__ == "__main__":
    main()
