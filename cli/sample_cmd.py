"""`n2a sample`: images from a trained run, with prompts or labels and guidance."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import console, user_errors


def sample(
    run: Annotated[Path | None, typer.Argument(help="Run folder (default: the newest under ./runs).",
                                               show_default=False)] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="Caption to draw (repeatable).")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="Class label to draw (repeatable).")] = None,
    conditioner: Annotated[str | None, typer.Option(help="Must match the run's conditioner (a check).")] = None,
    guidance: Annotated[float, typer.Option(help="Guidance weight w: (1+w)·ε(z,c) − w·ε(z,∅); scale s = 1 + w.",
                                            min=0.0)] = 3.0,
    sampler: Annotated[str | None, typer.Option(help="Sampler plugin (default: the run's).")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (default: the sampler's).", min=1)] = None,
    n: Annotated[int, typer.Option("--n", help="Images per prompt/label (or in all, unconditionally).", min=1)] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image i uses seed + i.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: a new RUN/samples/<time>); "
                                             "files already in it are kept, new ones numbered after them.",
                                             show_default=False)] = None,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights.")] = True,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", min=1)] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Draw images from a trained run and write PNGs (with metadata), samples.jsonl and a grid."""
    from n2a_core.errors import SpecError
    from n2a_core.generate import SampleWriter, check_conditions, generate, load_run, new_samples_folder
    from n2a_core.pipeline import newest_run
    from n2a_core.plugins import get_registry
    from n2a_core.progress import progress_bar

    with user_errors():
        if prompt and label:
            raise SpecError("--prompt and --label: give one kind of condition per call")
        root = run or newest_run()
        loaded = load_run(root, device=device, ema=ema)
        if conditioner is not None:
            actual = loaded.spec.conditioner.type if loaded.spec.conditioner else "none"
            if conditioner != actual:
                raise SpecError(f"--conditioner: the run was trained with '{actual}', not '{conditioner}'")
        wanted = list(prompt or label or [])
        field = "caption" if prompt else "label" if label else None
        check_conditions(loaded, wanted, field)
        conditions = [c for c in wanted for _ in range(n)] if wanted else [""] * n
        seeds = [seed + i for i in range(len(conditions))]
        sampler_spec = get_registry().validate_spec("sampler", sampler) if sampler else None
        if sampler_spec is not None and steps is None and hasattr(sampler_spec, "steps"):
            steps = sampler_spec.steps
        sampler_name = sampler or (loaded.spec.sampler.type if loaded.spec.sampler else None)
        records = [{"index": i, "seed": s, "condition": c, "field": field, "guidance": guidance,
                    "sampler": sampler_name, "steps": steps, "ema": ema, "step": loaded.step,
                    "spec_digest": loaded.spec.digest()}
                   for i, (s, c) in enumerate(zip(seeds, conditions, strict=True))]
        # A folder of our own (never another call's), and every image on disk as soon as it exists.
        out_dir = out or new_samples_folder(loaded.run.samples)
        writer = SampleWriter(out_dir, records)
        with progress_bar("sampling", len(seeds)) as bar:
            images = generate(loaded, conditions, seeds, guidance=guidance, sampler_spec=sampler_spec,
                              steps=steps, batch_size=batch_size, progress=lambda done, total: bar(done, total),
                              on_images=writer)
        grid = writer.write_grid(images, nrow=n if wanted else None)
    console.print(f"{len(images)} images in [bold]{out_dir}[/bold]; grid: {grid}")
