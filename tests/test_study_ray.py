"""`lth study run --engine ray` on a real two-node Ray cluster on 127.0.0.1, against the serial run.

The cluster: `ray start --head` and `ray start --address` (each its own temp dir and working directory,
--block in a process group of its own, so teardown ends exactly the processes it started). Train threads
are pinned (torch on CPU gives other bits with another thread count, and Ray sets a task's OMP threads).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

from helpers import BIN, SRC, lth_env, ray_env, run_lth, write_cli_study

pytestmark = pytest.mark.e2e

STUDY = {"train": {"threads": 1}, "imp": {"rounds": 2},
         "transfer": {"arms": ["scratch", "transfer", "target", "size"], "size_fractions": [0.5]}}
TIMING = ("seconds",)  # fields that measure time, not results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """End the process group this fixture started (its raylet, GCS and workers), and nothing else."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            time.sleep(1)  # the group's daemons exit after the `ray start` that leads it
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two Ray nodes of one CPU each on 127.0.0.1; yields the head's address."""
    tmp = tmp_path_factory.mktemp("ray")
    port = free_port()
    env = ray_env(tmp)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--memory=1000000000",
              "--object-store-memory=100000000", "--disable-usage-stats"]
    head = _start(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={tmp / 't1'}",
                   f"--dashboard-agent-listen-port={free_port()}", *common], tmp / "head", env)
    procs = [head]
    try:
        _wait_nodes(port, 1, env)
        procs.append(_start([f"--address=127.0.0.1:{port}", f"--temp-dir={tmp / 't2'}",
                             f"--dashboard-agent-listen-port={free_port()}", *common], tmp / "node2", env))
        _wait_nodes(port, 2, env)
        yield f"127.0.0.1:{port}"
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _wait_nodes(port: int, n: int, env: dict[str, str], timeout: float = 90) -> None:
    probe = (f"import ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR'); "
             f"print(sum(x['Alive'] for x in ray.nodes()))")
    end = time.time() + timeout
    while time.time() < end:
        out = subprocess.run([str(BIN / "python"), "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        if out.stdout.strip().isdigit() and int(out.stdout.strip()) >= n:
            return
        time.sleep(1)
    raise RuntimeError(f"ray cluster on port {port}: {n} nodes did not come up")


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def outputs(root: Path) -> dict[str, object]:
    """Every ticket and result file of a study, timing fields removed (safetensors compared as bytes)."""
    found: dict[str, object] = {}
    for sub in ("models", "results/transfer"):
        for p in sorted((root / sub).rglob("*")):
            if not p.is_file() or ".checkpoints" in p.parts:
                continue
            rel = str(p.relative_to(root))
            if p.suffix == ".json":
                found[rel] = strip_timing(json.loads(p.read_text()))
            elif p.suffix == ".csv":
                found[rel] = pd.read_csv(p).drop(columns=list(TIMING)).to_dict("records")
            else:
                found[rel] = p.read_bytes()
    return found


def ps() -> list[tuple[int, str]]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [(int(line.split(None, 1)[0]), line.split(None, 1)[1]) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (sqlite behind it, artifacts proxied to a folder); yields its URL."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            cwd=root, env=lth_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 90
        while time.time() < end:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        time.sleep(2)
        yield url
    finally:
        _stop(proc)


def finished_runs(url: str) -> dict[str, list[str]]:
    """Nested runs on the server: name -> statuses (one FINISHED per unit means nothing lost or doubled)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    found: dict[str, list[str]] = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            if "mlflow.parentRunId" in run.data.tags:
                found.setdefault(run.info.run_name, []).append(run.info.status)
    return found


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serial")
    write_cli_study(root, **STUDY)
    out = run_lth(["study", "run", "--params", "tiny.yaml"], root)
    assert out.returncode == 0, out.stderr
    return root


def test_ray_matches_serial_and_survives_a_killed_worker(cluster: str, serial: Path, mlflow_server: str,
                                                         tmp_path: Path) -> None:
    write_cli_study(tmp_path, **STUDY, tracking={"uri": mlflow_server, "register": False})
    env = ray_env(tmp_path)
    driver = subprocess.Popen([str(BIN / "lth"), "study", "run", "--engine", "ray", "--address", cluster,
                               "--params", "tiny.yaml"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    killed = ""
    end = time.time() + 240
    while not killed and driver.poll() is None and time.time() < end:
        for pid, args in ps():  # Ray names a busy worker process after its task: "ray::lth finetune/..."
            if "lth finetune/digits/transfer" in args:
                os.kill(pid, signal.SIGKILL)
                killed = args.split("lth ", 1)[1].split()[0]
                break
        time.sleep(0.05)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, stderr
    assert killed, "no fine-tune worker was seen running"
    # the study completed: the same rows and tickets as the serial run, nothing lost, nothing twice
    assert outputs(tmp_path) == outputs(serial)
    rows = pd.read_csv(tmp_path / "results/transfer/digits.csv")
    assert not rows.duplicated(["arm", "source", "seed", "round", "size_fraction"]).any()
    record = pd.read_csv(tmp_path / "results/study/units.csv").set_index("key")
    assert record.loc[killed, "attempts"] == 2 and record.loc[killed, "state"] == "done"
    assert set(record.loc[record["kind"] != "prepare", "state"]) == {"done"}  # prepared beforehand: skipped
    training = record[record["kind"].isin(["imp", "size", "finetune"])]
    assert set(training["host"]) == {socket.gethostname()} and (training["end"] > training["start"]).all()
    assert "0 failed" in stderr and "ETA" in stderr
    # tracked on the driver's server, nested under the jobs' runs: exactly one FINISHED run per unit
    runs = finished_runs(mlflow_server)
    assert sum(statuses.count("FINISHED") for statuses in runs.values()) == len(training)
    assert all(statuses.count("FINISHED") == 1 for statuses in runs.values())
    assert "transfer digits transfer fashion-mnist s0 r01" in runs and "imp digits@0.5 s0 r02" in runs
    # a rerun finds every unit done and runs none
    again = run_lth(["study", "run", "--engine", "ray", "--address", cluster, "--params", "tiny.yaml"], tmp_path,
                    env=env)
    assert again.returncode == 0, again.stderr
    record = pd.read_csv(tmp_path / "results/study/units.csv")
    assert set(record.loc[record["kind"] != "results", "state"]) == {"skipped"}
    assert outputs(tmp_path) == outputs(serial)


def _one_line_exit_2(out: subprocess.CompletedProcess, names: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("lth: error:") and names in lines[0], out.stderr


def test_unit_bigger_than_any_node(cluster: str, tmp_path: Path) -> None:
    write_cli_study(tmp_path, **STUDY, engine={"finetune_gpus": 1})
    out = run_lth(["study", "run", "--engine", "ray", "--address", cluster, "--params", "tiny.yaml"], tmp_path,
                  env=ray_env(tmp_path))
    _one_line_exit_2(out, "engine.finetune_gpus=1")
    assert not (tmp_path / "models").exists()  # before any training


def test_local_tracking_file_with_a_cluster(cluster: str, tmp_path: Path) -> None:
    write_cli_study(tmp_path, **STUDY)  # tracking.uri: a sqlite file under tmp_path
    out = run_lth(["study", "run", "--engine", "ray", "--address", cluster, "--params", "tiny.yaml"], tmp_path,
                  env=ray_env(tmp_path))
    _one_line_exit_2(out, "mlflow server")
    assert not (tmp_path / "models").exists()


def test_tune_refuses_a_sqlite_study_on_a_cluster(cluster: str, mlflow_server: str, tmp_path: Path) -> None:
    """`lth tune --engine ray` on two nodes: tracking on a server is fine, the default sqlite study is not."""
    write_cli_study(tmp_path, **STUDY, tracking={"uri": mlflow_server, "register": False})
    out = run_lth(["tune", "fashion-mnist", "digits", "--engine", "ray", "--workers", "2", "--address", cluster,
                   "--params", "tiny.yaml"], tmp_path, env=ray_env(tmp_path))
    _one_line_exit_2(out, "tune.storage sqlite:///")
    assert "PostgreSQL or MySQL URL" in out.stderr and not (tmp_path / "models").exists()


def test_unreachable_address(tmp_path: Path) -> None:
    write_cli_study(tmp_path, **STUDY)
    out = run_lth(["study", "run", "--engine", "ray", "--address", f"127.0.0.1:{free_port()}",
                   "--params", "tiny.yaml"], tmp_path, env=ray_env(tmp_path), timeout=60)
    _one_line_exit_2(out, "no Ray head answers")


def test_ray_not_installed(tmp_path: Path) -> None:
    write_cli_study(tmp_path, **STUDY)
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = ray_env(tmp_path) | {"PYTHONPATH": f"{fake.parent}{os.pathsep}{SRC}"}
    out = run_lth(["study", "run", "--engine", "ray", "--params", "tiny.yaml"], tmp_path, env=env, timeout=60)
    _one_line_exit_2(out, "pip install 'ray==2.60.0'")


def test_remote_cluster_without_token_refused(tmp_path: Path) -> None:
    write_cli_study(tmp_path, **STUDY)
    env = ray_env(tmp_path) | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}
    out = run_lth(["study", "run", "--engine", "ray", "--address", "192.0.2.1:6379", "--params", "tiny.yaml"],
                  tmp_path, env=env, timeout=60)
    _one_line_exit_2(out, "RAY_AUTH_MODE=token")


def test_dvc_knows_the_outputs_of_a_ray_run(tmp_path: Path) -> None:
    """The demo pipeline (shrunk) run by `lth study run --engine ray`: afterwards only `tune` is left to DVC."""
    import yaml

    from benchmarks.pipeline import _copy_tree, _shrink

    _copy_tree(tmp_path)
    _shrink(tmp_path / "params.yaml")
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["train"]["threads"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = ray_env(tmp_path)
    out = run_lth(["study", "run", "--engine", "ray"], tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert status.returncode == 0, status.stderr
    assert set(json.loads(status.stdout)) == {"tune"}  # every stage the study covers is up to date


def test_workers_run_one_function_each_and_stop_at_the_first_error(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """RayWorkers (what `lth tune --workers N` runs on): N calls, results in order, a worker's UserError as it is."""
    from lth.config import EngineConfig
    from lth.errors import UserError
    from lth.study.ray_engine import RayWorkers

    for key, value in ray_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    pool = RayWorkers(EngineConfig(), None)
    try:
        shown: list[str] = []
        assert pool.run(lambda i, base: (i, base + i), 2, (10,), "probe",
                        progress=lambda: shown.append("x") or "line") == [(0, 10), (1, 11)]
        assert shown  # the driver's progress line was asked for while it waited

        def fails_on_1(i: int) -> int:
            if i == 1:
                raise UserError("worker 1 says no")
            time.sleep(60)  # cancelled: the driver does not wait for it
            return i

        started = time.time()
        with pytest.raises(UserError, match="^worker 1 says no$"):
            pool.run(fails_on_1, 2, (), "probe")
        assert time.time() - started < 30
    finally:
        pool.shutdown()
