"""Rich progress bars with loss, it/s and ETA, used by every long-running command."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def progress_bar(description: str, total: int, completed: int = 0, enabled: bool = True) -> Iterator:
    """Yields `update(done, total, logs=None)`; shows loss and speed from `logs`."""
    if not enabled:
        yield lambda *args, **kwargs: None
        return
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[info]}"), TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    ]
    # Refresh rarely when not on a terminal, so logs stay readable.
    with Progress(*columns, console=console, transient=False,
                  refresh_per_second=10 if sys.stderr.isatty() else 0.2) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="", speed="")

        def update(done: int, total_now: int | None = None, logs: dict | None = None) -> None:
            """`logs` None keeps the losses last shown (training reads them every log_every steps)."""
            fields = {}
            if logs:
                fields["info"] = " ".join(f"{k.split('/', 1)[-1]}={v:.4f}" for k, v in logs.items()
                                          if k.startswith("loss/"))
            speed = progress.tasks[0].speed
            progress.update(task, completed=done, total=total_now or total,
                            speed=f"{speed:.2f} it/s" if speed else "", **fields)

        yield update
