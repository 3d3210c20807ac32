"""`lth report`: aggregate the transfer results over seeds into Tables 2 and 3, figures and one page.

The aggregation functions are pure pandas (DataFrame in, DataFrame out); `build_report` is the shell
that reads `results/transfer/<target>.csv` and writes everything under `reports/` and `results/`.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from lth.config import Params, arm_rounds
from lth.errors import UserError

COLUMNS = (
    "target", "arm", "source", "seed", "round", "fraction_pruned", "size_fraction", "test_acc", "test_loss",
    "val_acc", "val_loss", "best_epoch", "epochs", "seconds",
)
SERIES = ["target", "arm", "source", "size_fraction"]  # one line of a figure, one row of Table 2
CELL = [*SERIES, "round"]  # one point of a line: the seeds of one model
METRICS = ("test_acc", "test_loss", "val_acc")
PRUNED_ARMS = ("transfer", "target", "related", "trained", "reinit", "size")  # Table 2's row order
FEW_SEEDS = "fewer than 2 seeds on a side: no test"


# ---------------------------------------------------------------- reading


def load_results(results_dir: str | Path, targets: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """Concatenate `<results_dir>/transfer/<target>.csv` for every target, normalised; UserError if one is missing."""
    frames = []
    for target in targets:
        path = Path(results_dir) / "transfer" / f"{target}.csv"
        hint = f"run `lth transfer {target}`"
        if not path.is_file():
            raise UserError(f"no results for target {target} ({path} missing): {hint}")
        try:
            names = ("source", "target", "arm")  # an empty source means "none", not a missing value
            frame = pd.read_csv(path, dtype=dict.fromkeys(names, str), keep_default_na=False,
                                na_values={c: ["", "nan", "NaN"] for c in COLUMNS if c not in names})
        except pd.errors.EmptyDataError:
            frame = pd.DataFrame()
        if frame.empty:
            raise UserError(f"no results for target {target} ({path} is empty): {hint}")
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}: rerun `lth transfer {target}`")
        frames.append(frame[list(COLUMNS)])
    df = pd.concat(frames, ignore_index=True)
    df.loc[df["arm"] == "scratch", "source"] = ""  # scratch has no source, whichever way it was written
    df["size_fraction"] = df["size_fraction"].astype(float).round(6)
    df["round"] = df["round"].astype(int)
    df["seed"] = df["seed"].astype(int)
    return df


# ---------------------------------------------------------------- aggregation


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof=1, NaN for one seed) and n_seeds of the metrics per (series, round)."""
    named = {"fraction_pruned": ("fraction_pruned", "mean"), "n_seeds": ("seed", "nunique")}
    for metric in METRICS:
        named[f"{metric}_mean"] = (metric, "mean")
        named[f"{metric}_std"] = (metric, lambda s: s.std(ddof=1))
    agg = df.groupby(CELL, sort=True, dropna=False).agg(**named).reset_index()
    return agg[[*CELL, "fraction_pruned", *[c for c in agg.columns if c not in (*CELL, "fraction_pruned")]]]


def series_key(arm: str, source: str, target: str, size_fraction: float) -> str:
    """Machine name of one series, e.g. `transfer_fashion-mnist`, `target`, `size_0.5`."""
    if arm == "size":
        return f"size_{size_fraction:g}"
    return arm if source in ("", target) else f"{arm}_{source}"


def series_label(arm: str, source: str, target: str, size_fraction: float) -> str:
    """Human name of one series, e.g. `transfer from fashion-mnist`, `size: 50% of training set`."""
    if arm == "size":
        return f"target tickets, {size_fraction:.0%} of training set"
    named = {"scratch": "scratch (dense)", "target": "target tickets", "reinit": "target masks, reinitialised"}
    if arm in named:
        return named[arm]
    verb = {"transfer": "ticket from", "trained": "trained weights from", "related": "related ticket from"}
    return f"{verb.get(arm, arm)} {source}"


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, str]:
    """Welch's two-sided p-value, with the reason when it cannot be computed."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, FEW_SEEDS
    if np.var(a) == 0 and np.var(b) == 0:
        return math.nan, "no spread within either side: no test"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue), ""


def best_models(agg: pd.DataFrame, df: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Table 2: per pruned series, its best round (highest mean test accuracy) beside scratch, with Welch's test."""
    pruned = agg[agg["arm"].isin(PRUNED_ARMS) & (agg["round"] > 0)]
    # earliest round wins a tie: the same accuracy with fewer weights pruned is the less surprising claim
    best = pruned.sort_values([*SERIES, "round"]).loc[lambda t: t.groupby(SERIES)["test_acc_mean"].idxmax()]
    rows = []
    for rec in best.itertuples(index=False):
        scratch = df[(df["target"] == rec.target) & (df["arm"] == "scratch")]["test_acc"].to_numpy(float)
        cell = (df[CELL] == [rec.target, rec.arm, rec.source, rec.size_fraction, rec.round]).all(axis=1)
        chosen = df.loc[cell, "test_acc"].to_numpy(float)
        s_mean = float(scratch.mean()) if len(scratch) else math.nan
        s_std = float(scratch.std(ddof=1)) if len(scratch) > 1 else math.nan
        p_value, note = _welch(chosen, scratch) if len(scratch) else (math.nan, "no scratch baseline")
        winner = "" if math.isnan(s_mean) else ("pruned" if rec.test_acc_mean > s_mean
                                               else "scratch" if rec.test_acc_mean < s_mean else "tie")
        rows.append({
            "target": rec.target, "arm": rec.arm, "source": rec.source, "size_fraction": rec.size_fraction,
            "series": series_key(rec.arm, rec.source, rec.target, rec.size_fraction),
            "label": series_label(rec.arm, rec.source, rec.target, rec.size_fraction),
            "best_round": int(rec.round), "fraction_pruned": rec.fraction_pruned,
            "best_mean": rec.test_acc_mean, "best_std": rec.test_acc_std, "best_n": int(rec.n_seeds),
            "scratch_mean": s_mean, "scratch_std": s_std, "scratch_n": len(scratch),
            "winner": winner, "p_value": p_value,
            "significant": bool(p_value < alpha) if not math.isnan(p_value) else pd.NA, "note": note,
        })
    table = pd.DataFrame(rows, columns=TABLE2_COLUMNS)
    order = {arm: i for i, arm in enumerate(PRUNED_ARMS)}
    return table.sort_values(["target", "arm", "source", "size_fraction"], key=lambda c: c.map(order)
                             if c.name == "arm" else c, kind="stable").reset_index(drop=True)


