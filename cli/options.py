"""Options shared by the commands that take a run spec: --config, --set and --<kind>."""

from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

# Only torch-free modules at import time: `n2a --help` builds every option without torch.
from n2a_core.kinds import KINDS
from n2a_core.presets import preset_names

if TYPE_CHECKING:
    from n2a_core.specs import RunSpecBase

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Run spec file (YAML, TOML or JSON).", show_default=False)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a spec field: --set denoiser.base_channels=128 (repeatable).",
                 show_default=False),
]

PresetOption = Annotated[
    str | None, typer.Option(help=f"Starting spec when no --config is given: {', '.join(preset_names())}.")
]


def finite(value: float | tuple[float, ...] | None) -> float | tuple[float, ...] | None:
    """The callback of every float option (and tuple of floats): Click takes 'inf' and 'nan'
    as floats, and nan even passes a min= bound (every comparison with it is false)."""
    for number in value if isinstance(value, tuple) else (value,):
        if number is not None and not math.isfinite(number):
            raise typer.BadParameter(f"must be a finite number, not {number}")
    return value


def plugin_options(command):
    """Give a command one `--<kind> NAME` option per component kind, passed as **plugins.

    The kinds come from n2a_core.kinds, so a new kind gets its option everywhere at once.
    """
    signature = inspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for kind in KINDS.values():
        more = " (repeatable)" if kind.many else ""
        option = typer.Option(f"--{kind.name}", help=f"{kind.name} plugin{more} (see `n2a list-plugins --kind "
                              f"{kind.name}`).", show_default=False, rich_help_panel="Plugins")
        value = list[str] | None if kind.many else str | None
        params.append(inspect.Parameter(f"plugin_{kind.name}", inspect.Parameter.KEYWORD_ONLY,
                                        default=None, annotation=Annotated[value, option]))

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        plugins = {kind: kwargs.pop(f"plugin_{kind}", None) for kind in KINDS}
        return command(*args, **kwargs, **plugins)

    wrapper.__signature__ = signature.replace(parameters=params)
    return wrapper


def resolve_cli_spec(
    config: Path | None, overrides: list[str] | None, plugins: dict[str, str | None], preset: str | None = None
) -> RunSpecBase:
    """The run spec from (a preset or) a config file, --<kind> choices and --set overrides."""
    from n2a_core.presets import preset_path
    from n2a_core.specs import load_run_spec

    path = config if config is not None else (preset_path(preset) if preset else None)
    return load_run_spec(path, plugins=plugins, overrides=overrides or [])
