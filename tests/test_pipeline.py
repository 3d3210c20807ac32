"""The real pipeline: `dvc repro` of the repo's dvc.yaml on a tiny study in a fresh git + DVC repository.

Also the DVC remotes: `dvc push` to a real S3 API (moto's server on 127.0.0.1), then a fresh `git clone`
plus `dvc pull` must restore the whole study byte for byte (data, tickets, results, the tuning study, the
report), so that `dvc status` there is clean and `dvc repro` a no-op. Only what DVC staged itself is committed,
as a user following its hint would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import free_port
from lth.tracking.mlflow import project_dir

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dvc, lth, moto_server
TRANSFER_TARGETS = ("digits", "bio-textures")

# Everything tiny: a width-4 ResNet-8 on 12-px images, 2 epochs, 2 IMP rounds, 2 seeds, 2 tune trials.
TINY_PARAMS = {
    "paths": {"data": "data", "models": "models", "results": "results", "reports": "reports"},
    "prepare": {"image_size": 12, "seed": 0, "geometry": "stretch", "datasets": {
        "fashion-mnist": {"train": 200, "val": 60, "test": 100},
        "digits": {"train": 200, "val": 60, "test": 100},
        "bio-textures": {"train": 120, "val": 40, "test": 40},
    }},
    "model": {"arch": "resnet", "depth": 8, "width": 4},
    "train": {"batch_size": 32, "lr": 0.05, "max_epochs": 2, "patience": 2, "crop_size": 10,
              "eval_batch_size": 256, "device": "cpu", "threads": 1},
    "imp": {"sources": ["fashion-mnist"], "seeds": [0, 1], "rounds": 2, "pruning_rate": 0.2,
            "rewind_epoch": 1, "keep_epochs": 1},
    "transfer": {"targets": list(TRANSFER_TARGETS), "sources": ["fashion-mnist"], "arms": ["scratch", "transfer"],
                 "seeds": [0, 1], "rounds": None, "related": [], "size_fractions": [0.5], "lr": None,
                 "max_epochs": None},
    "tune": {"source": "fashion-mnist", "target": "digits", "round": 1, "n_trials": 2, "rewind_epochs": [0, 1],
             "lr_range": [0.01, 0.1], "seed": 0, "study_name": "tiny", "storage": None, "max_epochs": 1},
    # null: the default store, <project>/mlflow.db, which `dvc exp run --temp` must not move into its copy
    "tracking": {"uri": None, "register": True, "artifact_location": None},
    "report": {"alpha": 0.05},
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "AWS_PROFILE") and not k.startswith("DVC_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", TQDM_DISABLE="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org", **extra)
    return env


def sh(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a command; its stdout+stderr, or a test failure that shows them."""
    proc = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def file_hashes(root: Path, *subdirs: str) -> dict[str, str]:
    """sha256 of every file under root/subdir, keyed by the path relative to root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in subdirs for p in sorted((root / d).rglob("*")) if p.is_file() and p.name != ".gitignore"}


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git + DVC repository holding the repo's dvc.yaml, its code and the tiny params, reproduced."""
    root = tmp_path_factory.mktemp("pipeline") / "study"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "src" / "lth", root / "src" / "lth", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")  # the project's: its MLflow store and lock, caches
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the default local remote
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")  # the plot template
    sh(root, "git", "add", ".")
    sh(root, "git", "commit", "-qm", "tiny study")
    t0 = time.perf_counter()
    out = sh(root, "dvc", "repro")
    print(f"\nfirst dvc repro: {time.perf_counter() - t0:.1f} s")
    expected = {f"prepare@{d}" for d in TINY_PARAMS["prepare"]["datasets"]} | {"imp@fashion-mnist-0",
                "imp@fashion-mnist-1", "tune", "report"} | {f"transfer@{t}" for t in TRANSFER_TARGETS}
    assert ran_stages(out) == expected
    sh(root, "git", "commit", "-qm", "reproduced")  # what DVC staged (core.autostage): dvc.lock, .gitignore files
    return root


def test_repro_writes_every_output_and_leaves_a_clean_status(demo_project: Path) -> None:
    for seed in (0, 1):
        for rnd in (0, 1, 2):
            ticket = demo_project / f"models/tickets/fashion-mnist/seed{seed}/round{rnd:02d}"
            assert (ticket / "mask.safetensors").is_file() and (ticket / "ticket.json").is_file()
    for target in TRANSFER_TARGETS:
        rows = (demo_project / f"results/transfer/{target}.csv").read_text().splitlines()
        assert rows[0].startswith("target,arm,") and len(rows) == 1 + 2 * (1 + 3)  # per seed: scratch + 3 rounds
    assert "<table" in (demo_project / "reports/index.html").read_text()
    assert set(json.loads((demo_project / "results/summary.json").read_text())) == set(TRANSFER_TARGETS)
    assert (demo_project / "results/tune/best.yaml").is_file()
    assert (demo_project / "mlflow.db").is_file()
    # nothing left over for a user to commit by hand: every output is in DVC's cache (and so travels with push)
    assert sh(demo_project, "git", "status", "--porcelain") == ""
    status = sh(demo_project, "dvc", "status")
    assert "up to date" in status, status


