"""`lth study run --engine ray` on a real two-node Ray cluster on 127.0.0.1, against the serial run.

The cluster: `ray start --head` and `ray start --address` (each its own temp dir and working directory,
--block in a process group of its own, so teardown ends exactly the processes it started). Train threads
are pinned (torch on CPU gives other bits with another thread count, and Ray sets a task's OMP threads).
"""

from __future__ import annotations

import contextlib
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


class Cluster:
    """A head and a second node on 127.0.0.1, one CPU each; the second can be killed (a lost node) and restarted."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port, self.env = tmp, free_port(), ray_env(tmp)
        self.address = f"127.0.0.1:{self.port}"
        self.common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--memory=1000000000",
                       "--object-store-memory=100000000", "--disable-usage-stats"]
        self.head = _start(["--head", f"--port={self.port}", "--include-dashboard=false",
                            f"--temp-dir={tmp / 't1'}", f"--dashboard-agent-listen-port={free_port()}", *self.common],
                           tmp / "head", self.env)
        self.node2: subprocess.Popen | None = None
        self.starts = 0

    def start_node2(self) -> None:
        self.starts += 1
        self.node2 = _start([f"--address={self.address}", f"--temp-dir={self.tmp / f't2-{self.starts}'}",
                             f"--dashboard-agent-listen-port={free_port()}", *self.common],
                            self.tmp / f"node2-{self.starts}", self.env)
        _wait_nodes(self.port, 2, self.env)

    def node2_processes(self) -> list[tuple[int, str]]:
        """The second node's processes: its `ray start` group and their children (Ray starts workers apart)."""
        if self.node2 is None:
            return []
        rows = [line.split(None, 3) for line in subprocess.run(["ps", "-eo", "pid=,ppid=,pgid=,args="],
                                                               capture_output=True, text=True).stdout.splitlines()]
        mine = {int(r[0]) for r in rows if int(r[2]) == self.node2.pid}
        return [(int(r[0]), r[3] if len(r) > 3 else "") for r in rows
                if int(r[0]) in mine or int(r[1]) in mine]

    def node2_workers(self) -> list[int]:
        """Worker processes of the second node running a unit (Ray titles them "ray::lth <key>")."""
        return [pid for pid, args in self.node2_processes() if args.startswith("ray::lth ")]

    def kill_node2(self) -> None:
        """SIGKILL every process of the second node (raylet, agents, workers): a host that went away."""
        assert self.node2 is not None
        for pid, _ in self.node2_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.node2.wait(10)

    def stop(self) -> None:
        for proc in (self.node2, self.head):
            if proc is not None:
                _stop(proc)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two Ray nodes of one CPU each on 127.0.0.1."""
    c = Cluster(tmp_path_factory.mktemp("ray"))
    try:
        _wait_nodes(c.port, 1, c.env)
        c.start_node2()
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster(ray_cluster: Cluster) -> str:
    """The cluster's head address, with both nodes alive (a test that lost the second node gets it back)."""
    if ray_cluster.node2 is None or ray_cluster.node2.poll() is not None:
        ray_cluster.start_node2()
    return ray_cluster.address


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


