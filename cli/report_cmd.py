"""`n2a report`: write RUN/report.html, a static page with the run's curves, grids and results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import console, user_errors


def report(
    run: Annotated[Path | None, typer.Argument(help="Run folder (default: the newest under ./runs).",
                                               show_default=False)] = None,
) -> None:
    """Write RUN/report.html, one page that opens from disk (no server, no network).

    It holds both stages' curves, sample and reconstruction grids over training, eval results,
    the model card and the spec."""
    from n2a_core.components import RunDir, newest_run
    from n2a_core.report import write_report

    with user_errors():
        root = run or newest_run()
        RunDir(root).read_spec_data()  # refuses a folder that is not a run
        path = write_report(root)
    console.print(f"report: [bold]{path}[/bold] ({path.stat().st_size / 1024:.0f} KiB)")
