"""Eight processes log to one tracking store at once (the default sqlite file, then a local `mlflow server`):
every run and every metric value arrives."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import free_port, lth_env, start_server, stop_server
from lth.tracking.mlflow import PARENT_TAG

pytestmark = pytest.mark.e2e
WRITERS, CHILDREN, STEPS = 8, 3, 50
METRICS = ("loss", "acc")

WRITER = textwrap.dedent(f"""
    import sys
    from lth.config import TrackingConfig
    from lth.tracking.mlflow import MlflowTracker

    uri, worker = (sys.argv[1] or None), int(sys.argv[2])
    # Small batches: many more writes than lth makes, so writers really collide.
    tracker = MlflowTracker(TrackingConfig(uri=uri, register=False), flush_every=10, flush_seconds=0.0)
    with tracker.job("concurrency", f"job {{worker}}", params={{"worker": worker}}, tags={{"kind": "test"}}) as job:
        for child in range({CHILDREN}):
            with tracker.child(job, f"job {{worker}} child {{child}}", params={{"child": child}}, tags={{}}) as run:
                for step in range(1, {STEPS} + 1):
                    run.log_metrics({{"loss": 1.0 / step, "acc": step / {STEPS}}}, step=step)
        job.log_metrics({{"children": {CHILDREN}}})
""")


def log_at_once(uri: str, cwd: Path) -> None:
    """Start every writer, then wait for all; each must exit 0."""
    script = cwd / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), uri, str(i)], cwd=cwd, env=lth_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(WRITERS)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    failed = [(p.returncode, out[-2000:]) for p, out in zip(procs, outputs) if p.returncode != 0]
    assert not failed, failed


def count(uri: str) -> tuple[int, int]:
    """(runs, metric values) in the experiment, checking each run is complete and FINISHED."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("concurrency")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert sorted(r.info.run_name for r in parents) == sorted(f"job {i}" for i in range(WRITERS))
    assert len(children) == WRITERS * CHILDREN
    assert {r.info.status for r in runs} == {"FINISHED"}
    by_id = {r.info.run_id: r.info.run_name for r in parents}
    values = 0
    for run in children:
        assert run.info.run_name.startswith(by_id[run.data.tags[PARENT_TAG]] + " child ")
        for name in METRICS:
            history = client.get_metric_history(run.info.run_id, name)
            assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), (run.info.run_name, name)
            values += len(history)
    return len(runs), values


def test_eight_writers_on_the_default_sqlite_store(tmp_path: Path) -> None:
    log_at_once("", tmp_path)  # no tracking.uri, no MLFLOW_TRACKING_URI: ./mlflow.db, created by the racing writers
    runs, values = count(f"sqlite:///{tmp_path / 'mlflow.db'}")
    print(f"sqlite: {runs} runs, {values} metric values")
    assert (runs, values) == (WRITERS * (CHILDREN + 1), WRITERS * CHILDREN * STEPS * len(METRICS))


def test_eight_writers_on_a_local_mlflow_server(tmp_path: Path) -> None:
    port = free_port()
    server = start_server([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                    "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                    "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "2"],
                   tmp_path / "server.log", lth_env(), f"http://127.0.0.1:{port}/health", timeout=90)
    try:
        uri = f"http://127.0.0.1:{port}"
        log_at_once(uri, tmp_path)
        runs, values = count(uri)
    finally:
        stop_server(server)
    print(f"server: {runs} runs, {values} metric values")
    assert (runs, values) == (WRITERS * (CHILDREN + 1), WRITERS * CHILDREN * STEPS * len(METRICS))