def running_runs(url: str, prefix: str) -> list[str]:
    """Names of the nested runs on the server that are RUNNING and start with `prefix`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    names = []
    for exp in client.search_experiments():
        names += [r.info.run_name for r in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
                  if "mlflow.parentRunId" in r.data.tags and r.info.run_name.startswith(prefix)]
    return names


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
        # mid-unit: once the fine-tune's own MLflow run exists (so the test sees what becomes of a dead try's run)
        started = running_runs(mlflow_server, "transfer digits transfer ")
        for pid, args in ps():  # Ray names a busy worker process after its task: "ray::lth finetune/..."
            if "lth finetune/digits/transfer" in args and any(
                    args.split()[1].endswith("-" + name.rsplit(" ", 2)[-2] + "-" + name.rsplit(" ", 1)[-1])
                    for name in started):
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
    # the killed attempt's run is not left RUNNING: the driver marked it FAILED (lth.stale) at the end
    assert sorted(s for statuses in runs.values() for s in statuses if s != "FINISHED") == ["FAILED"]
    assert "transfer digits transfer fashion-mnist s0 r01" in runs and "imp digits@0.5 s0 r02" in runs
    # a rerun finds every unit done and runs none
    again = run_lth(["study", "run", "--engine", "ray", "--address", cluster, "--params", "tiny.yaml"], tmp_path,
                    env=env)
    assert again.returncode == 0, again.stderr
    record = pd.read_csv(tmp_path / "results/study/units.csv")
    assert set(record.loc[record["kind"] != "results", "state"]) == {"skipped"}
    assert outputs(tmp_path) == outputs(serial)


def _drive(cluster: str, root: Path) -> subprocess.Popen:
    """`lth study run --engine ray` in `root`, in a process group of its own (so a test can kill the driver)."""
    return subprocess.Popen([str(BIN / "lth"), "study", "run", "--engine", "ray", "--address", cluster,
                             "--params", "tiny.yaml"], cwd=root, env=ray_env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _training_done(root: Path) -> set[str]:
    """Training units whose outputs are all in the project (what a rerun must not run again)."""
    from lth.config import load_params
    from lth.study.plan import TRAINING, build_plan, is_done

    params = load_params(root / "tiny.yaml")
    return {u.key for u in build_plan(params) if u.kind in TRAINING and is_done(u, params)}


def test_killed_driver_resumes_only_unfinished_units(cluster: str, serial: Path, mlflow_server: str,
                                                     tmp_path: Path) -> None:
    write_cli_study(tmp_path, **STUDY, tracking={"uri": mlflow_server, "register": False})
    driver = _drive(cluster, tmp_path)
    end = time.time() + 240
    while driver.poll() is None and time.time() < end and len(_training_done(tmp_path)) < 4:
        time.sleep(0.2)
    assert driver.poll() is None, "the study ended before the driver could be killed"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its children; the cluster's workers are Ray's
    driver.communicate(timeout=30)
    done = _training_done(tmp_path)
    record = pd.read_csv(tmp_path / "results/study/units.csv")
    assert len(done) >= 4 and len(done) < int(record["kind"].isin(["imp", "size", "finetune"]).sum())
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "models").rglob("*") if p.is_file()}
    again = _drive(cluster, tmp_path)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert outputs(tmp_path) == outputs(serial)  # the same rows and tickets as an uninterrupted serial run
    record = pd.read_csv(tmp_path / "results/study/units.csv").set_index("key")
    training = record[record["kind"].isin(["imp", "size", "finetune"])]
    assert set(training.index[training["state"] == "skipped"]) == done  # exactly the finished units, not rerun
    assert set(training.loc[training["state"] != "skipped", "state"]) == {"done"}
    assert all(stamps[p] == p.stat().st_mtime_ns for p in stamps)  # tickets written before the kill untouched
    assert not any("RUNNING" in statuses for statuses in finished_runs(mlflow_server).values())


def test_lost_node_its_units_run_again_elsewhere(ray_cluster: Cluster, cluster: str, serial: Path,
                                                 mlflow_server: str, tmp_path: Path) -> None:
    write_cli_study(tmp_path, **STUDY, tracking={"uri": mlflow_server, "register": False})
    driver = _drive(cluster, tmp_path)
    end = time.time() + 240
    while driver.poll() is None and time.time() < end and not ray_cluster.node2_workers():
        time.sleep(0.05)
    assert ray_cluster.node2_workers(), "no unit was seen running on the second node"
    ray_cluster.kill_node2()  # mid-unit: Ray declares the node dead and the driver submits its units again
    _, stderr = driver.communicate(timeout=400)
    assert driver.returncode == 0, stderr
    assert outputs(tmp_path) == outputs(serial)
    record = pd.read_csv(tmp_path / "results/study/units.csv")
    assert (record["attempts"] >= 2).any() and set(record.loc[record["kind"] != "prepare", "state"]) == {"done"}
    assert "0 failed" in stderr


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


def test_token_cluster_refuses_a_driver_without_its_token(tmp_path: Path,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """A head started with RAY_AUTH_MODE=token lets in its token's holders only; lth says so in one line."""
    short = tmp_path_factory.mktemp("tok")  # Ray's socket paths under --temp-dir must stay short
    token, wrong = tmp_path / "token", tmp_path / "wrong"
    token.write_text("a" * 64 + "\n")
    wrong.write_text("b" * 64 + "\n")
    for f in (token, wrong):
        f.chmod(0o600)
    port = free_port()
    env = ray_env(tmp_path) | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    head = _start(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={short / 't'}",
                   f"--dashboard-agent-listen-port={free_port()}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                   "--memory=500000000", "--object-store-memory=80000000", "--disable-usage-stats"],
                  tmp_path / "head", env)
    try:
        _wait_nodes(port, 1, env)  # the token's holder gets in
        write_cli_study(tmp_path, **STUDY)
        out = run_lth(["study", "run", "--engine", "ray", "--address", f"127.0.0.1:{port}", "--params",
                       "tiny.yaml"], tmp_path, env=env | {"RAY_AUTH_TOKEN_PATH": str(wrong)}, timeout=120)
        _one_line_exit_2(out, "refused this driver")
        assert "RAY_AUTH_TOKEN_PATH" in out.stderr and not (tmp_path / "models").exists()
    finally:
        _stop(head)


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
