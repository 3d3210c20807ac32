"""The benchmark harness: a quick tracking_overhead run writes its JSON, and RESULTS.md renders from it."""

from __future__ import annotations

import argparse
import json
import subprocess
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


def test_the_pipeline_benchmark_copies_the_source_not_a_previous_run(tmp_path: Path) -> None:
    """After `make demo` (outputs not ignored, e.g. results/tune/optuna.db), the temp copy starts from scratch."""
    from benchmarks import pipeline

    root, dest = tmp_path / "repo", tmp_path / "copy"
    left = ["results/tune/optuna.db", "models/tune/x.safetensors", "data/prepared/digits/meta.json",
            "reports/index.html", "dvc.lock", "mlflow.db", "mlruns/1/meta.yaml"]
    for rel in ["params.yaml", "dvc.yaml", "src/lth/x.py", "data/raw/digits.dvc", *left]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("paths: {data: data, models: models, results: results, reports: reports}\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "params.yaml", "dvc.yaml", "src", "data/raw"], cwd=root, check=True)
    pipeline._copy_tree(dest, root)
    copied = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and ".git" not in p.parts}
    assert copied == {"params.yaml", "dvc.yaml", "src/lth/x.py", "data/raw/digits.dvc"}
