"""The report's pages: Tables 2 and 3, the figures, the parameters and the gaps, as HTML and as Markdown."""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from lth.config import Params, to_dict
from lth.fsutil import atomic_write_text
from lth.report.figures import FigureRef

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


def table2_display(table2: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Table 2 as readable strings; the winner's accuracy is starred."""
    rows = []
    for r in table2.itertuples(index=False):
        best, scratch = _acc(r.best_mean, r.best_std, r.best_n), _acc(r.scratch_mean, r.scratch_std, r.scratch_n)
        significant = "—" if pd.isna(r.significant) else ("yes" if r.significant else "no")
        rows.append({
            "Target": r.target, "Model": r.label, "Best round": r.best_round,
            "Fraction pruned": f"{r.fraction_pruned:.2%}",
            "Best pruned test acc": ("★ " if r.winner == "pruned" else "") + best,
            "Scratch test acc": ("★ " if r.winner == "scratch" else "") + scratch,
            "Winner": r.winner or "—", "Welch p": "—" if math.isnan(r.p_value) else f"{r.p_value:.3g}",
            f"Significant (p < {alpha:g})": significant, "Note": r.note,
        })
    return pd.DataFrame(rows)


def table3_display(table3: pd.DataFrame) -> pd.DataFrame:
    """Table 3 as readable strings."""
    return pd.DataFrame({
        "Target": table3["target"], "Model": table3["label"], "Best round": table3["best_round"],
        "Fraction of weights pruned": [f"{f:.2%}" for f in table3["fraction_pruned"]],
        "Weights remaining": [f"{f:.2%}" for f in table3["fraction_remaining"]],
    })


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


def render_html(params: Params, t2: pd.DataFrame, t3: pd.DataFrame, missing: pd.DataFrame,
                figures: dict[str, list[FigureRef]], stamp: str) -> str:
    """The self-contained report page (figures are linked PNGs beside it)."""
    esc = html.escape
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
mean ± std over seeds; ★ marks the higher mean. Welch's t-test compares the best round's seeds with scratch's.</p>
<h2 id="partial-results">Missing / partial results</h2>
<div class="{status}"><p>{esc(_partial_intro(missing))}</p>
{"" if missing.empty else html_table(missing, "missing")}</div>
<h2>Table 2: best pruned model vs a dense network trained from scratch</h2>
{html_table(t2, "table2")}
<h2>Table 3: fraction of weights pruned at which each best model was found</h2>
{html_table(t3, "table3")}
<h2>Figures</h2>
{figs or "<p><em>No figures: no results to plot.</em></p>"}
<h2>Study parameters</h2>
<pre>{esc(study_parameters(params))}</pre>
</body></html>
"""


def render_markdown(params: Params, t2: pd.DataFrame, t3: pd.DataFrame, missing: pd.DataFrame,
                    figures: dict[str, list[FigureRef]], stamp: str) -> str:
    """The same report in Markdown."""
    figs = "\n\n".join(f"### {target}\n\n" + "\n\n".join(f"![{f.title}]({f.path})" for f in refs)
                       for target, refs in figures.items())
    partial = _partial_intro(missing) + ("" if missing.empty else "\n\n" + md_table(missing))
    return f"""# Lottery-ticket transfer study

Generated {stamp} by `lth report`. Accuracies are test accuracy of the best-validation weights, mean ± std
over seeds; ★ marks the higher mean. Welch's t-test compares the best round's seeds with scratch's.

## Missing / partial results

{partial}

## Table 2: best pruned model vs a dense network trained from scratch

{md_table(t2)}

## Table 3: fraction of weights pruned at which each best model was found

{md_table(t3)}

## Figures

{figs or "_No figures: no results to plot._"}

## Study parameters

```yaml
{study_parameters(params)}```
"""


def write_pages(reports: Path, params: Params, table2: pd.DataFrame, table3: pd.DataFrame, missing: pd.DataFrame,
                figures: dict[str, list[FigureRef]]) -> Path:
    """Write reports/index.html and reports/report.md atomically; return index.html."""
    t2, t3 = table2_display(table2, params.report.alpha), table3_display(table3)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    index = reports / "index.html"
    atomic_write_text(reports / "report.md", render_markdown(params, t2, t3, missing, figures, stamp))
    atomic_write_text(index, render_html(params, t2, t3, missing, figures, stamp))
    return index
