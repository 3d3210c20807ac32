"""The report's statistics on simulated studies: how often they cry wolf with no effect, and how often they find a real one.

Each simulated study is one target of the paper's shape (31 pruned rounds, 4 seeds, scratch, 3 natural sources'
transferred and trained tickets, the target's own tickets and their re-initialisation); many studies are stacked
as many targets of one results frame and go through `analyse`, the function `build_report` uses.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest

from lth.config import ReportConfig
from lth.report.tables import COLUMNS, SERIES, Analysis, _best_rounds, aggregate, analyse, welch

STUDIES, ROUNDS, SEEDS = 1000, 31, 4
SOURCES = ("nat1", "nat2", "nat3")
SERIES_OF_A_STUDY = [("transfer", s) for s in SOURCES] + [("trained", s) for s in SOURCES] + [("target", None),
                                                                                               ("reinit", None)]
# A run's accuracy = the model's own quality (seed-to-seed spread, shared by its validation and test accuracy)
# + the noise of the finite evaluation set (independent between validation and test). The shared part is why
# choosing on validation alone does not make the chosen round's test accuracy unbiased; the correction must
# carry the rest.
MODEL_SD, EVAL_SD = 0.01, 0.01
EFFECT = 0.05  # the power simulation: transferred tickets truly this much better at every pruned round


def simulate(rng: np.random.Generator, effect: float = 0.0, studies: int = STUDIES) -> pd.DataFrame:
    """Per-seed result rows (the `lth transfer` CSV columns) of `studies` simulated targets `t0`, `t1`, ..."""
    parts = []
    for arm, source, rounds in [("scratch", "", [0])] + [(a, s, range(ROUNDS + 1)) for a, s in SERIES_OF_A_STUDY]:
        rounds = np.asarray(rounds)
        targets = np.char.add("t", np.repeat(np.arange(studies), len(rounds) * SEEDS).astype(str))
        parts.append(pd.DataFrame({
            "target": targets, "arm": arm, "source": targets if source is None else source,
            "seed": np.tile(np.arange(SEEDS), studies * len(rounds)),
            "round": np.tile(np.repeat(rounds, SEEDS), studies)}))
    df = pd.concat(parts, ignore_index=True)
    truth = 0.8 + np.where((df["arm"] == "transfer") & (df["round"] > 0), effect, 0.0)
    quality = truth + rng.normal(0.0, MODEL_SD, len(df))
    df["val_acc"] = quality + rng.normal(0.0, EVAL_SD, len(df))
    df["test_acc"] = quality + rng.normal(0.0, EVAL_SD, len(df))
    df["fraction_pruned"] = 1.0 - 0.8 ** df["round"]
    df["size_fraction"] = 1.0
    df[["test_loss", "val_loss", "best_epoch", "epochs", "seconds"]] = 0.0
    return df[list(COLUMNS)]


def _analyse_fast(df: pd.DataFrame, cfg: ReportConfig) -> Analysis:
    """`analyse`, with the simulated frame kept out of the garbage collector's way: statsmodels' Holm calls
    gc.collect() once per family, which would otherwise walk the million rows two thousand times."""
    gc.freeze()
    try:
        return analyse(df, cfg)
    finally:
        gc.unfreeze()


@pytest.fixture(scope="module")
def null_study() -> Iterator[tuple[pd.DataFrame, Analysis]]:
    df = simulate(np.random.default_rng(20240601))
    yield df, _analyse_fast(df, ReportConfig())


def _rate(flags: pd.Series) -> float:
    """The fraction of True among tested rows (NA: no test, counted as not significant)."""
    return float(flags.astype("boolean").fillna(False).mean())


def test_with_no_effect_at_most_7_percent_of_series_come_out_significant(null_study) -> None:
    _, tables = null_study
    table2, versus = tables.table2, tables.versus
    assert len(table2) == STUDIES * len(SERIES_OF_A_STUDY) and table2["p_value"].notna().all()
    false_positives = _rate(table2["significant"])
    family_wise = _rate(table2.groupby("target")["significant"].any())
    print(f"\nnull, {STUDIES} studies: {false_positives:.2%} of Table-2 series significant, "
          f"{family_wise:.2%} of targets with any; transfer vs target: {_rate(versus['significant']):.2%} of rounds")
    assert false_positives <= 0.07
    assert family_wise <= 0.07  # Holm's promise: per target, any false claim at all stays near alpha
    assert len(versus) == STUDIES * len(SOURCES) * ROUNDS and _rate(versus["significant"]) <= 0.07


def test_choosing_on_test_accuracy_without_correction_would_overstate(null_study) -> None:
    """The old report (best round by mean test accuracy, uncorrected Welch test) on the same studies: the
    simulation can tell honest statistics from the old ones."""
    df, tables = null_study
    agg = tables.agg
    best = _best_rounds(agg[(agg["arm"] != "scratch") & (agg["round"] > 0)], "test_acc")
    scratch = agg[agg["arm"] == "scratch"].set_index("target").loc[best["target"]]
    p, _ = welch(best["test_acc_mean"], best["test_acc_std"], best["n_seeds"], scratch["test_acc_mean"].to_numpy(),
                 scratch["test_acc_std"].to_numpy(), scratch["n_seeds"].to_numpy(), min_seeds=2)
    old_rate = float(np.mean(p < 0.05))
    print(f"\nnull, old selection on test accuracy, uncorrected: {old_rate:.2%} of series significant")
    assert old_rate > 0.10


def test_a_real_effect_is_still_found_and_the_power_is_reported() -> None:
    df = simulate(np.random.default_rng(7), effect=EFFECT)
    tables = _analyse_fast(df, ReportConfig())
    table2 = tables.table2
    real = table2["arm"] == "transfer"
    power, false_positives = _rate(table2.loc[real, "significant"]), _rate(table2.loc[~real, "significant"])
    versus_power = _rate(tables.versus["verdict"] == "better")
    print(f"\neffect +{EFFECT:.0%} (model sd {MODEL_SD}, eval sd {EVAL_SD}, {SEEDS} seeds): power vs scratch "
          f"{power:.1%}, null series significant {false_positives:.2%}; transfer vs target power {versus_power:.1%}")
    assert power >= 0.6, f"power {power:.1%}"
    assert false_positives <= 0.07
    assert (table2.loc[real, "winner"] == "pruned").mean() > 0.95
    assert versus_power >= 0.1 and (tables.versus["verdict"] == "worse").sum() == 0


def test_validation_chooses_the_round_and_the_table_reports_its_test_accuracy() -> None:
    """A round that looks best only on test accuracy is not chosen; the table says test would have chosen it."""
    df = simulate(np.random.default_rng(3), studies=1)
    lucky = (df["arm"] == "target") & (df["round"] == 5)
    df.loc[lucky, "test_acc"] += 0.3  # test-only luck at round 5
    df.loc[(df["arm"] == "target") & (df["round"] == 9), "val_acc"] += 0.3  # validation prefers round 9
    row = analyse(df, ReportConfig()).table2.set_index("arm").loc["target"]
    assert (row.best_round, row.test_best_round) == (9, 5)
    expected = aggregate(df).set_index([*SERIES, "round"]).loc[("t0", "target", "t0", 1.0, 9), "test_acc_mean"]
    assert row.best_mean == pytest.approx(expected)
