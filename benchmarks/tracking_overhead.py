"""Share of an IMP job's wall time spent in MLflow: a real, small IMP job logging to a temp sqlite store.

Every MLflow client call of lth goes through tracking.Store.call; that, the tracker's construction (reachability
check, client) and the provenance tags (git) are timed by wrapping them. Importing mlflow, paid once per
`lth` process, is measured apart in fresh interpreters (median of alternating runs with and without it).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import median, report
from lth import imp, tracking
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
    raw["tracking"] = {"uri": f"sqlite:///{tmp}/mlflow.db", "register": True, "artifact_location": None}
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
    """Wraps functions so the seconds spent inside them add up in `.seconds`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.by: dict[str, float] = {}  # seconds per MLflow client method (or wrapped function)
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                self.seconds += spent
                self.calls += 1
                key = getattr(args[1], "__name__", name) if name == "call" and len(args) > 1 else name
                self.by[key] = self.by.get(key, 0.0) + spent

        self._undo.append((owner, name, fn))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)


def _import_seconds(repeats: int) -> float:
    """Extra start-up of a process that imports lth.tracking (and so mlflow) over one importing the core only."""
    core = "import torch, lth.training, lth.pruning, lth.models"
    samples = []
    for _ in range(repeats):
        pair = []
        for code in (core, core + ", lth.tracking"):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
            pair.append(time.perf_counter() - t0)
        samples.append(pair[1] - pair[0])
    return median(samples)


def run(args) -> dict:
    quick = getattr(args, "quick", False)
    # Full: the demo's own IMP job (real Fashion-MNIST subset, demo rounds and epochs). Quick, or without
    # the Debian data: a synthetic demo-sized source, 1 round of at most 3 epochs.
    rounds, epochs = (1, 3) if quick else (None, None)
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
        job = imp.make_job("fashion-mnist", 0, params)
        # The study's mlflow.db exists before its jobs run: create the tables outside the timed job.
        tracking.MlflowTracker(params.tracking).store.experiment_id("warm-up")
        timer = _Timer()
        for owner, name in ((tracking.Store, "call"), (tracking.MlflowTracker, "__init__"),
                            (tracking, "_provenance_tags")):
            timer.wrap(owner, name)
        try:
            t0 = time.perf_counter()
            imp.run_imp(job, params, tracking.MlflowTracker(params.tracking))
            wall = time.perf_counter() - t0
        finally:
            timer.restore()
    import_s = _import_seconds(2 if quick else 3)
    share = timer.seconds / wall
    share_with_import = (timer.seconds + import_s) / (wall + import_s)
    by_call = dict(sorted(timer.by.items(), key=lambda kv: -kv[1]))
    rows = [["IMP job wall (%s; dense + %d rounds, <= %d epochs each)" % (data, rounds, epochs), wall, ""],
            ["in MLflow calls (%d timed calls)" % timer.calls, timer.seconds, f"{100 * share:.2f}%"],
            *[[f"  of which {k}", v, f"{100 * v / wall:.2f}%"] for k, v in list(by_call.items())[:5]],
            ["mlflow import, once per process", import_s, f"{100 * share_with_import:.2f}% incl. import"]]
    return report("tracking_overhead", ["what", "seconds", "share of job"], rows,
                  {"target": "<= 2% of an IMP job's wall time", "data": data, "rounds": rounds, "max_epochs": epochs,
                   "job_seconds": wall, "mlflow_seconds": timer.seconds, "mlflow_calls": timer.calls,
                   "share": share, "mlflow_seconds_by_call": by_call,
                   "import_seconds": import_s, "share_with_import": share_with_import,
                   "met": share <= 0.02})
