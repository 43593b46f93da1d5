"""`n2a eval`: score a trained generator against its validation split (FD, KID, precision/recall)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, user_errors
from cli.options import SetOption, finite
from n2a_core import strict_json
from n2a_core.seeds import SEED_MAX


def evaluate(
    run: Annotated[Path | None, typer.Argument(help="Run folder (default: the newest under ./runs).",
                                               show_default=False)] = None,
    n: Annotated[int, typer.Option("--n", help="Images to generate.", min=2)] = 1000,
    extractor: Annotated[str | None, typer.Option(help="Feature extractor plugin (default: the run spec's, "
                                                       "random-conv): inception for numbers comparable with papers.",
                                                  show_default=False)] = None,
    overrides: SetOption = None,
    tracker: Annotated[list[str] | None, typer.Option("--tracker", help="Also log the results to this tracker "
                                                      "(repeatable; the run spec's trackers always get them).",
                                                      show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the conditions and of the first image (image i: seed + i).",
                                      min=0, max=SEED_MAX)] = 0,
    guidance: Annotated[float | None, typer.Option(help="Guidance weight w (default: training.preview_guidance).",
                                                   min=0.0, show_default=False, callback=finite)] = None,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (default: the sampler's).", min=1,
                                              show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", min=1)] = 64,
    device: Annotated[str, typer.Option(help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON.")] = False,
) -> None:
    """Score a trained generator against its validation split (FD, KID, precision/recall).

    Draws N images (conditions drawn like the validation split's) and scores them against it:
    Fréchet distance, KID ± its standard error, precision and recall (k=3) and, where the data
    has labels, how often a k-NN classifier puts an image in its condition's class.
    Writes RUN/eval/step-<step>-<extractor>.json and logs the numbers to the run's trackers
    (as eval/* of stage diffusion: RUN/diffusion/metrics.jsonl, TensorBoard, W&B)."""
    from n2a_core.components import RunDir, newest_run
    from n2a_core.evaluation.generator import GeneratorEvaluator, tracker_metrics, write_result
    from n2a_core.generate import load_run
    from n2a_core.plugins import get_registry
    from n2a_core.progress import progress_bar
    from n2a_core.specs import resolve_run_spec
    from n2a_core.tracking import build_trackers

    with user_errors():
        root = run or newest_run()
        spec = resolve_run_spec(RunDir(root).read_spec_data(), plugins={"extractor": extractor, "tracker": tracker},
                                overrides=overrides or [])
        loaded = load_run(root, device=device)
        evaluator = GeneratorEvaluator(spec, spec.extractor, device=loaded.device)
        with progress_bar(f"sampling {n} images", n, 0, not as_json) as bar:
            result = evaluator.evaluate(loaded, n=n, seed=seed, guidance=guidance, steps=steps,
                                        batch_size=batch_size, progress=lambda done, total: bar(done, total))
        path = write_result(result, loaded.run.root / "eval")
        trackers = build_trackers(spec.trackers, root, get_registry())
        try:
            trackers.log_metrics("diffusion", result["step"], tracker_metrics(result))
        finally:
            trackers.close()
    if not as_json:
        table = Table(title=f"{root} at step {result['step']}: {n} images vs {result['reference']['images']} "
                            f"{result['reference']['split']} images ({result['extractor']['type']} features)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        m = result["metrics"]
        for name, value in m.items():
            if name in ("kid_std", "kid_se") or value is None:
                continue
            text = f"{value:.5f} ± {m['kid_se']:.5f}" if name == "kid" else f"{value:.4f}"
            table.add_row(name, text)
        console.print(table)
        console.print(f"written: {path}")
    else:
        typer.echo(strict_json.dumps(result))
