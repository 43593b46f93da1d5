"""What every command shares: the rich console and the user-error boundary."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from n2a_core.errors import N2AError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print an N2AError as short red bullets and exit 1; let real bugs raise."""
    try:
        yield
    except N2AError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            # escaped: a line quotes user input, and '[/x]' in a key is text, not rich markup
            err_console.print(f"[red]✗[/red] {escape(line)}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]: everything written so far is kept")
        raise typer.Exit(130) from None

