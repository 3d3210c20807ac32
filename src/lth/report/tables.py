"""`lth report`: aggregate the transfer results over seeds into Tables 2 and 3, figures and one page.

The aggregation functions are pure pandas (DataFrame in, DataFrame out); `analyse` runs them all, and
`build_report` is the shell that reads `results/transfer/<target>.csv` and writes everything under
`reports/` and `results/`.

Statistics, and why: a series' best round is chosen on mean *validation* accuracy over seeds and
reported with its *test* accuracy, so the number tested is not the number the choice maximised;
every comparison is Welch's two-sided t-test on the seeds' test accuracies, and the tests of one
table and one target form one family, corrected together (Holm by default) so that picking among
many series and rounds does not manufacture significance.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from lth.config import Params, ReportConfig, arm_rounds
from lth.errors import UserError

COLUMNS = (
    "target", "arm", "source", "seed", "round", "fraction_pruned", "size_fraction", "test_acc", "test_loss",
    "val_acc", "val_loss", "best_epoch", "epochs", "seconds",
)
SERIES = ["target", "arm", "source", "size_fraction"]  # one line of a figure, one row of Table 2
CELL = [*SERIES, "round"]  # one point of a line: the seeds of one model
METRICS = ("test_acc", "test_loss", "val_acc")
PRUNED_ARMS = ("transfer", "target", "related", "trained", "reinit", "size")  # Table 2's row order
SELECT_ON = "val_acc"  # picks a series' best round; the tables then report that round's test_acc
FEW_SEEDS = "too few seeds to test"
NO_SPREAD = "no spread within either side: no test"
NO_SCRATCH = "no scratch baseline"
CORRECTION_NAMES = {  # how the page names each statsmodels method, and what it controls
    "holm": "Holm's step-down correction (family-wise error rate)",
    "bonferroni": "Bonferroni correction (family-wise error rate)",
    "fdr_bh": "Benjamini-Hochberg correction (false discovery rate)",
}


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
        named[f"{metric}_std"] = (metric, "std")  # pandas' std is the sample std (ddof=1), NaN for one seed
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


def welch(mean_a, std_a, n_a, mean_b, std_b, n_b, min_seeds: int) -> tuple[np.ndarray, np.ndarray]:
    """Welch's two-sided p-values from per-side mean, sample std and seed count (vectorised), with a note
    saying why where there is no test (too few seeds, no spread, no baseline)."""
    mean_a, std_a, n_a, mean_b, std_b, n_b = (np.asarray(v, float) for v in (mean_a, std_a, n_a, mean_b, std_b, n_b))
    note = np.full(mean_a.shape, "", dtype=object)
    note[(np.nan_to_num(std_a) == 0) & (np.nan_to_num(std_b) == 0)] = NO_SPREAD
    note[(n_a < min_seeds) | (n_b < min_seeds)] = FEW_SEEDS  # n = 2 gives 1-2 degrees of freedom: no evidence
    note[np.isnan(mean_b)] = NO_SCRATCH
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        p = stats.ttest_ind_from_stats(mean_a, std_a, n_a, mean_b, std_b, n_b, equal_var=False).pvalue
    p = np.where(note == "", np.asarray(p, float), np.nan)
    return p, note


def correct(p_values: pd.Series, family: pd.Series, method: str) -> pd.Series:
    """Adjusted p-values, one family per value of `family`; a missing p-value (no test) is not in any family."""
    p = p_values.to_numpy(float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    for positions in pd.Series(tested).groupby(family.to_numpy()[tested], sort=False).groups.values():
        where = tested[np.asarray(positions)]
        adjusted[where] = multipletests(p[where], method=method)[1]
    return pd.Series(adjusted, index=p_values.index)


def _decide(table: pd.DataFrame, family: pd.Series, cfg: ReportConfig) -> pd.DataFrame:
    """Add p_adjusted and significant (adjusted p < alpha; NA where no test) to a table holding p_value."""
    table["p_adjusted"] = correct(table["p_value"], family, cfg.correction)
    table["significant"] = pd.array([pd.NA if math.isnan(p) else bool(p < cfg.alpha) for p in table["p_adjusted"]],
                                    dtype="boolean")
    return table


def _best_rounds(pruned: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per series, the aggregated row of the round with the highest mean `metric`; the earliest round wins a tie
    (the same accuracy with fewer weights pruned is the less surprising claim)."""
    ordered = pruned.sort_values([*SERIES, "round"]).dropna(subset=[f"{metric}_mean"])
    return ordered.loc[ordered.groupby(SERIES, sort=True)[f"{metric}_mean"].idxmax()].reset_index(drop=True)


