"""Options shared by every `lth` subcommand module."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from lth.config import Params

PARAMS_OPTION = click.option(
    "--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
    help="Study parameters (YAML).",
)
ENGINE_OPTION = click.option("--engine", "engine", type=click.Choice(["local", "ray"]), default=None,
                             help="Executor (default: engine.kind in params.yaml).")
ADDRESS_OPTION = click.option("--address", default=None, help="Ray cluster host:port (default: engine.address).")


def with_engine(params: Params, engine: str | None, address: str | None) -> Params:
    """params with --engine / --address applied over engine.kind / engine.address."""
    return replace(params, engine=replace(params.engine, kind=engine or params.engine.kind,
                                          address=address or params.engine.address))
