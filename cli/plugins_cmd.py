"""`n2a list-plugins`: every installed component, where it came from, and its status."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import console, user_errors
from n2a_core import strict_json
from n2a_core.errors import PluginError, did_you_mean
from n2a_core.kinds import KINDS


def plugin_rows(kind: str | None = None) -> list[dict]:
    """One dict per component, plus one per plugin that failed to load (status 'error')."""
    from n2a_core.plugins import get_registry

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


def _default_text(field) -> str:
    if field.is_required():
        return "required"
    value = field.default if field.default_factory is None else field.default_factory()
    return json.dumps(value) if not isinstance(value, str) else value


def markdown_table(kind: str | None = None) -> str:
    """The README's plugin table: every built-in and installed component with its options."""
    from n2a_core.plugins import get_registry

    lines = ["| kind | name | package | description | options (default) |", "|---|---|---|---|---|"]
    for c in get_registry().all(kind):
        options = ", ".join(
            f"`{name}` ({_default_text(field)})" for name, field in c.spec.model_fields.items() if name != "type"
        )
        lines.append(f"| {c.kind} | `{c.name}` | {c.source.package} | {c.description} | {options} |")
    return "\n".join(lines)


def list_plugins(
    kind: Annotated[str | None, typer.Option(help=f"Only this kind: {', '.join(KINDS)}.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of objects.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the options table used in the README.")] = False,
) -> None:
    """List installed plugins by kind, with their package, version and status."""
    with user_errors():
        if kind is not None and kind not in KINDS:
            raise PluginError(f"--kind: unknown kind '{kind}'{did_you_mean(kind, KINDS)}; kinds: {', '.join(KINDS)}")
        rows = plugin_rows(kind)
    if as_json:
        typer.echo(strict_json.dumps(rows, indent=2))
        return
    if markdown:
        typer.echo(markdown_table(kind))
        return
    table = Table(title="n2a plugins")
    for column in ("kind", "name", "package", "version", "status", "description"):
        table.add_column(column)
    for row in rows:
        status = "[green]ok[/green]" if row["status"] == "ok" else "[red]error[/red]"
        table.add_row(*(escape(row[key] or "-") for key in ("kind", "name", "package", "version")), status,
                      escape(row["description"] or ""))
    console.print(table)


START, END = "<!-- plugins:start -->", "<!-- plugins:end -->"


def readme_with_table(text: str) -> str:
    """README text with the built-in plugin table between its markers regenerated."""
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    rows = [line for line in markdown_table().splitlines()
            if "| n2a |" in line or line.startswith("| kind") or line.startswith("|---")]
    return f"{head}{START}\n" + "\n".join(rows) + f"\n{END}{tail}"


if __name__ == "__main__":  # python -m cli.plugins_cmd README.md: refresh the README table
    import sys
    from pathlib import Path

    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    readme.write_text(readme_with_table(readme.read_text()))
