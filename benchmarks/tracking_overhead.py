"""Share of an IMP job's wall time spent in MLflow: a real, small IMP job logging to a temp sqlite store.

Every MLflow client call of lth goes through tracking.Store (call on the job's thread; submit/call_later queue
writes for the tracker's writer thread, and drain waits for them at the job's end). Those, the tracker's
construction (reachability check, client), the provenance tags (git) and MLflow's system metrics monitor
(tracking.system_metrics, on as in params.yaml: started and stopped by the job, sampling on its own thread) are
timed by wrapping them: the share is
the time the job's own thread spends in them. As a cross-check, the same job also runs untracked, alternating
with the tracked one, and the wall-time difference is reported. Importing mlflow, paid once per `lth` process,
is measured apart in fresh interpreters (median of alternating runs with and without it).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from mlflow import MlflowClient
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from benchmarks.common import median, report
from lth.study import imp
from lth import tracking
from lth.tracking import mlflow as tracking_mlflow
from lth.tracking.mlflow import trackers as tracking_trackers
from lth.config import params_from_dict
from lth.data.prepare import prepare_dataset
from lth.errors import UserError
from lth.data.store import write_prepared

ROOT = Path(__file__).resolve().parent.parent


def _params(tmp: Path, rounds: int | None, epochs: int | None):
    """The demo's params in `tmp`; rounds/epochs None keep the demo's own values."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {k: str(tmp / k) for k in ("data", "models", "results", "reports")}
    rounds = raw["imp"]["rounds"] if rounds is None else rounds
    epochs = raw["train"]["max_epochs"] if epochs is None else epochs
    raw["imp"] |= {"sources": ["fashion-mnist"], "seeds": [0], "rounds": rounds}
    raw["train"] |= {"max_epochs": epochs, "device": "cpu"}
    raw["tune"] |= {"rewind_epochs": [0, min(epochs, raw["imp"]["keep_epochs"])], "max_epochs": epochs}
    raw["tracking"] = {"uri": f"sqlite:///{tmp}/mlflow.db", "register": True, "artifact_location": None,
                       "system_metrics": True}  # as params.yaml: jobs log system metrics
    return params_from_dict(raw)


def _demo_sized_source(data_root: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 200, (10, 3, size, size))
    splits = {}
    for split, n in (("train", 2000), ("val", 500), ("test", 1000)):  # the demo's fashion-mnist subset sizes
        y = np.arange(n) % 10
        x = np.clip(protos[y] + rng.integers(0, 56, (n, 3, size, size)), 0, 255).astype(np.uint8)
        splits[split] = (x, y.astype(np.int64))
    write_prepared(data_root, "fashion-mnist", splits, [f"c{i}" for i in range(10)], {"origin": "benchmark"})


class _Timer:
    """Wraps functions so the seconds spent inside them add up, apart for the job's own thread and the others.

    `seconds` is what the job waits for (calls on its thread, including waiting for queued writes at its end);
    `background_seconds` is the wall time of the writer thread's calls (GIL and lock waits included);
    `cpu_seconds` is the CPU time of all calls on all threads. Only outermost calls count.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.background_seconds = 0.0
        self.cpu_seconds = 0.0  # CPU time of the calls on every thread: their cost if nothing overlapped
        self.cpu_by: dict[str, float] = {}  # CPU seconds per MLflow client method (or wrapped function), all threads
        self._lock = threading.Lock()
        self.calls = 0
        self.by: dict[str, float] = {}  # seconds per MLflow client method (or wrapped function), job thread
        self._depth = threading.local()
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth
                if depth == 0:
                    self._add(name, args, time.perf_counter() - t0, time.thread_time() - c0)

        self._undo.append((owner, name, fn))
        setattr(owner, name, timed)

    def _add(self, name: str, args: tuple, spent: float, cpu: float) -> None:
        key = name
        if name in ("call", "call_later", "submit", "create") and len(args) > 1:  # (store, fn, ...): the MLflow method
            fn = args[2] if getattr(args[1], "__name__", "") == "call" and len(args) > 2 else args[1]
            key = getattr(fn, "__name__", name)
        with self._lock:
            self.cpu_seconds += cpu
            self.cpu_by[key] = self.cpu_by.get(key, 0.0) + cpu
        if threading.current_thread() is not threading.main_thread():
            self.background_seconds += spent
            return
        self.seconds += spent
        self.calls += 1
        key = f"{key} (queued)" if name in ("call_later", "submit") else key
        self.by[key] = self.by.get(key, 0.0) + spent

    def restore(self) -> None:
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)


def _import_seconds(repeats: int) -> float:
    """Extra start-up of a process that imports lth.tracking.mlflow (and so mlflow) over one importing the core only."""
    core = "import torch, lth.training, lth.pruning, lth.models"
    samples = []
    for _ in range(repeats):
        pair = []
        for code in (core, core + ", lth.tracking.mlflow"):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
            pair.append(time.perf_counter() - t0)
        samples.append(pair[1] - pair[0])
    return median(samples)


# tracking.system_metrics (on, as in params.yaml): starting and stopping the monitor on the job's thread; on its
# own thread, sampling (psutil), the run-status check with a fresh client, and logging each sample.
SYSTEM_METRICS = ((SystemMetricsMonitor, "__init__"), (SystemMetricsMonitor, "start"), (SystemMetricsMonitor, "finish"),
                  (SystemMetricsMonitor, "collect_metrics"), (SystemMetricsMonitor, "publish_metrics"),
                  (MlflowClient, "__init__"), (MlflowClient, "get_run"))


def _job_seconds(params, make_tracker) -> float:
    """Wall time of the demo's IMP job for fashion-mnist, seed 0, in a fresh models folder, tracker included."""
    job = imp.make_job("fashion-mnist", 0, params)
    t0 = time.perf_counter()
    imp.run_imp(job, params, make_tracker())
    return time.perf_counter() - t0


