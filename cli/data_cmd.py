"""`n2a data ...` (placeholder until the data issue lands)."""

import typer

app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
