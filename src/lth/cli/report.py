"""`lth report`: Tables 2 and 3, figures and reports/index.html from the transfer results."""

from __future__ import annotations

from pathlib import Path

import click

from lth.cli.options import PARAMS_OPTION
from lth.config import load_params


@click.command("report")
@PARAMS_OPTION
def report(params_path: str) -> None:
    """Aggregate results/transfer/*.csv over seeds into reports/ (HTML, Markdown, tables, figures)."""
    import pandas as pd

    from lth.report.build import build_report

    params = load_params(Path(params_path))
    index = build_report(params)
    table2 = pd.read_csv(Path(params.paths.reports) / "table2.csv", keep_default_na=False, na_values=[""])
    click.echo(f"report -> {index} (Markdown, table2.csv, table3.csv, figures/ beside it)")
    click.echo(f"metrics -> {Path(params.paths.results) / 'summary.json'}")
    correction = params.report.correction
    click.echo(f"best rounds chosen on validation; Welch p-values {correction}-corrected per target")
    for r in table2.itertuples(index=False):
        p = f"p_{correction}=n/a ({r.note})" if pd.isna(r.p_adjusted) else f"p_{correction}={r.p_adjusted:.3g}"
        click.echo(f"  {r.target:<14} {r.series:<28} round {r.best_round:>2} ({r.fraction_pruned:6.1%} pruned) "
                   f"{r.best_mean:.4f} vs scratch {r.scratch_mean:.4f}  winner={r.winner or '-'} {p}")
