"""`n2a train`, `n2a train-autoencoder`, `n2a eval-autoencoder`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import console, user_errors
from cli.options import ConfigOption, PresetOption, SetOption, plugin_options, resolve_cli_spec
from n2a_core import strict_json

OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default: runs/<preset>-<time>).",
                                                 show_default=False)]
MaxStepsOption = Annotated[int | None, typer.Option(
    help="Stop each stage (autoencoder, then diffusion) after this many optimizer steps, e.g. 3 for a smoke "
         "test. The learning-rate schedules still follow the spec's max_steps, so --resume without this flag "
         "continues the run to them.", min=1, show_default=False)]
AutoencoderMaxStepsOption = Annotated[int | None, typer.Option(
    "--max-steps", help="Stop stage 1 after this many optimizer steps (the learning-rate schedule still follows "
                        "autoencoder_training.max_steps).", min=1, show_default=False)]
TimeBudgetOption = Annotated[str | None, typer.Option(
    "--time-budget", help="Train for this long instead of to max_steps, e.g. 30m, 2h, 1h30m (sets the spec's "
    "time_budget): stage 1 gets autoencoder_time_share (default 0.4) of it, stage 2 the rest; learning-rate and "
    "EMA schedules follow the fraction used; --resume counts the time already spent.", show_default=False)]
ResumeOption = Annotated[bool, typer.Option("--resume",
                                              help="Continue the run in --out (default: newest under runs/).")]


def _spec_with_autoencoder_run(config, overrides, plugins, preset):
    """`--autoencoder RUN` names a trained run: take its autoencoder spec and weights."""
    from n2a_core.pipeline import RunDir

    choice = plugins.get("autoencoder")
    if choice and Path(choice).exists():
        run = RunDir(choice)
        section = run.read_spec_data().get("autoencoder")
        plugins = {**plugins, "autoencoder": None}
        # absolute: the run folder must still find the weights when used from elsewhere
        overrides = [f"autoencoder={json.dumps(section)}", f"autoencoder_weights={Path(choice).resolve()}",
                     *(overrides or [])]
    return resolve_cli_spec(config, overrides, plugins, preset=None if config else preset)


def _out_dir(out: Path | None, resume: bool, preset: str, config: Path | None) -> Path:
    from n2a_core.pipeline import newest_run

    if out is not None:
        return out
    if resume:
        return newest_run()
    stem = config.stem if config else preset
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _run_spec_and_folder(config, overrides, plugins, preset, out, resume):
    """The resolved spec and run folder; --resume without --config reuses the run's spec.yaml."""
    out_dir = _out_dir(out, resume, preset, config)
    if resume and config is None and (out_dir / "spec.yaml").is_file():
        config = out_dir / "spec.yaml"
    spec = _spec_with_autoencoder_run(config, overrides, plugins, preset)
    console.print(f"run folder: [bold]{escape(str(out_dir))}[/bold]")
    return spec, out_dir


@plugin_options
def train(
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    max_steps: MaxStepsOption = None,
    time_budget: TimeBudgetOption = None,
    resume: ResumeOption = False,
    preset: PresetOption = "quickstart",
    **plugins: str | None,
) -> None:
    """Train a latent-diffusion model: stage 1 (autoencoder) if needed, then stage 2.

    With no options this runs the quickstart on the embedded OpenMoji art set (CPU, no network).
    --autoencoder takes a plugin name or a trained run folder.
    """
    from n2a_core.training.run import train_run

    if time_budget is not None:
        overrides = [*(overrides or []), f"time_budget={time_budget}"]
    with user_errors():
        spec, out_dir = _run_spec_and_folder(config, overrides, plugins, preset, out, resume)
        started = time.perf_counter()
        with train_run(spec, out_dir, resume=resume, max_steps=max_steps) as session:  # holds the run's lock
            if session.is_main:
                _final_samples(session)
    console.print(f"done in {time.perf_counter() - started:.0f} s: {escape(str(out_dir))}")


FINAL_SEEDS = 4


def _final_samples(session) -> None:
    """A grid for a handful of conditions, a row of seeds each, at the end of training
    (the quickstart's payoff)."""
    from n2a_core.generate import SampleWriter, StepCount, generate, load_run
    from n2a_core.safe_files import new_folder
    from n2a_core.training.run import eval_split, preview_conditions

    loaded = load_run(session.run.root, device=str(session.device))
    tspec = loaded.spec.training
    chosen = preview_conditions(eval_split(session.splits), loaded.conditioner, tspec)
    conditions = [c for c in chosen for _ in range(FINAL_SEEDS)]
    seeds = list(range(FINAL_SEEDS)) * len(chosen)
    guidance = tspec.preview_guidance if loaded.conditioner is not None else 0.0
    records = [{"index": i, "seed": s, "condition": c, "guidance": guidance, "step": loaded.step,
                "sampler": loaded.spec.sampler.type if loaded.spec.sampler else None,
                "steps": getattr(loaded.spec.sampler, "steps", None),
                "spec_digest": loaded.spec.digest()} for i, (s, c) in enumerate(zip(seeds, conditions, strict=True))]
    evaluations = StepCount()
    writer = SampleWriter(new_folder(session.run.samples, "final"), records,  # final, final-2 after a resume, ...
                          steps_used=evaluations)
    images = generate(loaded, conditions, seeds, guidance=guidance, on_images=writer, callback=evaluations)
    grid = writer.write_grid(images, nrow=FINAL_SEEDS)
    console.print(f"samples: [bold]{escape(str(grid))}[/bold]")


@plugin_options
def train_autoencoder(
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: OutOption = None,
    max_steps: AutoencoderMaxStepsOption = None,
    resume: ResumeOption = False,
    preset: PresetOption = "quickstart",
    **plugins: str | None,
) -> None:
    """Train only stage 1 (the autoencoder) and export its weights for `n2a train --autoencoder RUN`."""
    from n2a_core.training.run import prepare_run, train_autoencoder_stage

    with user_errors():
        spec, out_dir = _run_spec_and_folder(config, overrides, plugins, preset, out, resume)
        with prepare_run(spec, out_dir, resume=resume, stage2=False) as session:  # holds the run's lock
            train_autoencoder_stage(session, max_steps)


def eval_autoencoder(
    run: Annotated[Path, typer.Argument(help="A run folder with a trained autoencoder.")],
    overrides: SetOption = None,
    data: Annotated[str | None, typer.Option("--data", help="Evaluate on another data plugin.")] = None,
    batches: Annotated[int | None, typer.Option(help="Evaluate at most this many batches.", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON.")] = False,
) -> None:
    """PSNR, SSIM, L1, codebook usage and perplexity on the validation split."""
    from n2a_core.training.evaluate import evaluate_autoencoder

    with user_errors():
        metrics = evaluate_autoencoder(run, data=data, overrides=overrides or [], max_batches=batches)
    if not as_json:
        table = Table(title=f"autoencoder of {run}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in metrics.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        console.print(table)
    typer.echo(strict_json.dumps(metrics))
