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


def test_scale_simulation_schedules_the_chains_first_and_renders(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulated driver meets the bound on the paper's plan at 16 GPUs; both parts land in RESULTS.md."""
    from benchmarks import scale

    units, seconds = scale.paper_units()
    assert len(units) > 10_000 and {u.kind for u in units} == {"imp", "size", "finetune"}
    for gpus in (16, 64):
        low = scale.bound(units, seconds, gpus)
        made = scale.simulate(units, seconds, gpus)
        assert low <= made <= scale.TARGETS[gpus] * low  # the chains first: near the critical path at 64
    toy = units[:2] + [u for u in units if u.kind == "finetune"][:6]  # an IMP chain of 2 and free fine-tunes
    assert scale.simulate(toy, dict.fromkeys(seconds, 1.0), 1, overhead=0.5) == pytest.approx(8 * 1.5)
    monkeypatch.setattr(scale, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    fake_ray = lambda u, s, gpus: (1.02 * scale.simulate(u, s, gpus, 0.001), 0.001)  # noqa: E731
    out = scale.run(argparse.Namespace(quick=True), ray_runner=fake_ray,
                    demo_runner=lambda engine, quick: {"local": 300.0, "ray": 200.0}[engine])
    assert out["demo"]["serial_over_ray"] == pytest.approx(1.5) and out["met"]["ray_vs_sim_16"]
    text = summary.render(tmp_path)
    assert "serial / Ray = **1.50x**" in text and "at 16 GPUs" in text and "16 GPUs <= 1.1x: met" in text