def best_models(agg: pd.DataFrame, cfg: ReportConfig) -> pd.DataFrame:
    """Table 2: per pruned series, the round with the best mean validation accuracy, its test accuracy beside
    scratch's, Welch's test, corrected per target; and the round test accuracy alone would have picked."""
    pruned = agg[agg["arm"].isin(PRUNED_ARMS) & (agg["round"] > 0)]
    best = _best_rounds(pruned, SELECT_ON)
    by_test = _best_rounds(pruned, "test_acc").set_index(SERIES)["round"]
    scratch = agg[agg["arm"] == "scratch"].groupby("target")[["test_acc_mean", "test_acc_std", "n_seeds"]].first()
    scratch.columns = ["scratch_mean", "scratch_std", "scratch_n"]
    best = best.join(scratch, on="target")
    p, note = welch(best["test_acc_mean"], best["test_acc_std"], best["n_seeds"],
                    best["scratch_mean"], best["scratch_std"], best["scratch_n"], cfg.min_seeds)
    diff = best["test_acc_mean"] - best["scratch_mean"]
    table = pd.DataFrame({
        "target": best["target"], "arm": best["arm"], "source": best["source"], "size_fraction": best["size_fraction"],
        "series": [series_key(a, s, t, f) for a, s, t, f in
                   zip(best["arm"], best["source"], best["target"], best["size_fraction"])],
        "label": [series_label(a, s, t, f) for a, s, t, f in
                  zip(best["arm"], best["source"], best["target"], best["size_fraction"])],
        "best_round": best["round"].astype(int), "fraction_pruned": best["fraction_pruned"],
        "val_mean": best["val_acc_mean"],
        "best_mean": best["test_acc_mean"], "best_std": best["test_acc_std"], "best_n": best["n_seeds"].astype(int),
        "test_best_round": by_test.reindex(pd.MultiIndex.from_frame(best[SERIES])).to_numpy(),
        "scratch_mean": best["scratch_mean"], "scratch_std": best["scratch_std"],
        "scratch_n": best["scratch_n"].fillna(0).astype(int),
        "winner": np.select([diff > 0, diff < 0, diff == 0], ["pruned", "scratch", "tie"], ""),
        "p_value": p, "note": note,
    })
    table = _decide(table, table["target"], cfg)[TABLE2_COLUMNS]
    order = {arm: i for i, arm in enumerate(PRUNED_ARMS)}
    return table.sort_values(["target", "arm", "source", "size_fraction"], key=lambda c: c.map(order)
                             if c.name == "arm" else c, kind="stable").reset_index(drop=True)


TABLE2_COLUMNS = [
    "target", "arm", "source", "size_fraction", "series", "label", "best_round", "fraction_pruned", "val_mean",
    "best_mean", "best_std", "best_n", "test_best_round", "scratch_mean", "scratch_std", "scratch_n", "winner",
    "p_value", "p_adjusted", "significant", "note",
]


