"""The report's figures: test accuracy against fraction pruned, mean line and ±std band per series (Fig. 3, Fig. 4).

A star marks each series' validation-chosen best round (Table 2); on Fig. 3, a triangle marks a round where a
transferred ticket is significantly better (up) or worse (down) than the target's own ticket (corrected test).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure  # no pyplot: no global state, and PNG output always uses Agg
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from lth.fsutil import atomic_write_bytes
from lth.report.tables import Analysis, series_label

TARGET_COLOR, REINIT_COLOR, SCRATCH_COLOR = "tab:blue", "tab:orange", "black"
SOURCE_COLORS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
MIN_REMAINING = 1e-4  # keeps a fully pruned point on the log axis
VERDICT_MARKERS = {"better": ("^", "significantly better than the target's ticket"),
                   "worse": ("v", "significantly worse than the target's ticket")}


@dataclass(frozen=True)
class Line:
    """One curve of a figure: which series, and how it is drawn."""

    arm: str
    source: str
    size_fraction: float
    label: str
    color: str
    linestyle: str = "-"


@dataclass(frozen=True)
class FigureRef:
    """A written figure: its title and its path relative to the report folder."""

    title: str
    path: str


def _pct(fraction: float) -> str:
    """Percentage with as many decimals as high sparsities need (0%, 36%, 98.6%, 99.94%)."""
    digits = 0 if fraction < 0.95 else 1 if fraction < 0.995 else 2
    return f"{fraction:.{digits}%}"


def _slug(name: str) -> str:
    """A file-name-safe form of a dataset name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _curve(agg_t: pd.DataFrame, line: Line) -> pd.DataFrame:
    """The points of one series, most weights remaining first."""
    sel = agg_t[(agg_t["arm"] == line.arm) & (agg_t["source"] == line.source)
                & (agg_t["size_fraction"] == line.size_fraction)]
    return sel.sort_values("fraction_pruned")


