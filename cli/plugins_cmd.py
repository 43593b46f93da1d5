"""`n2a list-plugins`: every installed component, where it came from, and its status."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, user_errors
from n2a_core.errors import PluginError, did_you_mean
from n2a_core.kinds import KINDS
from n2a_core.plugins import get_registry


def plugin_rows(kind: str | None = None) -> list[dict]:
    """One dict per component, plus one per plugin that failed to load (status 'error')."""
    registry = get_registry()
    rows = [
        {"kind": c.kind, "name": c.name, "package": c.source.package, "version": c.source.version,
         "plugin": c.source.name, "description": c.description, "status": "ok"}
        for c in registry.all(kind)
    ]
    for status in registry.plugins.values():
        if status.status == "error":
            rows.append({"kind": None, "name": status.source.name, "package": status.source.package,
                         "version": status.source.version, "plugin": status.source.name,
                         "description": status.error, "status": "error"})
    return rows


def list_plugins(
    kind: Annotated[str | None, typer.Option(help=f"Only this kind: {', '.join(KINDS)}.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of objects.")] = False,
) -> None:
    """List installed plugins by kind, with their package, version and status."""
    with user_errors():
        if kind is not None and kind not in KINDS:
            raise PluginError(f"--kind: unknown kind '{kind}'{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}")
        rows = plugin_rows(kind)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="n2a plugins")
    for column in ("kind", "name", "package", "version", "status", "description"):
        table.add_column(column)
    for row in rows:
        status = "[green]ok[/green]" if row["status"] == "ok" else "[red]error[/red]"
        table.add_row(row["kind"] or "-", row["name"], row["package"], row["version"], status, row["description"] or "")
    console.print(table)