def transfer_vs_target(agg: pd.DataFrame, cfg: ReportConfig) -> pd.DataFrame:
    """Paper Sec. 4.2: per target, natural source and pruned round, the transferred ticket's test accuracy against
    the target's own ticket of the same round (same sparsity); Welch's test, corrected per target."""
    keys = ["target", "round"]
    own = agg[(agg["arm"] == "target") & (agg["round"] > 0)][[*keys, "test_acc_mean", "test_acc_std", "n_seeds"]]
    transfer = agg[(agg["arm"] == "transfer") & (agg["round"] > 0)]
    pairs = transfer.merge(own, on=keys, suffixes=("", "_own")).sort_values(["target", "source", "round"])
    p, note = welch(pairs["test_acc_mean"], pairs["test_acc_std"], pairs["n_seeds"], pairs["test_acc_mean_own"],
                    pairs["test_acc_std_own"], pairs["n_seeds_own"], cfg.min_seeds)
    table = pd.DataFrame({
        "target": pairs["target"], "arm": "transfer", "source": pairs["source"], "round": pairs["round"].astype(int),
        "fraction_pruned": pairs["fraction_pruned"],
        "transfer_mean": pairs["test_acc_mean"], "transfer_std": pairs["test_acc_std"],
        "transfer_n": pairs["n_seeds"].astype(int),
        "target_mean": pairs["test_acc_mean_own"], "target_std": pairs["test_acc_std_own"],
        "target_n": pairs["n_seeds_own"].astype(int),
        "difference": pairs["test_acc_mean"] - pairs["test_acc_mean_own"], "p_value": p, "note": note,
    }).reset_index(drop=True)
    table = _decide(table, table["target"], cfg)
    significant = table["significant"].fillna(False).to_numpy(bool)
    table["verdict"] = np.select([significant & (table["difference"] > 0), significant & (table["difference"] < 0)],
                                 ["better", "worse"], "")
    return table[[c for c in table.columns if c != "note"] + ["note"]]


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
    """DVC metrics: per target, scratch's mean test accuracy and each validation-chosen best model's round,
    test accuracy, sparsity and p-values (raw and corrected)."""
    out: dict[str, dict[str, float]] = {}
    for target in sorted(agg["target"].unique()):
        entry: dict[str, float] = {}
        scratch = agg[(agg["target"] == target) & (agg["arm"] == "scratch")]
        if not scratch.empty:
            entry["scratch_test_acc"] = round(float(scratch["test_acc_mean"].iloc[0]), 6)
        for rec in table2[table2["target"] == target].itertuples(index=False):
            entry[f"best_{rec.series}_round"] = int(rec.best_round)
            entry[f"best_{rec.series}_test_acc"] = round(float(rec.best_mean), 6)
            entry[f"best_{rec.series}_fraction_pruned"] = round(float(rec.fraction_pruned), 6)
            if not math.isnan(rec.p_value):
                entry[f"best_{rec.series}_p_value"] = round(float(rec.p_value), 6)
                entry[f"best_{rec.series}_p_adjusted"] = round(float(rec.p_adjusted), 6)
        out[target] = entry
    return out


def plot_table(agg: pd.DataFrame, target: str) -> pd.DataFrame:
    """Long-format curve data of one target for `dvc plots`: arm_source, fraction_pruned, test_acc mean/std."""
    rows = agg[agg["target"] == target].copy()
    rows["arm_source"] = [series_key(a, s, target, f)
                          for a, s, f in zip(rows["arm"], rows["source"], rows["size_fraction"])]
    return rows[["arm_source", "round", "fraction_pruned", "test_acc_mean", "test_acc_std", "n_seeds"]]


# ---------------------------------------------------------------- everything at once


@dataclass(frozen=True)
class Analysis:
    """Every table of the report, computed from the results (no I/O)."""

    agg: pd.DataFrame  # mean/std/n per (series, round)
    table2: pd.DataFrame  # best pruned model vs scratch
    table3: pd.DataFrame  # the sparsity of each best model
    versus: pd.DataFrame  # transferred tickets vs the target's own, per round


def analyse(df: pd.DataFrame, cfg: ReportConfig) -> Analysis:
    """The report's statistics from the per-seed results rows: what `build_report` writes, and what tests simulate."""
    agg = aggregate(df)
    table2 = best_models(agg, cfg)
    return Analysis(agg, table2, fraction_table(table2), transfer_vs_target(agg, cfg))


def versus_summary(versus: pd.DataFrame) -> pd.DataFrame:
    """Per target and source: how many rounds were tested, and at which sparsities the transferred ticket is
    significantly better or worse than the target's own."""
    def rounds(rows: pd.DataFrame, verdict: str) -> str:
        hits = rows[rows["verdict"] == verdict]
        return ", ".join(f"{r} ({f:.1%})" for r, f in zip(hits["round"], hits["fraction_pruned"])) or "none"

    out = [{"target": target, "source": source, "rounds compared": len(rows),
            "tested": int(rows["p_value"].notna().sum()), "better (round, pruned)": rounds(rows, "better"),
            "worse (round, pruned)": rounds(rows, "worse"),
            "not tested": ", ".join(sorted(set(rows["note"]) - {""})) or "—"}
           for (target, source), rows in versus.groupby(["target", "source"], sort=True)]
    return pd.DataFrame(out, columns=["target", "source", "rounds compared", "tested", "better (round, pruned)",
                                      "worse (round, pruned)", "not tested"])
