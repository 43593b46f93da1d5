"""The `n2a` application: command groups assembled in `create_app`."""

from __future__ import annotations

import typer

from cli import data_cmd, eval_cmd, export_cmd, plugins_cmd, report_cmd, sample_cmd, spec_cmd, train_cmd


def create_app() -> typer.Typer:
    """A fresh Typer app (tests build their own)."""
    app = typer.Typer(
        name="n2a",
        help="Noise2Art: train and sample latent-diffusion image generators on your art collections.",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
    )
    app.command("train")(train_cmd.train)
    app.command("sample")(sample_cmd.sample)
    app.command("export")(export_cmd.export)
    app.command("train-autoencoder")(train_cmd.train_autoencoder)
    app.command("eval-autoencoder")(train_cmd.eval_autoencoder)
    app.command("eval")(eval_cmd.evaluate)
    app.command("report")(report_cmd.report)
    app.command("list-plugins")(plugins_cmd.list_plugins)
    app.add_typer(spec_cmd.app, name="spec")
    app.add_typer(data_cmd.app, name="data")
    return app


def main() -> None:
    create_app()()
