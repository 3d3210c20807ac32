"""The report's pages: the statistics used, Tables 2 and 3, transfer vs target, the figures, the parameters and the
gaps, as HTML and as Markdown."""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from lth.config import Params, ReportConfig, to_dict
from lth.fsutil import atomic_write_text
from lth.report.figures import FigureRef
from lth.report.tables import CORRECTION_NAMES, Analysis, versus_summary

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.partial { border-left: 4px solid #d9822b; background: #fff6ec; padding: 0.5em 1em; }
.complete { border-left: 4px solid #3a9d5d; background: #effaf2; padding: 0.5em 1em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #ddd; }
"""


def _acc(mean: float, std: float, n: int) -> str:
    """Accuracy as `87.31 ± 0.52 % (n=3)`; no std with one seed."""
    if math.isnan(mean):
        return "—"
    spread = f" ± {100 * std:.2f}" if not math.isnan(std) else ""
    return f"{100 * mean:.2f}{spread} % (n={n})"


def _p(p: float) -> str:
    """A p-value, or a dash where there is no test."""
    return "—" if math.isnan(p) else f"{p:.3g}"


def table2_display(table2: pd.DataFrame, cfg: ReportConfig) -> pd.DataFrame:
    """Table 2 as readable strings; the winner's accuracy is starred."""
    rows = []
    for r in table2.itertuples(index=False):
        best, scratch = _acc(r.best_mean, r.best_std, r.best_n), _acc(r.scratch_mean, r.scratch_std, r.scratch_n)
        significant = "—" if pd.isna(r.significant) else ("yes" if r.significant else "no")
        rows.append({
            "Target": r.target, "Model": r.label, "Best round (validation)": r.best_round,
            "Round by test acc": "same" if r.test_best_round == r.best_round else int(r.test_best_round),
            "Fraction pruned": f"{r.fraction_pruned:.2%}",
            "Best pruned test acc": ("★ " if r.winner == "pruned" else "") + best,
            "Scratch test acc": ("★ " if r.winner == "scratch" else "") + scratch,
            "Winner": r.winner or "—", "Welch p": _p(r.p_value), f"p ({cfg.correction})": _p(r.p_adjusted),
            f"Significant (corrected p < {cfg.alpha:g})": significant, "Note": r.note,
        })
    return pd.DataFrame(rows)


def methods(params: Params, table2: pd.DataFrame) -> list[str]:
    """The statistics of this page in plain sentences: selection, test, correction, alpha, seeds."""
    cfg, seeds = params.report, params.transfer.seeds
    differs = table2[table2["test_best_round"] != table2["best_round"]]
    return [
        "Each series' best round is the pruned round with the highest mean validation accuracy over seeds "
        "(the earliest on a tie); the tables show that round's test accuracy (mean ± std over seeds, n = seeds), "
        "so the accuracy reported is not the one the choice maximised.",
        f"{len(differs)} of {len(table2)} series would have picked a different round on test accuracy "
        "(column \"Round by test acc\"); choosing on test accuracy would overstate them."
        if len(differs) else "In every series, test accuracy would have picked the same round as validation.",
        "Test: Welch's two-sided t-test (unequal variances) on the seeds' test accuracies. Table 2 compares each "
        "best model with scratch; the transfer-vs-target table compares a transferred ticket with the target's "
        "own ticket of the same round (same sparsity).",
        f"Correction: {CORRECTION_NAMES[cfg.correction]}; the tests of one table and one target form one family. "
        f"Significant means corrected p < alpha = {cfg.alpha:g}.",
        f"Seeds: {len(seeds)} configured ({', '.join(map(str, seeds))}); a comparison with fewer than "
        f"{cfg.min_seeds} seeds on a side is marked \"too few seeds to test\" and gets no p-value.",
    ]


def versus_display(versus: pd.DataFrame) -> pd.DataFrame:
    """Transfer vs target as one row per target and source (every round is in transfer_vs_target.csv)."""
    return versus_summary(versus).rename(columns=str.capitalize)


def table3_display(table3: pd.DataFrame) -> pd.DataFrame:
    """Table 3 as readable strings."""
    return pd.DataFrame({
        "Target": table3["target"], "Model": table3["label"], "Best round": table3["best_round"],
        "Fraction of weights pruned": [f"{f:.2%}" for f in table3["fraction_pruned"]],
        "Weights remaining": [f"{f:.2%}" for f in table3["fraction_remaining"]],
    })


VERSUS_TEXT = ("Per target and natural source, every pruned round of the transferred ticket against the target's own "
               "ticket of the same round; listed are the rounds where the transferred ticket is significantly better "
               "or worse (corrected). Every round, with its accuracies and p-values, is in transfer_vs_target.csv.")
FIGURE_TEXT = ("★: each series' best round (chosen on validation). On the Figure-3 plots, △ / ▽: a transferred ticket "
               "significantly better / worse than the target's own ticket of the same round (corrected).")


def html_table(df: pd.DataFrame, table_id: str) -> str:
    """An escaped HTML table (an empty table says so)."""
    if df.empty:
        return f'<p id="{table_id}"><em>No rows.</em></p>'
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def md_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (an empty table says so)."""
    if df.empty:
        return "_No rows._"
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def study_parameters(params: Params) -> str:
    """The study's transfer, train, imp and model sections as YAML."""
    sections = {name: to_dict(getattr(params, name)) for name in ("transfer", "train", "imp", "model", "report")}
    return yaml.safe_dump(sections, sort_keys=False, default_flow_style=None)


def _partial_intro(missing: pd.DataFrame) -> str:
    """One sentence on whether every configured result is there."""
    if missing.empty:
        return "All configured results are present (every arm, source, round and seed)."
    return (f"{len(missing)} configured result group(s) are missing or have fewer seeds than configured; "
            "the tables and figures below use what exists.")


def render_html(params: Params, tables: Analysis, missing: pd.DataFrame, figures: dict[str, list[FigureRef]],
                stamp: str) -> str:
    """The self-contained report page (figures are linked PNGs beside it)."""
    esc = html.escape
    t2, t3 = table2_display(tables.table2, params.report), table3_display(tables.table3)
    stats_items = "".join(f"<li>{esc(line)}</li>" for line in methods(params, tables.table2))
    status = "complete" if missing.empty else "partial"
    figs = "".join(
        f"<h3>{esc(target)}</h3>" + "".join(
            f'<figure><img src="{esc(f.path)}" alt="{esc(f.title)}"><figcaption>{esc(f.title)}</figcaption></figure>'
            for f in refs) for target, refs in figures.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lth report</title><style>{CSS}</style></head>
<body>
<h1>Lottery-ticket transfer study</h1>
<p>Generated {esc(stamp)} by <code>lth report</code>. Accuracies are test accuracy of the best-validation weights,
mean ± std over seeds; ★ marks the higher mean.</p>
<h2 id="statistics">Statistics</h2>
<ul>{stats_items}</ul>
<h2 id="partial-results">Missing / partial results</h2>
<div class="{status}"><p>{esc(_partial_intro(missing))}</p>
{"" if missing.empty else html_table(missing, "missing")}</div>
<h2>Table 2: best pruned model vs a dense network trained from scratch</h2>
{html_table(t2, "table2")}
<h2>Table 3: fraction of weights pruned at which each best model was found</h2>
{html_table(t3, "table3")}
<h2>Transferred tickets vs the target's own tickets (paper Sec. 4.2)</h2>
<p>{esc(VERSUS_TEXT)}</p>
{html_table(versus_display(tables.versus), "transfer-vs-target")}
<h2>Figures</h2>
<p>{esc(FIGURE_TEXT)}</p>
{figs or "<p><em>No figures: no results to plot.</em></p>"}
<h2>Study parameters</h2>
<pre>{esc(study_parameters(params))}</pre>
</body></html>
"""


def render_markdown(params: Params, tables: Analysis, missing: pd.DataFrame, figures: dict[str, list[FigureRef]],
                    stamp: str) -> str:
    """The same report in Markdown."""
    t2, t3 = table2_display(tables.table2, params.report), table3_display(tables.table3)
    stats_items = "\n".join(f"- {line}" for line in methods(params, tables.table2))
    figs = "\n\n".join(f"### {target}\n\n" + "\n\n".join(f"![{f.title}]({f.path})" for f in refs)
                       for target, refs in figures.items())
    partial = _partial_intro(missing) + ("" if missing.empty else "\n\n" + md_table(missing))
    return f"""# Lottery-ticket transfer study

Generated {stamp} by `lth report`. Accuracies are test accuracy of the best-validation weights, mean ± std
over seeds; ★ marks the higher mean.

## Statistics

{stats_items}

## Missing / partial results

{partial}

## Table 2: best pruned model vs a dense network trained from scratch

{md_table(t2)}

## Table 3: fraction of weights pruned at which each best model was found

{md_table(t3)}

## Transferred tickets vs the target's own tickets (paper Sec. 4.2)

{VERSUS_TEXT}

{md_table(versus_display(tables.versus))}

## Figures

{FIGURE_TEXT}

{figs or "_No figures: no results to plot._"}

## Study parameters

```yaml
{study_parameters(params)}```
"""


def write_pages(reports: Path, params: Params, tables: Analysis, missing: pd.DataFrame,
                figures: dict[str, list[FigureRef]]) -> Path:
    """Write reports/index.html and reports/report.md atomically; return index.html."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    index = reports / "index.html"
    atomic_write_text(reports / "report.md", render_markdown(params, tables, missing, figures, stamp))
    atomic_write_text(index, render_html(params, tables, missing, figures, stamp))
    return index
