"""MLproject: `mlflow run . -e imp` runs the same `lth imp` command and its tickets and runs land where the CLI's do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from lth.config import Params, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_entry_points_call_the_cli_with_params() -> None:
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert spec["python_env"] == "python_env.yaml" and (ROOT / spec["python_env"]).is_file()
    points = spec["entry_points"]
    assert set(points) == {"prepare", "imp", "transfer", "tune", "report"}
    for name, point in points.items():
        assert point["command"].startswith(f"lth {name} ") and "--params {params}" in point["command"]
        assert point["parameters"]["params"]["default"] == "params.yaml"
    env = yaml.safe_load((ROOT / "python_env.yaml").read_text())
    assert env["python"] == "3.11" and "-r requirements.lock" in env["dependencies"]


@pytest.mark.e2e
def test_mlflow_run_imp(study: Params, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = to_dict(study)
    raw["imp"]["rounds"] = 1
    raw["tracking"] = {"uri": None, "register": True}  # from $MLFLOW_TRACKING_URI, as `mlflow run` sets it
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    bin_dir = Path(sys.executable).parent  # `lth` lives beside this interpreter
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [str(bin_dir / "mlflow"), "run", str(ROOT), "-e", "imp", "-P", "source=fashion-mnist", "-P", "seed=0",
         "-P", f"params={params_file}", "--env-manager", "local", "--experiment-name", "mlproject"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    tickets = Path(study.paths.models, "tickets", "fashion-mnist", "seed0")
    assert sorted(p.name for p in tickets.glob("round*") if (p / "ticket.json").is_file()) == ["round00", "round01"]
    client = MlflowClient(uri)
    project_runs = client.search_runs([client.get_experiment_by_name("mlproject").experiment_id])
    assert len(project_runs) == 1 and project_runs[0].info.status == "FINISHED"
    assert project_runs[0].data.params["source"] == "fashion-mnist"
    imp_exp = client.get_experiment_by_name("imp/fashion-mnist")
    runs = client.search_runs([imp_exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_name for r in parents] == ["imp fashion-mnist s0"]
    # The project run and the job's parent run name each other.
    assert parents[0].data.tags["lth.project_run_id"] == project_runs[0].info.run_id
    assert project_runs[0].data.tags["lth.job_run_id"] == parents[0].info.run_id
    nested = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id)
    assert nested == ["imp fashion-mnist s0 r00", "imp fashion-mnist s0 r01"]
