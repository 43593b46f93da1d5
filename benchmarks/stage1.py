"""Stage 1 of the quickstart: what one optimizer step costs with the preset's autoencoder
recipe against the VQGAN recipe the quickstart used before (until 2026-11-28).

Both autoencoders are built from the quickstart preset's own sections (the baseline with
the VQGAN section swapped back in), trained through `TrainingLoop.train_step` of an
`AutoencoderStage` on the preset's batch size and image size, alternately in one process.
A step costs more once the discriminator starts (`disc_start`): the generator then also
gets the adversarial and feature-matching terms, and the discriminator trains. So each
recipe is timed in both phases, and the whole stage is weighted as the preset runs it
(`disc_start` steps before, `max_steps - disc_start` after). Stage 2 is the same for both
recipes, so the stage-1 ratio bounds the change of the whole quickstart's time.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
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

BASELINE_AUTOENCODER: dict[str, Any] = {
    "type": "vqgan", "base_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4,
    "codebook_size": 256, "perceptual": "none", "disc_start": 1000,
}
"""The quickstart's autoencoder section before the switch to the KL autoencoder."""


class Images(torch.utils.data.Dataset):
    """Fixed random images in [-1, 1]: what a step costs does not depend on their content."""

    def __init__(self, count: int, size: int):
        self.images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i]}


def collate(items: list[dict]) -> dict:
    return {"image": torch.stack([item["image"] for item in items])}


def recipes(preset: str = "quickstart") -> dict[str, Any]:
    """{name: run spec}: the preset as it is, and the preset with the baseline autoencoder
    (and no stage-1 weight average)."""
    from n2a_core.presets import preset_path
    from n2a_core.specs import read_spec_file, resolve_run_spec

    data = read_spec_file(preset_path(preset))
    baseline = copy.deepcopy(data)
    baseline["autoencoder"] = dict(BASELINE_AUTOENCODER)
    baseline["autoencoder_training"].pop("ema_decay", None)
    return {"vqgan (before)": resolve_run_spec(baseline),
            f"{data['autoencoder']['type']} (preset)": resolve_run_spec(data)}


def autoencoder_loop(spec, tspec, device: torch.device, out: Path, images: torch.utils.data.Dataset):
    """A TrainingLoop over `spec`'s stage 1 (the autoencoder freshly built from seed 0) on `images`."""
    from n2a_core.component import BuildContext
    from n2a_core.plugins import get_registry
    from n2a_core.training.autoencoder_stage import AutoencoderStage
    from n2a_core.training.batching import BatchStream
    from n2a_core.training.loop import TrainingLoop

    torch.manual_seed(0)
    autoencoder = get_registry().build("autoencoder", spec.autoencoder, BuildContext(device=device)).to(device)
    size = spec.data.image_size
    stage = AutoencoderStage(autoencoder, tspec, device, torch.zeros(1, 3, size, size), out)
    stream = BatchStream(images, tspec.batch_size, 0, collate)
    return TrainingLoop(stage, tspec, stream, out, device=device, spec_digest="benchmark")


def steps_case(loop, steps: int, first_step: int = 0):
    """A timed case: `steps` optimizer steps of `loop`, always from `first_step` (so every repeat
    trains in the same phase of the loss schedule, e.g. before or after `disc_start`)."""
    batches = iter(loop.stream)

    def case():
        loop.step = first_step
        for _ in range(steps):
            loop.train_step(batches)

    return case


def run(steps: int = 3, repeats: int = 5, device: torch.device | None = None, clock: str | None = None,
        batch: int | None = None) -> dict:
    device = device or torch.device("cpu")
    clock = clock or default_clock(device)
    specs = recipes()
    cases, weights = {}, {}
    with tempfile.TemporaryDirectory(prefix="n2a-bench-stage1-") as tmp:
        for name, spec in specs.items():
            tspec = spec.autoencoder_training
            if batch is not None:
                tspec = tspec.model_copy(update={"batch_size": batch})
            loop = autoencoder_loop(spec, tspec, device, Path(tmp) / name,
                                    Images(tspec.batch_size * 4, spec.data.image_size))
            disc_start = spec.autoencoder.disc_start
            weights[name] = {"before": min(disc_start, tspec.max_steps) / tspec.max_steps,
                             "after": max(tspec.max_steps - disc_start, 0) / tspec.max_steps}
            for phase, first in (("before", 0), ("after", disc_start)):
                cases[f"{name}, {phase} disc_start"] = steps_case(loop, steps, first)
        timings = interleave(cases, repeats, warmup=1, device=device)

    seconds = (lambda t: t.median) if clock == "wall" else (lambda t: t.cpu_median)
    per_step = {k: seconds(t) / steps for k, t in timings.items()}
    stage_s = {name: sum(w * per_step[f"{name}, {phase} disc_start"] for phase, w in weights[name].items())
               for name in specs}
    baseline, preset = list(specs)
    metrics: dict[str, Any] = {"clock": clock}
    for phase in ("before", "after"):
        headline(metrics, f"step_cost_ratio_{phase}_disc_start",
                 {k: 1 / v for k, v in speedup(timings[f"{preset}, {phase} disc_start"],
                                               timings[f"{baseline}, {phase} disc_start"]).items()}, clock)
    metrics["stage1_cost_ratio"] = stage_s[preset] / stage_s[baseline]
    rows = time_rows(timings, 1e3 / steps, "ms/step")
    rows += [Row(f"step cost, preset / vqgan, {phase} disc_start",
                 metrics[f"step_cost_ratio_{phase}_disc_start"], "x", "< 1: the preset's step is cheaper")
             for phase in ("before", "after")]
    rows.append(Row("stage 1 as the preset runs it, preset / vqgan", metrics["stage1_cost_ratio"], "x",
                    f"{weights[preset]['before']:.0%} of the steps before disc_start"))
    return {"benchmark": "stage1", "steps": steps, "repeats": repeats, "clock": clock, "metrics": metrics,
            "rows": rows, "recipes": list(specs), "per_step_s": per_step, "phase_weights": weights}


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed repeat")
    args = parser.parse_args(argv)
    device = setup_torch(args.threads, args.device)
    repeats = args.repeats or (2 if args.quick else 7)
    result = run(args.steps, repeats, device, args.clock)
    rows = result.pop("rows")
    result["machine"] = machine(device)
    emit(result, rows, "quickstart stage 1: cost of one step, the preset's autoencoder against the VQGAN")


if __name__ == "__main__":
    main()
