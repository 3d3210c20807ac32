"""Report: aggregation over seeds, Tables 2 and 3 and the Welch test against hand-computed values, the pages."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from lth.cli import cli
from lth.config import ReportConfig, to_dict
from lth.errors import UserError
from helpers import STUDY, study_params, study_rows, write_results
from lth.report.build import build_report
from lth.report.tables import (
    FEW_SEEDS, aggregate, best_models, fraction_table, load_results, missing_results, transfer_vs_target,
)


@pytest.fixture
def loaded(tmp_path: Path) -> pd.DataFrame:
    params = write_results(tmp_path)
    return load_results(params.paths.results, params.transfer.targets)


def row(table: pd.DataFrame, **where) -> pd.Series:
    """The single row of `table` matching every column=value."""
    sel = table[(table[list(where)] == pd.Series(where)).all(axis=1)]
    assert len(sel) == 1, f"{where}: {len(sel)} rows"
    return sel.iloc[0]


# ---------------------------------------------------------------- aggregation


def test_aggregate_gives_mean_sample_std_and_seed_count_per_round(loaded: pd.DataFrame) -> None:
    agg = aggregate(loaded)
    r = row(agg, target="alpha", arm="transfer", source="nat", round=2)
    assert (r.test_acc_mean, r.test_acc_std, r.n_seeds, r.fraction_pruned) == pytest.approx((0.90, 0.02, 3, 0.36))
    assert row(agg, target="alpha", arm="transfer", source="nat", round=1).test_acc_std == pytest.approx(0.01)
    beta = row(agg, target="beta", arm="scratch")
    assert beta.source == ""  # written as the target's name, read as "no source"
    assert (beta.test_acc_mean, beta.test_acc_std, beta.n_seeds) == pytest.approx((0.62, math.sqrt(0.0008), 2))
    assert len(agg) == sum(len(v) for v in STUDY.values())


def test_aggregate_std_is_nan_for_a_single_seed() -> None:
    agg = aggregate(study_rows({("t", "scratch", "", 1.0): {0: [0.5]}}))
    assert agg["n_seeds"].tolist() == [1] and math.isnan(agg["test_acc_std"].iloc[0])


# ---------------------------------------------------------------- Tables 2 and 3


EXPECTED_BEST = {  # (target, series): (best round, fraction pruned, best mean, winner)
    ("alpha", "transfer_nat"): (2, 0.36, 0.90, "pruned"),
    ("alpha", "target"): (3, 0.488, 0.85, "pruned"),
    ("alpha", "related_rel"): (2, 0.36, 0.87, "pruned"),
    ("alpha", "trained_nat"): (3, 0.488, 0.81, "scratch"),
    ("alpha", "reinit"): (1, 0.2, 0.76, "scratch"),
    ("alpha", "size_0.5"): (2, 0.36, 0.79, "scratch"),
    ("beta", "transfer_nat"): (1, 0.2, 0.59, "scratch"),
    ("beta", "target"): (1, 0.2, 0.64, "pruned"),
}


def test_table2_finds_best_pruned_round_scratch_baseline_and_winner(loaded: pd.DataFrame) -> None:
    table = best_models(aggregate(loaded), ReportConfig())
    got = {(r.target, r.series): (r.best_round, r.fraction_pruned, r.best_mean, r.winner) for r in table.itertuples()}
    assert set(got) == set(EXPECTED_BEST)
    for key, (rnd, frac, mean, winner) in EXPECTED_BEST.items():
        assert got[key][0] == rnd and got[key][3] == winner, key
        assert got[key][1:3] == pytest.approx((frac, mean)), key
    alpha_scratch = table[table["target"] == "alpha"][["scratch_mean", "scratch_std", "scratch_n"]].drop_duplicates()
    assert alpha_scratch.values.tolist() == [pytest.approx([0.82, 0.02, 3])]
    # rows in the paper's order: the transferred tickets first, the controls after
    order = ["transfer", "target", "related", "trained", "reinit", "size"]
    assert table[table["target"] == "alpha"]["arm"].tolist() == order
    assert table["best_round"].gt(0).all()  # dense round 0 never wins


def _welch_p_equal_variances_4_df(t: float) -> float:
    """Two-sided p of Student's t with 4 degrees of freedom, from its closed-form CDF."""
    u = t / math.sqrt(4 + t * t)  # the CDF with 4 df is 1/2 + (3/4) u (1 - u^2/3)
    return 2 * (1 - (0.5 + 0.75 * u * (1 - u * u / 3)))


