"""The `realnet` command line: train, evaluate and run the RealNet anomaly detector."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="realnet",
    help="RealNet anomaly detector: train on normal images with synthetic anomalies, evaluate, predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
