"""`n2a export`: a trained run as a Hub-ready folder (n2a format) or as diffusers models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from cli.common import console, user_errors


def export(
    run: Annotated[Path, typer.Argument(help="A run folder made by `n2a train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to create (must not exist or be empty).")],
    format: Annotated[Literal["n2a", "diffusers"], typer.Option(
        "--format",
        help="n2a: for `n2a sample` and Pipeline.from_pretrained; diffusers: VQModel + UNet + scheduler.")] = "n2a",
    dtype: Annotated[Literal["fp32", "fp16", "bf16"], typer.Option(help="Dtype of the saved weights.")] = "fp32",
) -> None:
    """Write what sampling needs (EMA weights, spec, labels, sample grid, model card) to --out."""
    with user_errors():
        if format == "diffusers":
            from n2a_core.export_diffusers import export_diffusers

            report = export_diffusers(run, out, dtype=dtype)
        else:
            from n2a_core.export import export_run

            report = export_run(run, out, dtype=dtype)
    console.print(report.summary(), soft_wrap=True)