def test_second_repro_is_a_noop(demo_project: Path) -> None:
    out = sh(demo_project, "dvc", "repro")  # how fast: benchmarks/pipeline.py (RESULTS.md), not a timed test
    assert ran_stages(out) == set()
    assert "up to date" in out and "didn't change" in out


def test_metrics_and_plots_show(demo_project: Path) -> None:
    metrics = json.loads(sh(demo_project, "dvc", "metrics", "show", "--json"))
    summary = metrics[""]["data"]["results/summary.json"]["data"]  # "": the workspace
    assert 0 <= summary["digits"]["scratch_test_acc"] <= 1
    plots = json.loads(sh(demo_project, "dvc", "plots", "show", "--json"))["data"]
    for target in TRANSFER_TARGETS:
        content = plots[f"results/plots/{target}.csv"][0]["content"]
        assert content["encoding"]["x"]["field"] == "fraction_pruned"
        assert content["encoding"]["color"]["field"] == "arm_source"  # one line per arm, not one zigzag
        arms = {row["arm_source"] for row in content["data"]["values"]}
        assert arms == {"scratch", "transfer_fashion-mnist"}


def test_transfer_param_change_reruns_only_transfer_and_report(demo_project: Path) -> None:
    """`dvc exp run --temp -S transfer.max_epochs=1`: the runs land in the project's mlflow.db, not the copy."""
    before = _count_runs(demo_project / "mlflow.db")
    out = sh(demo_project, "dvc", "exp", "run", "--temp", "-S", "transfer.max_epochs=1")
    assert ran_stages(out) == {f"transfer@{t}" for t in TRANSFER_TARGETS} | {"report"}
    assert _count_runs(demo_project / "mlflow.db") > before
    assert not list((demo_project / ".dvc" / "tmp").rglob("mlflow.db"))
    shown = json.loads(sh(demo_project, "dvc", "exp", "show", "--json"))
    assert 1 in {p["transfer"]["max_epochs"] for p in _exp_params(shown)}  # the experiment is listed


def _exp_params(node: object) -> list[dict]:
    """Every params.yaml found in `dvc exp show --json` output."""
    if isinstance(node, list):
        return [p for item in node for p in _exp_params(item)]
    if isinstance(node, dict):
        found = [node["params.yaml"]["data"]] if isinstance(node.get("params.yaml"), dict) else []
        return found + [p for k, v in node.items() if k != "params.yaml" for p in _exp_params(v)]
    return []


def _count_runs(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from runs").fetchone()[0]


def test_project_dir_skips_dvc_experiment_copies(tmp_path: Path) -> None:
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "standalone" / "tmpab12"
    copy.mkdir(parents=True)
    assert project_dir(copy) == (tmp_path / "proj").resolve()
    assert project_dir(tmp_path) == tmp_path.resolve()


# ---------------------------------------------------------------- S3 remote through moto's server

SECRET = "lth-test-secret-never-in-config"


@pytest.fixture
def s3_endpoint(tmp_path: Path):
    """moto's S3 server on 127.0.0.1 with one bucket; yields (endpoint URL, env with the credentials)."""
    import boto3

    port = free_port()
    env = _env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
    log = (tmp_path / "moto.log").open("w")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "moto.log").read_text()
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key=SECRET).create_bucket(Bucket="lth-bucket")
        yield url, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_s3_push_then_clone_and_pull_restores_data_and_tickets(demo_project: Path, s3_endpoint, tmp_path: Path) -> None:
    url, env = s3_endpoint
    sh(demo_project, "dvc", "remote", "add", "-d", "s3r", "s3://lth-bucket/lth", env=env)
    sh(demo_project, "dvc", "remote", "modify", "s3r", "endpointurl", url, env=env)
    pushed = sh(demo_project, "dvc", "push", env=env)
    assert "pushed" in pushed
    for config in (demo_project / ".dvc" / "config", demo_project / ".dvc" / "config.local"):
        if config.exists():
            text = config.read_text()
            assert SECRET not in text and "testing" not in text and "secret" not in text.lower()
    sh(demo_project, "git", "add", ".dvc/config", "dvc.lock")
    sh(demo_project, "git", "commit", "-qm", "s3 remote")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(demo_project), str(clone))
    dirs = ("data/prepared", "models", "results", "reports")
    assert not file_hashes(clone, *dirs)  # git holds none of the data
    sh(clone, "dvc", "pull", env=env)
    original, restored = file_hashes(demo_project, *dirs), file_hashes(clone, *dirs)
    assert len(original) > 20 and restored == original
    assert {"results/tune/optuna.db", "results/transfer/digits.csv", "results/summary.json"} <= set(restored)
    assert any(p.startswith("models/tune/") for p in restored)
    assert "up to date" in sh(clone, "dvc", "status", env=env)
    out = sh(clone, "dvc", "repro", "--dry", env=env)
    assert ran_stages(out) == set() and "didn't change" in out  # nothing would run again, tuning included
