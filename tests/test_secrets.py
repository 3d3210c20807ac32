"""Credentials in the environment never reach an output: params, logs, MLflow params/tags, artifacts, reports.
And servers that lth starts listen on 127.0.0.1 only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import lth_env, run_lth, write_cli_study

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRET1",
    "CYTOMINE_PRIVATE_KEY": "cytomine-private-5f1c2e9a-SECRET2",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-hunter2-SECRET3",
}


@pytest.mark.e2e
def test_no_secret_in_any_output(tmp_path: Path) -> None:
    write_cli_study(tmp_path, tracking={"register": True}, transfer={"rounds": [0, 1]})
    env = lth_env(**SECRETS, AWS_ACCESS_KEY_ID="AKIAEXAMPLESECRET4", CYTOMINE_PUBLIC_KEY="cytomine-public-SECRET5",
                  MLFLOW_TRACKING_USERNAME="lth-user-SECRET6")
    outputs = []
    for args in (["imp", "fashion-mnist", "--seed", "0"], ["transfer", "digits", "--arm", "scratch", "--arm", "transfer"],
                 ["report"], ["tickets", "list"]):
        done = run_lth([*args, "--params", "tiny.yaml"], tmp_path, env)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs += [done.stdout, done.stderr]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any("ticket" in p.parts for p in files)  # artifacts
    assert any(p.suffix == ".html" for p in files)
    needles = [v for k, v in env.items() if "SECRET" in v]
    assert len(needles) == 6
    for needle in needles:
        for path in files:
            assert needle.encode() not in path.read_bytes(), f"{needle} leaked into {path}"
        assert not any(needle in out for out in outputs), f"{needle} leaked into the console"
    print(f"searched {len(files)} files and {len(outputs)} console streams for {len(needles)} secrets")


def test_servers_started_by_lth_bind_localhost() -> None:
    """lth starts one server, `lth ui`, on 127.0.0.1 unless told otherwise; the project's (Makefile) bind 127.0.0.1."""
    ui = ROOT / "src" / "lth" / "tracking" / "mlflow" / "ui.py"  # `lth ui`: MLflow's UI, started only on request
    code = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py") if p != ui)
    assert '"--host", host' in ui.read_text()
    assert re.search(r'"--host", default="127\.0\.0\.1"', (ROOT / "src" / "lth" / "cli" / "ui.py").read_text())
    assert not re.search(r"0\.0\.0\.0|serve_forever|uvicorn|\.bind\(|Popen\(|os\.system\(|\[.mlflow., .(server|ui).", code)
    for name in ("Makefile", "MLproject", "dvc.yaml"):  # what the project itself runs (README examples are the user's)
        path = ROOT / name
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            # mlflow's own default host is 127.0.0.1; an explicit --host must keep it
            if re.search(r"\bmlflow (server|ui)\b", line) and "--host" in line:
                assert "--host 127.0.0.1" in line, f"{name}: {line.strip()}"
        assert "0.0.0.0" not in path.read_text(), name
