"""The report's shell: read the results, compute the tables, draw the figures, write the pages and metrics."""

from __future__ import annotations

from pathlib import Path

from lth.config import Params
from lth.fsutil import atomic_dir, atomic_write_json, atomic_write_text
from lth.report.figures import draw_figures, draw_timeline
from lth.report.page import write_pages
from lth.report.tables import analyse, load_results, missing_results, plot_table, summary_json


def build_report(params: Params) -> Path:
    """Write reports/ (pages, tables, figures) and results/ metrics from the transfer results; return index.html."""
    results = Path(params.paths.results)
    reports = Path(params.paths.reports)
    df = load_results(results, params.transfer.targets)
    tables = analyse(df, params.report)
    missing = missing_results(df, params)
    with atomic_dir(reports / "figures") as tmp:  # a figure from an earlier, different study never lingers
        figures = draw_figures(tables, params.transfer.targets, tmp, link_dir="figures")
        timeline = draw_timeline(params.paths.units_csv, tmp, link_dir="figures")
    if timeline is not None:
        figures["the study's run"] = [timeline]
    atomic_write_text(reports / "table2.csv", tables.table2.to_csv(index=False))
    atomic_write_text(reports / "table3.csv", tables.table3.to_csv(index=False))
    atomic_write_text(reports / "transfer_vs_target.csv", tables.versus.to_csv(index=False))
    for target in params.transfer.targets:
        atomic_write_text(results / "plots" / f"{target}.csv", plot_table(tables.agg, target).to_csv(index=False))
    atomic_write_json(results / "summary.json", summary_json(tables.agg, tables.table2))
    return write_pages(reports, params, tables, missing, figures)