def test_welch_p_value_matches_the_formula_and_marks_significance(loaded: pd.DataFrame) -> None:
    table = best_models(aggregate(loaded), ReportConfig())
    r = row(table, target="alpha", series="transfer_nat")
    # [.88 .90 .92] vs [.80 .82 .84]: equal variances 0.0004, n = 3 each -> Welch df = 4,
    # t = 0.08 / sqrt(2 * 0.0004 / 3)
    t = 0.08 / math.sqrt(2 * 0.0004 / 3)
    assert r.p_value == pytest.approx(_welch_p_equal_variances_4_df(t), rel=1e-6)
    assert r.p_value == pytest.approx(0.00805, abs=5e-5) and [r.significant, r.note] == [True, ""]
    assert [row(table, target="alpha", series="trained_nat").significant] == [False]  # .81 vs .82: no evidence
    strict = best_models(aggregate(loaded), ReportConfig(alpha=0.001))
    assert [row(strict, target="alpha", series="transfer_nat").significant] == [False]


def test_welch_needs_min_seeds_a_side_and_says_so() -> None:
    df = study_rows({("t", "scratch", "", 1.0): {0: [0.5, 0.52]}, ("t", "target", "t", 1.0): {1: [0.6, 0.7]}})
    r = best_models(aggregate(df), ReportConfig(min_seeds=3)).iloc[0]
    assert math.isnan(r.p_value) and pd.isna(r.significant) and r.note == FEW_SEEDS and r.winner == "pruned"
    assert not math.isnan(best_models(aggregate(df), ReportConfig(min_seeds=2)).iloc[0].p_value)
    alone = study_rows({("t", "target", "t", 1.0): {1: [0.6, 0.7, 0.8]}})  # no scratch run at all
    r = best_models(aggregate(alone), ReportConfig()).iloc[0]
    assert math.isnan(r.p_value) and r.note == "no scratch baseline" and r.winner == ""


def test_table2_p_values_are_holm_corrected_per_target(loaded: pd.DataFrame) -> None:
    table = best_models(aggregate(loaded), ReportConfig())
    alpha_rows = table[table["target"] == "alpha"].sort_values("p_value")
    # Holm by hand: the k-th smallest of m p-values times (m - k + 1), made monotone
    m, running, expected = len(alpha_rows), 0.0, []
    for k, p in enumerate(alpha_rows["p_value"]):
        running = max(running, min(1.0, p * (m - k)))
        expected.append(running)
    assert alpha_rows["p_adjusted"].tolist() == pytest.approx(expected)
    assert row(table, target="alpha", series="transfer_nat").p_adjusted == pytest.approx(6 * 0.00805, abs=5e-4)
    # related: raw p 0.032 < 0.05, but not after the correction
    related = row(table, target="alpha", series="related_rel")
    assert related.p_value < 0.05 and [related.significant] == [False]
    bonferroni = best_models(aggregate(loaded), ReportConfig(correction="bonferroni"))
    assert row(bonferroni, target="alpha", series="reinit").p_adjusted == pytest.approx(
        min(1.0, 6 * row(table, target="alpha", series="reinit").p_value))


def test_transfer_vs_target_compares_the_same_round_and_marks_better_and_worse(loaded: pd.DataFrame) -> None:
    versus = transfer_vs_target(aggregate(loaded), ReportConfig())
    assert versus[["target", "source", "round"]].values.tolist() == [
        ["alpha", "nat", 1], ["alpha", "nat", 2], ["alpha", "nat", 3],
        ["beta", "nat", 1], ["beta", "nat", 2], ["beta", "nat", 3]]
    r1 = row(versus, target="alpha", round=1)  # [.85 .86 .87] vs [.80 .81 .82]: t = 0.05 / sqrt(2 * 0.0001 / 3)
    assert r1.p_value == pytest.approx(_welch_p_equal_variances_4_df(0.05 / math.sqrt(2 * 0.0001 / 3)), rel=1e-6)
    assert r1.difference == pytest.approx(0.05) and r1.fraction_pruned == pytest.approx(0.2)
    assert versus[versus["target"] == "alpha"]["verdict"].tolist() == ["better", "better", ""]
    assert row(versus, target="alpha", round=1).p_adjusted == pytest.approx(3 * r1.p_value)
    beta = versus[versus["target"] == "beta"]  # two seeds: no test, no verdict
    assert beta["p_value"].isna().all() and (beta["note"] == FEW_SEEDS).all() and (beta["verdict"] == "").all()
    worse = loaded.copy()
    worse.loc[(worse["arm"] == "transfer") & (worse["round"] == 3), "test_acc"] -= 0.2
    assert row(transfer_vs_target(aggregate(worse), ReportConfig()), target="alpha", round=3).verdict == "worse"