def run(args) -> dict:
    quick = getattr(args, "quick", False)
    # Full: the demo's own IMP job (real Fashion-MNIST subset, demo rounds and epochs), 5 pairs. Quick, or
    # without the Debian data: a synthetic demo-sized source, 1 round of at most 3 epochs, 1 pair.
    rounds, epochs = (1, 3) if quick else (None, None)
    pairs = getattr(args, "repeats", None) or (1 if quick else 5)
    with tempfile.TemporaryDirectory(prefix="lth-bench-") as tmp_name:
        tmp = Path(tmp_name)
        params = _params(tmp, rounds, epochs)
        data = "synthetic"
        if not quick:
            try:
                prepare_dataset("fashion-mnist", params)
                data = "real Fashion-MNIST demo subset"
            except UserError:
                pass
        if data == "synthetic":
            _demo_sized_source(Path(params.paths.data), params.prepare.image_size)
        rounds, epochs = params.imp.rounds, params.train.max_epochs
        # Side by side: the same job without tracking and with it, alternating (order swapped every pair);
        # each job in its own models folder and MLflow store, so it trains every round and starts a new run.
        shares, background, cpu, costs, walls, timers = [], [], [], [], [], []
        for i in range(pairs):
            wall = {}
            for kind in (("null", "mlflow") if i % 2 == 0 else ("mlflow", "null")):
                p = replace(params, paths=replace(params.paths, models=str(tmp / f"models-{kind}-{i}")),
                            tracking=replace(params.tracking, uri=f"sqlite:///{tmp}/mlflow-{i}.db"))
                # The study's mlflow.db exists before its jobs run: create the tables outside the timed job.
                tracking_mlflow.MlflowTracker(p.tracking).store.experiment_id("warm-up")
                if kind == "null":
                    wall[kind] = _job_seconds(p, tracking.NullTracker)
                    continue
                timer = _Timer()
                for owner, name in ((tracking_mlflow.Store, "call"), (tracking_mlflow.Store, "create"),
                                    (tracking_mlflow.Store, "submit"),
                                    (tracking_mlflow.Store, "drain"), (tracking_mlflow.MlflowTracker, "__init__"),
                                    (tracking_trackers, "_provenance_tags"), *SYSTEM_METRICS):
                    timer.wrap(owner, name)
                try:
                    wall[kind] = _job_seconds(p, lambda: tracking_mlflow.MlflowTracker(p.tracking))
                finally:
                    timer.restore()
                timers.append(timer)
                shares.append(timer.seconds / wall[kind])
                background.append(timer.background_seconds / wall[kind])
                cpu.append(timer.cpu_seconds / wall[kind])
            costs.append(wall["mlflow"] / wall["null"] - 1)
            walls.append(wall["mlflow"])
    import_s = _import_seconds(2 if quick else 3)
    # Every figure below is a median over the tracked jobs; the per-call breakdown is the median job's.
    share, cost, cpu_share, bg_share = median(shares), median(costs), median(cpu), median(background)
    wall = median(walls)
    mlflow_s = median([t.seconds for t in timers])
    cpu_s, bg_s = median([t.cpu_seconds for t in timers]), median([t.background_seconds for t in timers])
    timer = timers[shares.index(sorted(shares)[(len(shares) - 1) // 2])]
    share_with_import = (mlflow_s + import_s) / (wall + import_s)
    by_call = dict(sorted(timer.by.items(), key=lambda kv: -kv[1]))
    rows = [["IMP job wall (%s; dense + %d rounds, <= %d epochs each)" % (data, rounds, epochs), wall, ""],
            ["job waits for MLflow (%d calls on its thread)" % timer.calls, mlflow_s, f"{100 * share:.2f}%"],
            *[[f"  of which {k} (median job)", v, ""] for k, v in list(by_call.items())[:6]],
            ["MLflow writer thread, meanwhile (wall)", bg_s, f"{100 * bg_share:.2f}%"],
            ["MLflow CPU time, all threads (cost if nothing overlapped)", cpu_s, f"{100 * cpu_share:.2f}%"],
            [f"wall with MLflow / without - 1 ({pairs} pairs; noisy)", "",
             f"{100 * cost:+.2f}% (" + ", ".join(f"{100 * c:+.1f}" for c in costs) + ")"],
            ["mlflow import, once per process", import_s, f"{100 * share_with_import:.2f}% incl. import"]]
    return report("tracking_overhead", ["what", "seconds", "share of job"], rows,
                  {"target": "<= 2% of an IMP job's wall time", "data": data, "rounds": rounds, "max_epochs": epochs,
                   "pairs": pairs, "statistic": "median over the tracked jobs (by_call: the median job's)",
                   "job_seconds": wall, "mlflow_seconds": mlflow_s, "mlflow_calls": timer.calls,
                   "share": share, "shares": shares, "mlflow_seconds_by_call": by_call,
                   "writer_thread_seconds": bg_s, "writer_thread_share": bg_share,
                   "cpu_seconds": cpu_s, "cpu_share": cpu_share, "cpu_shares": cpu,
                   "cpu_seconds_by_call": dict(sorted(timer.cpu_by.items(), key=lambda kv: -kv[1])),
                   "wall_cost_vs_untracked": cost, "wall_costs_vs_untracked": costs,
                   "import_seconds": import_s, "share_with_import": share_with_import,
                   "met": share <= 0.02 and cpu_share <= 0.02})
