"""Options shared by every `lth` subcommand module."""

from __future__ import annotations

import click

PARAMS_OPTION = click.option(
    "--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
    help="Study parameters (YAML).",
)