def test_table3_gives_the_fraction_pruned_of_each_best_model(loaded: pd.DataFrame) -> None:
    table3 = fraction_table(best_models(aggregate(loaded), ReportConfig()))
    for (target, series), (rnd, frac, _, _) in EXPECTED_BEST.items():
        r = row(table3, target=target, series=series)
        assert (r.best_round, r.fraction_pruned, r.fraction_remaining) == pytest.approx((rnd, frac, 1 - frac))


# ---------------------------------------------------------------- bad and partial input


def test_missing_target_csv_is_one_line_user_error(tmp_path: Path) -> None:
    params = write_results(tmp_path, study_rows()[lambda d: d["target"] == "alpha"])
    with pytest.raises(UserError, match=r"no results for target beta .*transfer/beta\.csv missing.*lth transfer beta"):
        load_results(params.paths.results, params.transfer.targets)
    (Path(params.paths.results) / "transfer" / "beta.csv").write_text("")
    with pytest.raises(UserError, match=r"no results for target beta .*empty.*lth transfer beta") as err:
        build_report(params)
    assert "\n" not in str(err.value) and not Path(params.paths.reports).exists()


def test_missing_results_lists_absent_arms_and_dropped_seeds(loaded: pd.DataFrame, tmp_path: Path) -> None:
    params = study_params(tmp_path)
    assert missing_results(loaded, params).to_dict("records") == [  # alpha is complete; beta ran 2 of 3 seeds
        *[{"target": "beta", "series": s, "rounds": r, "problem": "seed(s) 2 missing"} for s, r in [
            ("scratch (dense)", "0"), ("ticket from nat", "0, 1, 2, 3"), ("target tickets", "0, 1, 2, 3")]],
        {"target": "beta", "series": "target masks, reinitialised", "rounds": "all", "problem": "no results"},
        {"target": "beta", "series": "trained weights from nat", "rounds": "all", "problem": "no results"},
        {"target": "beta", "series": "target tickets, 50% of training set", "rounds": "all", "problem": "no results"},
    ]
    dropped = loaded[~((loaded["target"] == "alpha") & (loaded["arm"] == "transfer") & (loaded["seed"] == 1)
                       & (loaded["round"] >= 2))]
    problems = missing_results(dropped, study_params(tmp_path, seeds=(0, 1)))
    assert problems.to_dict("records")[0] == {"target": "alpha", "series": "ticket from nat", "rounds": "2, 3",
                                              "problem": "seed(s) 1 missing"}


def test_partial_results_are_reported_not_fatal(tmp_path: Path) -> None:
    df = study_rows()
    df = df[~((df["target"] == "alpha") & (df["arm"] == "transfer") & (df["seed"] == 2))]
    params = write_results(tmp_path, df)
    page = build_report(params).read_text()
    assert "Missing / partial results" in page and "seed(s) 2 missing" in page and "ticket from nat" in page
    table2 = pd.read_csv(Path(params.paths.reports) / "table2.csv")
    assert row(table2, target="alpha", series="transfer_nat").best_n == 2


# ---------------------------------------------------------------- the pages and DVC files


def test_build_report_writes_pages_tables_figures_and_dvc_metrics(tmp_path: Path) -> None:
    params = write_results(tmp_path, seeds=(0, 1))  # beta has 2 seeds: alpha's third seed is extra, not missing
    index = build_report(params)
    reports, results = Path(params.paths.reports), Path(params.paths.results)
    assert index == reports / "index.html"
    figures = sorted(p.name for p in (reports / "figures").iterdir())
    assert figures == ["fig3_alpha.png", "fig3_beta.png", "fig4_related_alpha.png", "fig4_size_alpha.png",
                       "fig4_trained_alpha.png"]
    for name in figures:
        with Image.open(reports / "figures" / name) as img:
            img.verify()
        assert (reports / "figures" / name).stat().st_size > 10_000
    page, md = html.unescape(index.read_text()), (reports / "report.md").read_text()
    for text in (page, md):
        assert "Table 2" in text and "Table 3" in text and "Missing / partial results" in text
        assert all(f"figures/{name}" in text for name in figures)
        assert "★ 90.00 ± 2.00 % (n=3)" in text and "82.00 ± 2.00 % (n=3)" in text and "0.00805" in text
        assert "rewind_epoch" in text and "size_fractions" in text  # the study's parameters
        assert "Welch's two-sided t-test" in text and "Holm's step-down correction" in text
        assert "alpha = 0.05" in text and "Seeds: 2 configured (0, 1)" in text and "fewer than 3 seeds" in text
        assert "highest mean validation accuracy" in text and "too few seeds to test" in text
        assert "Transferred tickets vs the target's own tickets" in text and "1 (20.0%), 2 (36.0%)" in text
    assert "reinitialised" in page and "no results" in page  # beta's absent arms, listed
    assert len(pd.read_csv(reports / "table2.csv")) == len(EXPECTED_BEST) == len(pd.read_csv(reports / "table3.csv"))
    summary = json.loads((results / "summary.json").read_text())
    assert summary["alpha"]["scratch_test_acc"] == pytest.approx(0.82)
    assert summary["alpha"]["best_transfer_nat_test_acc"] == pytest.approx(0.90)
    assert summary["alpha"]["best_size_0.5_fraction_pruned"] == pytest.approx(0.36)
    assert summary["beta"]["best_target_test_acc"] == pytest.approx(0.64)
    assert summary["alpha"]["best_transfer_nat_round"] == 2 and "best_target_p_value" not in summary["beta"]
    assert summary["alpha"]["best_transfer_nat_p_adjusted"] == pytest.approx(6 * 0.00805, abs=5e-4)
    versus = pd.read_csv(reports / "transfer_vs_target.csv", keep_default_na=False)
    assert row(versus, target="alpha", round=2).verdict == "better" and len(versus) == 6
    plots = pd.read_csv(results / "plots" / "alpha.csv")
    assert {"arm_source", "fraction_pruned", "test_acc_mean"} <= set(plots.columns)
    assert row(plots, arm_source="transfer_nat", round=2).test_acc_mean == pytest.approx(0.90)
    assert not list(reports.rglob("*.tmp")) and not list(results.rglob("*.tmp"))


