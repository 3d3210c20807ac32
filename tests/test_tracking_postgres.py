"""A lab's MLflow server: PostgreSQL behind `mlflow server`, 16 processes logging and registering at once, and the
server killed and restarted in the middle of the writes: nothing lost, nothing twice."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient

from helpers import (BIN, free_port, lth_env, parents_and_children, postgres_bin, postgres_cluster, start_server,
                     stop_server)

PG_BIN = postgres_bin()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    PG_BIN is None, reason="PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")]
METRICS = ("loss", "acc")

# One process of a study: a job, nested runs with a metric per step, a ticket registered per nested run, all through
# lth's own tracker (what a unit does), without the training.
WORKER = textwrap.dedent("""
    import sys
    import time
    from pathlib import Path

    from helpers import tiny_ticket
    from lth.config import TrackingConfig
    from lth.tracking.mlflow import MlflowTracker

    uri, experiment = sys.argv[1:3]
    worker, children, steps, pause = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    tracker = MlflowTracker(TrackingConfig(uri=uri, retry_seconds=240, system_metrics=False), flush_seconds=0.0)
    with tracker.job(experiment, f"job {worker}", params={"worker": worker}, tags={"kind": "test"}) as job:
        Path(f"started-{worker}").touch()
        while not Path("go").exists():  # every worker writes at the same time
            time.sleep(0.1)
        for child in range(children):
            with tracker.child(job, f"job {worker} child {child}", params={"child": child}, tags={}) as run:
                for step in range(1, steps + 1):
                    run.log_metrics({"loss": 1.0 / step, "acc": step / steps}, step=step)  # one write per step
                    time.sleep(pause)
                ticket = Path(f"tickets/{worker}/{child}")
                tracker.register_ticket(run, ticket, tiny_ticket(ticket, experiment, worker, child))
""")


class MlflowServer:
    """`mlflow server` on PostgreSQL with artifacts proxied to a local folder, on one port across restarts."""

    def __init__(self, backend: str, root: Path) -> None:
        self.root, self.port, self.starts = root, free_port(), 0
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2",
                    "--backend-store-uri", backend, "--artifacts-destination", str(root / "artifacts")]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.starts += 1
        # no GenAI job runner: its consumer processes only cost CPU here
        self.proc = start_server(self.cmd, self.root / f"server{self.starts}.log",
                                 lth_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), f"{self.url}/health", timeout=240)

    def kill(self) -> None:
        """Kill -9 the server and its workers, as a crash or an OOM kill would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    assert PG_BIN is not None
    with postgres_cluster(PG_BIN, "mlflow") as backend:
        server = MlflowServer(backend, tmp_path_factory.mktemp("mlflow-server"))
        server.start()
        try:
            yield server
        finally:
            stop_server(server.proc)


def start_workers(url: str, experiment: str, cwd: Path, workers: int, children: int, steps: int,
                  pause: float) -> list[subprocess.Popen]:
    """Start the workers and wait until each has opened its job's run; they write once `cwd/go` exists."""
    (cwd / "worker.py").write_text(WORKER)
    env = lth_env(PYTHONPATH=str(Path(__file__).parent))  # the workers import helpers
    procs = [subprocess.Popen([sys.executable, "worker.py", url, experiment, str(w), str(children), str(steps),
                               str(pause)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(workers)]
    deadline = time.monotonic() + 300
    while not all((cwd / f"started-{w}").exists() for w in range(workers)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for proc in procs:
                proc.kill()
            raise AssertionError(f"workers did not start: {[proc.communicate()[1][-2000:] for proc in procs]}")
        time.sleep(0.5)
    return procs


def finish(procs: list[subprocess.Popen]) -> list[str]:
    """Wait for every worker; each must succeed. Returns their stderr."""
    outputs = [p.communicate(timeout=600) for p in procs]
    failed = [(p.returncode, err[-2000:]) for p, (_, err) in zip(procs, outputs) if p.returncode != 0]
    assert not failed, failed
    return [err for _, err in outputs]


def assert_nothing_lost(url: str, experiment: str, workers: int, children: int, steps: int) -> int:
    """Every run FINISHED once, every metric step once, every ticket one version with its alias; returns versions."""
    client = MlflowClient(url, url)
    parents, nested = parents_and_children(client, experiment)
    assert sorted(r.info.run_name for r in parents) == sorted(f"job {w}" for w in range(workers))
    assert sorted(r.info.run_name for r in nested) == sorted(f"job {w} child {c}" for w in range(workers)
                                                             for c in range(children))
    assert {r.info.status for r in parents + nested} == {"FINISHED"}
    names = {r.info.run_id: r.info.run_name for r in parents + nested}
    for run in nested:
        assert run.info.run_name.startswith(names[run.data.tags["mlflow.parentRunId"]] + " child ")
        for metric in METRICS:
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == list(range(1, steps + 1)), (run.info.run_name, metric)
    model = f"ticket-{experiment}-tiny"
    versions = client.search_model_versions(f"name = '{model}'")
    assert sorted((int(v.tags["seed"]), int(v.tags["round"])) for v in versions) == [
        (w, c) for w in range(workers) for c in range(children)]
    for v in versions:
        assert names[v.run_id] == f"job {v.tags['seed']} child {v.tags['round']}"
        alias = f"r{int(v.tags['round']):02d}-s{v.tags['seed']}"
        assert client.get_model_version_by_alias(model, alias).version == v.version
    return len(versions)


def test_sixteen_workers_log_and_register_through_a_server_on_postgresql(server: MlflowServer, tmp_path: Path) -> None:
    workers, children, steps = 16, 2, 20
    procs = start_workers(server.url, "writers", tmp_path, workers, children, steps, pause=0.0)
    t0 = time.monotonic()
    (tmp_path / "go").touch()
    finish(procs)
    versions = assert_nothing_lost(server.url, "writers", workers, children, steps)
    print(f"{workers} workers: {workers * (children + 1)} runs, {workers * children * steps * len(METRICS)} metric "
          f"values, {versions} ticket versions in {time.monotonic() - t0:.0f} s")


def test_workers_wait_for_a_restarted_server_and_lose_nothing(server: MlflowServer, tmp_path: Path) -> None:
    workers, children, steps = 4, 2, 20
    procs = start_workers(server.url, "restart", tmp_path, workers, children, steps, pause=0.5)
    (tmp_path / "go").touch()
    time.sleep(3)  # in the middle of the first nested runs' metrics
    server.kill()
    time.sleep(15)
    t0 = time.monotonic()
    server.start()
    print(f"server down for {15 + time.monotonic() - t0:.0f} s")
    errors = finish(procs)
    waited = re.compile(rf"^MLflow server {re.escape(server.url)} unreachable \(\w+\), retrying in \d+s \(\d+/\d+\)$",
                        re.M)
    assert all(waited.search(err) for err in errors), errors  # every worker showed its wait
    print("worker 0:", *waited.findall(errors[0]), sep="\n  ")
    assert_nothing_lost(server.url, "restart", workers, children, steps)
