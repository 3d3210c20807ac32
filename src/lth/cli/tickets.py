"""`lth tickets list|fetch`: the registered tickets, by source and sparsity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lth.cli.options import PARAMS_OPTION
from lth.config import load_params


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[str]:
    """Aligned text table lines (header first)."""
    cells = [[f"{r[c]:.4f}" if c == "sparsity" else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return lines


@click.group("tickets")
def tickets() -> None:
    """Registered tickets (MLflow model registry): list them, fetch one by source and sparsity."""


@tickets.command("list")
@click.option("--source", default=None, help="Only tickets found on this source dataset.")
@PARAMS_OPTION
def list_cmd(source: str | None, params_path: str) -> None:
    """Print the registered ticket versions as a table."""
    from lth.tracking.mlflow.query import COLUMNS, list_tickets

    rows = list_tickets(load_params(Path(params_path)), source)
    if not rows:
        click.echo("no tickets registered" + (f" for source {source!r}" if source else "") +
                   " (run `lth imp SOURCE` with tracking.register: true)")
        return
    for line in _table(rows, COLUMNS):
        click.echo(line)


@tickets.command("fetch")
@click.option("--source", required=True, help="Source dataset the ticket was found on.")
@click.option("--sparsity", required=True, type=click.FloatRange(0, 1), help="Wanted fraction of weights pruned.")
@click.option("--seed", type=int, default=None, help="Only this seed (default: the lowest seed nearest).")
@click.option("--arch", default=None, help="Architecture name, when a source has several.")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Largest accepted distance between the requested and the chosen sparsity.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write the ticket to (replaced if it holds a ticket).")
@PARAMS_OPTION
def fetch_cmd(source: str, sparsity: float, seed: int | None, arch: str | None, tolerance: float,
              out_dir: str, params_path: str) -> None:
    """Download the registered ticket nearest SPARSITY into DIR and verify it."""
    from lth.tracking.mlflow.query import fetch_ticket

    out, row = fetch_ticket(load_params(Path(params_path)), source, sparsity, seed, arch,
                            out_dir=out_dir, tolerance=tolerance)
    click.echo(f"chose {row['model']} version {row['version']} ({row['alias']}): sparsity {row['sparsity']:.4f} "
               f"(asked {sparsity:.4f}), round {row['round']}, seed {row['seed']}")
    click.echo(f"wrote ticket to {out}")
