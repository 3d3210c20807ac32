"""The benchmark harness: a quick tracking_overhead run writes its JSON, and RESULTS.md renders from it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import common, summary, tracking_overhead

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e  # trains the demo's IMP job several times (about 20 s)
def test_tracking_overhead_quick_writes_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tracking_overhead.run(argparse.Namespace(quick=True, repeats=None))
    saved = json.loads((tmp_path / "tracking_overhead.json").read_text())
    assert saved["share"] == out["share"] and saved["pairs"] == 1 and saved["rounds"] == 1
    assert 0 < saved["share"] < 1 and 0 < saved["cpu_share"] < 1  # fractions of the job (speed is RESULTS.md's)
    # The job's own thread makes the calls it needs answers from; the rest is queued for the writer thread.
    assert {"create_run", "drain"} <= set(saved["mlflow_seconds_by_call"])
    assert {"log_batch", "create_model_version", "set_registered_model_alias"} <= set(saved["cpu_seconds_by_call"])
    assert "log_batch" not in saved["mlflow_seconds_by_call"]  # metric batches never block the job
    assert saved["machine"]["cpus"] >= 1 and "-m benchmarks tracking_overhead" in saved["command"]
    text = summary.render(tmp_path)
    assert "## tracking_overhead" in text and f"**{100 * saved['share']:.2f}%**" in text


def test_summary_renders_the_committed_results() -> None:
    text = summary.render(ROOT / "benchmarks" / "results")
    for name in ("mask_overhead", "data_path", "tracking_overhead", "pipeline"):
        assert f"## {name}" in text
    assert "not met" not in text.split("## gpu")[0]  # every CPU target holds in the committed figures
