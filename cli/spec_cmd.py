"""`n2a spec show|schema`: the resolved run spec and its JSON Schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from cli.common import user_errors
from cli.options import ConfigOption, PresetOption, SetOption, plugin_options, resolve_cli_spec
from n2a_core import strict_json

app = typer.Typer(help="Inspect run specs: the resolved values and the JSON Schema.", no_args_is_help=True)


@app.command("show")
@plugin_options
def show(
    config: ConfigOption = None,
    overrides: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML.")] = False,
    preset: PresetOption = "quickstart",
    **plugins: str | None,
) -> None:
    """Print the run spec after defaults, the preset (or config file) and overrides are applied:
    with the same options, exactly what `n2a train` would run."""
    with user_errors():
        spec = resolve_cli_spec(config, overrides, plugins, preset)
    data = spec.model_dump(mode="json")
    typer.echo(strict_json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False), nl=False)


@app.command("schema")
def schema(
    out: Annotated[Path | None, typer.Option(help="Write the schema to this file instead of stdout.")] = None,
) -> None:
    """Print the JSON Schema of the run spec for the installed plugins."""
    from n2a_core.specs import run_spec_model

    with user_errors():
        text = strict_json.dumps(run_spec_model().model_json_schema(), indent=2)
    if out:
        out.write_text(text + "\n")
    else:
        typer.echo(text)