TABLE2_COLUMNS = [
    "target", "arm", "source", "size_fraction", "series", "label", "best_round", "fraction_pruned", "best_mean",
    "best_std", "best_n", "scratch_mean", "scratch_std", "scratch_n", "winner", "p_value", "significant", "note",
]


def fraction_table(table2: pd.DataFrame) -> pd.DataFrame:
    """Table 3: the fraction of weights pruned (and the round) at which each best model was found."""
    out = table2[[*SERIES, "series", "label", "best_round", "fraction_pruned"]].copy()
    out["fraction_remaining"] = 1.0 - out["fraction_pruned"]
    return out


# ---------------------------------------------------------------- partial results


def expected_series(params: Params, target: str) -> list[tuple[str, str, float]]:
    """The (arm, source, size_fraction) series the configuration asks for on `target`."""
    cfg = params.transfer
    by_arm = {
        "scratch": [("", 1.0)],
        "transfer": [(s, 1.0) for s in cfg.sources],
        "trained": [(s, 1.0) for s in cfg.sources],
        "target": [(target, 1.0)],
        "reinit": [(target, 1.0)],
        "related": [(p.source, 1.0) for p in cfg.related if p.target == target],
        "size": [(target, round(float(f), 6)) for f in cfg.size_fractions],
    }
    return [(arm, src, frac) for arm in cfg.arms for src, frac in by_arm.get(arm, [])]


def missing_results(df: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Configured series with no rows, and rounds with fewer seeds than configured: one row per problem."""
    seeds = set(params.transfer.seeds)
    rows = []
    for target in params.transfer.targets:
        for arm, source, frac in expected_series(params, target):
            label = series_label(arm, source, target, frac)
            cells = df[(df["target"] == target) & (df["arm"] == arm) & (df["source"] == source)
                       & (df["size_fraction"] == frac)]
            if cells.empty:
                rows.append({"target": target, "series": label, "rounds": "all", "problem": "no results"})
                continue
            present = cells.groupby("round")["seed"].agg(set).to_dict()
            gaps: dict[str, list[int]] = {}
            for r in arm_rounds(params, arm):
                lost = sorted(seeds - present.get(r, set()))
                if lost:
                    gaps.setdefault("no results" if len(lost) == len(seeds) else
                                    f"seed(s) {', '.join(map(str, lost))} missing", []).append(r)
            rows += [{"target": target, "series": label, "rounds": ", ".join(map(str, rs)), "problem": problem}
                     for problem, rs in gaps.items()]
    return pd.DataFrame(rows, columns=["target", "series", "rounds", "problem"])


# ---------------------------------------------------------------- DVC metrics and plots


def summary_json(agg: pd.DataFrame, table2: pd.DataFrame) -> dict[str, dict[str, float]]:
    """DVC metrics: per target, scratch's mean test accuracy and each best model's accuracy and sparsity."""
    out: dict[str, dict[str, float]] = {}
    for target in sorted(agg["target"].unique()):
        entry: dict[str, float] = {}
        scratch = agg[(agg["target"] == target) & (agg["arm"] == "scratch")]
        if not scratch.empty:
            entry["scratch_test_acc"] = round(float(scratch["test_acc_mean"].iloc[0]), 6)
        for rec in table2[table2["target"] == target].itertuples(index=False):
            entry[f"best_{rec.series}_test_acc"] = round(float(rec.best_mean), 6)
            entry[f"best_{rec.series}_fraction_pruned"] = round(float(rec.fraction_pruned), 6)
            if not math.isnan(rec.p_value):
                entry[f"best_{rec.series}_p_value"] = round(float(rec.p_value), 6)
        out[target] = entry
    return out


def plot_table(agg: pd.DataFrame, target: str) -> pd.DataFrame:
    """Long-format curve data of one target for `dvc plots`: arm_source, fraction_pruned, test_acc mean/std."""
    rows = agg[agg["target"] == target].copy()
    rows["arm_source"] = [series_key(a, s, target, f)
                          for a, s, f in zip(rows["arm"], rows["source"], rows["size_fraction"])]
    return rows[["arm_source", "round", "fraction_pruned", "test_acc_mean", "test_acc_std", "n_seeds"]]