def test_figure3_stars_the_chosen_rounds_and_marks_significant_rounds(loaded: pd.DataFrame) -> None:
    from matplotlib.figure import Figure

    from lth.report.figures import _curve, _mark, figure_lines
    from lth.report.tables import analyse

    tables = analyse(loaded, ReportConfig())
    agg_t = tables.agg[tables.agg["target"] == "alpha"]
    _, lines = figure_lines(agg_t, "alpha", {"nat": "tab:green", "rel": "tab:red"})["fig3"]
    ax = Figure().subplots()
    _mark(ax, [(line, _curve(agg_t, line)) for line in lines], tables.table2[tables.table2["target"] == "alpha"],
          tables.versus[tables.versus["target"] == "alpha"])
    marks = {(ln.get_marker(), round(1 - float(x), 3)) for ln in ax.lines for x in ln.get_xdata()}
    # stars: transfer round 2 (36 %), target round 3 (48.8 %), reinit round 1 (20 %); triangles: rounds 1 and 2
    assert marks == {("*", 0.36), ("*", 0.488), ("*", 0.2), ("^", 0.2), ("^", 0.36)}


def test_report_command_prints_where_and_table2(tmp_path: Path) -> None:
    params = write_results(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(params)))
    result = CliRunner().invoke(cli, ["report", "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    assert "index.html" in result.output and "transfer_nat" in result.output and "winner=pruned" in result.output


def test_timeline_of_a_study_run_shows_one_row_per_worker(tmp_path: Path) -> None:
    """`lth study run` leaves results/study/units.csv: the report draws it, training units only, per worker."""
    from lth.report.figures import read_units

    params = write_results(tmp_path)
    build_report(params)
    assert not (Path(params.paths.reports) / "figures" / "timeline.png").exists()  # no record: no figure
    record = params.paths.units_csv
    record.parent.mkdir(parents=True)
    lines = ["key,kind,state,attempts,host,gpu,worker,start,end,error",
             "prepare/alpha,prepare,done,1,,,,100.0,100.0,",
             "imp/nat/s0/r00,imp,skipped,0,,,,0.000,0.000,",
             "imp/nat/s0/r01,imp,done,1,h1,0,h1:11,100.0,160.0,",
             "finetune/alpha/a,finetune,done,2,h1,1,h1:12,160.0,190.0,OSError: worker died",
             "finetune/alpha/b,finetune,done,1,h2,0,h2:13,161.0,185.0,",
             "finetune/alpha/c,finetune,failed,3,h2,0,h2:13,186.0,190.0,boom"]
    record.write_text("\n".join(lines) + "\n")
    units = read_units(record)
    assert units is not None and sorted(units["key"]) == ["finetune/alpha/a", "finetune/alpha/b", "imp/nat/s0/r01"]
    index = build_report(params)
    png = Path(params.paths.reports) / "figures" / "timeline.png"
    with Image.open(png) as img:
        width, height = img.size
    assert "figures/timeline.png" in index.read_text() and "units per worker over time" in index.read_text()
    record.write_text("\n".join(lines[:4]) + "\n")  # one worker: a shorter figure (one row per worker)
    build_report(params)
    with Image.open(png) as img:
        assert img.size[0] == width and img.size[1] < height