def _format_axis(ax, fractions: np.ndarray) -> None:
    """Log scale of the weights remaining, read left to right as the fraction of weights pruned."""
    remaining = np.unique(np.clip(1.0 - fractions, MIN_REMAINING, 1.0))[::-1]
    ticks = remaining[np.unique(np.linspace(0, len(remaining) - 1, min(len(remaining), 8)).round().astype(int))]
    ax.set_xscale("log")
    ax.set_xlim(remaining.max() * 1.05, remaining.min() / 1.05)  # inverted: pruning grows to the right
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _pct(1.0 - x)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("fraction of weights pruned (log scale of weights remaining)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)


def _remaining(fraction_pruned) -> np.ndarray:
    """x coordinate: the fraction of weights remaining, clipped onto the log axis."""
    return np.clip(1.0 - np.asarray(fraction_pruned, float), MIN_REMAINING, 1.0)


def _series_rows(table: pd.DataFrame, line: Line) -> pd.DataFrame:
    """The rows of a per-series table (Table 2, transfer vs target) that belong to one line."""
    size = table["size_fraction"] if "size_fraction" in table.columns else line.size_fraction  # versus: full sets
    return table[(table["arm"] == line.arm) & (table["source"] == line.source) & (size == line.size_fraction)]


def _mark(ax, curves: list[tuple[Line, pd.DataFrame]], best: pd.DataFrame, versus: pd.DataFrame) -> None:
    """Stars at the validation-chosen rounds; triangles where a transferred ticket beats or trails the target's."""
    starred = False
    for line, c in curves:
        chosen = c[c["round"].isin(_series_rows(best, line)["best_round"])]
        if not chosen.empty:
            ax.plot(_remaining(chosen["fraction_pruned"]), chosen["test_acc_mean"], linestyle="none", marker="*",
                    markersize=13, color=line.color, markeredgecolor="black",
                    label=None if starred else "best round (chosen on validation)")
            starred = True
    shown: set[str] = set()
    for line, c in curves:
        rows = _series_rows(versus, line)
        for verdict, (marker, text) in VERDICT_MARKERS.items():
            hit = c[c["round"].isin(rows.loc[rows["verdict"] == verdict, "round"])]
            if not hit.empty:
                ax.plot(_remaining(hit["fraction_pruned"]), hit["test_acc_mean"], linestyle="none", marker=marker,
                        markersize=9, markerfacecolor="none", markeredgewidth=1.8, color=line.color,
                        label=None if verdict in shown else text)
                shown.add(verdict)


def plot_curves(agg_t: pd.DataFrame, lines: list[Line], title: str, best: pd.DataFrame | None = None,
                versus: pd.DataFrame | None = None) -> bytes | None:
    """PNG of the given series plus the scratch baseline (dashed), with the best-round and significance marks;
    None when no series has data."""
    curves = [(line, _curve(agg_t, line)) for line in lines]
    curves = [(line, c) for line, c in curves if not c.empty]
    if not curves:
        return None
    fig = Figure(figsize=(8, 5), dpi=110)
    ax = fig.subplots()
    for line, c in curves:
        x = _remaining(c["fraction_pruned"])
        mean, std = c["test_acc_mean"].to_numpy(float), np.nan_to_num(c["test_acc_std"].to_numpy(float))
        ax.plot(x, mean, marker="o", markersize=3, color=line.color, linestyle=line.linestyle, label=line.label)
        ax.fill_between(x, mean - std, mean + std, color=line.color, alpha=0.15, linewidth=0)
    _mark(ax, curves, pd.DataFrame(columns=["arm", "source", "best_round"]) if best is None else best,
          pd.DataFrame(columns=["arm", "source", "round", "verdict"]) if versus is None else versus)
    scratch = agg_t[agg_t["arm"] == "scratch"]
    if not scratch.empty:
        mean, std = float(scratch["test_acc_mean"].iloc[0]), float(np.nan_to_num(scratch["test_acc_std"].iloc[0]))
        ax.axhline(mean, color=SCRATCH_COLOR, linestyle="--", linewidth=1.5, label=series_label("scratch", "", "", 1.0))
        ax.axhspan(mean - std, mean + std, color=SCRATCH_COLOR, alpha=0.08, linewidth=0)
    _format_axis(ax, np.concatenate([c["fraction_pruned"].to_numpy(float) for _, c in curves]))
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def figure_lines(agg_t: pd.DataFrame, target: str, colors: dict[str, str]) -> dict[str, tuple[str, list[Line]]]:
    """The figures of one target: name -> (title, lines); Fig. 4 panels only when their arm has results."""
    def sources(arm: str) -> list[str]:
        return sorted(agg_t.loc[agg_t["arm"] == arm, "source"].unique())

    def line(arm: str, source: str, color: str, frac: float = 1.0, style: str = "-") -> Line:
        return Line(arm, source, frac, series_label(arm, source, target, frac), color, style)

    own = line("target", target, TARGET_COLOR)
    transfer = [line("transfer", s, colors[s]) for s in sources("transfer")]
    figures = {"fig3": (f"{target}: transferred tickets vs target tickets vs scratch",
                        [*transfer, own, line("reinit", target, REINIT_COLOR)])}
    if sources("trained"):
        trained = [line("trained", s, colors[s], style=":") for s in sources("trained")]
        figures["fig4_trained"] = (f"{target}: rewound tickets (solid) vs fully trained weights (dotted)",
                                   [*transfer, *trained, own])
    if sources("related"):
        related = [line("related", s, colors[s], style="-.") for s in sources("related")]
        figures["fig4_related"] = (f"{target}: related non-natural source vs natural sources vs target",
                                   [*related, *transfer, own])
    fracs = sorted(agg_t.loc[agg_t["arm"] == "size", "size_fraction"].unique())
    if fracs:
        shades = [to_hex(colormaps["viridis"](v)) for v in np.linspace(0.2, 0.85, len(fracs))]
        size = [line("size", target, c, frac=f, style="--") for f, c in zip(fracs, shades)]
        figures["fig4_size"] = (f"{target}: tickets found on reduced training sets vs the full set", [*size, own])
    return figures


def draw_figures(tables: Analysis, targets: tuple[str, ...] | list[str], out_dir: Path,
                 link_dir: str = "figures") -> dict[str, list[FigureRef]]:
    """Write every figure of every target under out_dir; return them per target, linked as link_dir/NAME.png."""
    agg = tables.agg
    named = sorted(agg.loc[agg["arm"].isin(["transfer", "trained", "related"]), "source"].unique())
    colors = {s: SOURCE_COLORS[i % len(SOURCE_COLORS)] for i, s in enumerate(named)}  # one colour per source everywhere
    written: dict[str, list[FigureRef]] = {}
    for target in targets:
        agg_t = agg[agg["target"] == target]
        best = tables.table2[tables.table2["target"] == target]
        versus = tables.versus[tables.versus["target"] == target]
        written[target] = []
        for name, (title, lines) in figure_lines(agg_t, target, colors).items():
            png = plot_curves(agg_t, lines, title, best, versus if name == "fig3" else None)
            if png is None:
                continue
            rel = f"{name}_{_slug(target)}.png"
            atomic_write_bytes(out_dir / rel, png)
            written[target].append(FigureRef(title, f"{link_dir}/{rel}"))
    return written


KIND_COLORS = {"imp": "tab:blue", "size": "tab:purple", "finetune": "tab:orange"}
TIMELINE_TITLE = "How the study ran: training units per worker over time (lth study run)"


def read_units(path: Path) -> pd.DataFrame | None:
    """The training units `lth study run` ran in this record (skipped and driver units left out); None if none."""
    if not path.is_file():
        return None
    units = pd.read_csv(path, dtype={"worker": str, "host": str, "gpu": str}, keep_default_na=False)
    units = units[units["kind"].isin(list(KIND_COLORS)) & (units["state"] == "done") & (units["end"] > 0)]
    return None if units.empty else units


def plot_timeline(units: pd.DataFrame) -> bytes:
    """PNG: one row per worker (host:pid, or host and GPU), a bar per unit from its start to its end, by kind."""
    units = units.assign(row=[w or f"{h} gpu {g}".strip() for w, h, g in
                              zip(units["worker"], units["host"], units["gpu"])])
    t0 = float(units["start"].min())
    rows = list(units.groupby("row")["start"].min().sort_values().index)  # first to start at the top
    fig = Figure(figsize=(8, 1.6 + 0.35 * len(rows)), dpi=110)
    ax = fig.subplots()
    for kind, color in KIND_COLORS.items():
        sel = units[units["kind"] == kind]
        if sel.empty:
            continue
        y = [rows.index(r) for r in sel["row"]]
        ax.barh(y, sel["end"] - sel["start"], left=sel["start"] - t0, height=0.7, color=color,
                edgecolor="white", linewidth=0.5, label=f"{kind} ({len(sel)})")
        retried = sel[sel["attempts"] > 1]
        if not retried.empty:
            ax.plot(retried["end"] - t0, [rows.index(r) for r in retried["row"]], "kx", markersize=6,
                    label=None)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.invert_yaxis()
    span = float(units["end"].max()) - t0
    ax.set_xlabel(f"seconds since the first unit started (span {span:.0f} s; x: a unit that needed a retry)")
    ax.set_title(TIMELINE_TITLE, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="unit", title_fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def draw_timeline(units_csv: Path, out_dir: Path, link_dir: str = "figures") -> FigureRef | None:
    """timeline.png from results/study/units.csv when `lth study run` wrote one; else None."""
    units = read_units(units_csv)
    if units is None:
        return None
    atomic_write_bytes(out_dir / "timeline.png", plot_timeline(units))
    return FigureRef(TIMELINE_TITLE, f"{link_dir}/timeline.png")
