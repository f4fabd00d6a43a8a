"""The `sia` command line: preview, train, generate and publish synthetic anomalies."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sia",
    help="Synthesise realistic anomalies: SDAS diffusion (train, generate) and Perlin x foreground blending (preview).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
