"""What many tests share: tiny studies (params, prepared data), the real `lth` executable, ports and servers.

Test files import from here (never from each other); conftest.py holds the fixtures.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import requests
import torch
import yaml

from lth.config import Params, params_from_dict
from lth.data.store import write_prepared
from lth.report.tables import COLUMNS
from lth.tickets import TicketMeta, read_ticket_meta, save_ticket
from lth.tracking import NullRun, NullTracker

BIN = Path(sys.executable).parent
SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------- tiny studies


def tiny_raw(tmp: Path, **overrides) -> dict:
    """A tiny study: width-4 ResNet-8 on 12-px images, 2 epochs, 2 rounds."""
    raw = {
        "paths": {k: str(tmp / k) for k in ("data", "models", "results", "reports")},
        "prepare": {"image_size": 12, "seed": 0, "datasets": {"fashion-mnist": {}, "digits": {}}},
        "model": {"arch": "resnet", "depth": 8, "width": 4},
        "train": {"batch_size": 16, "lr": 0.05, "max_epochs": 3, "patience": 2, "crop_size": 10,
                  "eval_batch_size": 64, "device": "cpu"},
        "imp": {"sources": ["fashion-mnist"], "seeds": [0], "rounds": 2, "pruning_rate": 0.2,
                "rewind_epoch": 1, "keep_epochs": 2},
        "transfer": {"targets": ["digits"], "sources": ["fashion-mnist"], "seeds": [0],
                     "related": [], "size_fractions": [0.5]},
        "tune": {"rewind_epochs": [0, 2]},
        "tracking": {"register": False, "system_metrics": False},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def tiny_params(root: Path, *, rounds: int = 2, **tracking_cfg: Any) -> Params:
    """One 3-class 'toy' dataset as source and target, IMP in seconds; tracking into root/mlflow.db unless given."""
    tracking_cfg.setdefault("uri", f"sqlite:///{root / 'mlflow.db'}")
    tracking_cfg.setdefault("register", True)
    raw = tiny_raw(root, prepare={"datasets": {"toy": {}}}, train={"max_epochs": 2},
                   imp={"sources": ["toy"], "rounds": rounds, "rewind_epoch": 1, "keep_epochs": 1},
                   transfer={"targets": ["toy"], "sources": ["toy"]},
                   tune={"source": "toy", "target": "toy", "rewind_epochs": [0, 1], "max_epochs": 2},
                   tracking=tracking_cfg)
    return params_from_dict(raw, "test")


def data_raw(root: Path, datasets: dict[str, Any], image_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Params (as YAML data) of a study that only prepares `datasets` under root/data."""
    return {"paths": {"data": str(root / "data")},
            "prepare": {"image_size": image_size, "seed": seed, "datasets": datasets},
            "train": {"crop_size": min(image_size, 12)}}


def write_params(root: Path, datasets: dict[str, Any], image_size: int = 16) -> Path:
    """root/params.yaml of data_raw (data under root/data); returns its path."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data_raw(root, datasets, image_size)))
    return path


def make_dataset(data_root: Path, name: str, num_classes: int, sizes=(96, 32, 32), size: int = 12,
                 seed: int = 0) -> None:
    """A learnable random dataset: each class has its own mean brightness pattern."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 200, (num_classes, 3, size, size))
    splits = {}
    for split, n in zip(("train", "val", "test"), sizes):
        y = np.arange(n) % num_classes
        x = np.clip(protos[y] + rng.integers(0, 56, (n, 3, size, size)), 0, 255).astype(np.uint8)
        splits[split] = (x, y.astype(np.int64))
    write_prepared(data_root, name, splits, [f"c{i}" for i in range(num_classes)], {"origin": "test"})


def write_toy(data_root: Path, name: str = "toy", seed: int = 0) -> None:
    """The 'toy' dataset of tiny_params: 3 classes, 48/24/24 images of 12 px."""
    make_dataset(data_root, name, 3, sizes=(48, 24, 24), seed=seed)


# ---------------------------------------------------------------- a kill in the middle of a fit


class Killed(Exception):
    """Stands in for a SIGKILL in-process: raised while an epoch is logged, after that epoch's checkpoint."""


class _DyingRun(NullRun):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def log_metrics(self, metrics, step: int | None = None) -> None:
        if step == self.epoch:
            raise Killed(f"killed after epoch {step}")


class KillAtEpoch(NullTracker):
    """A tracker whose child runs with `part` in their name die once epoch `epoch` is logged."""

    def __init__(self, part: str, epoch: int) -> None:
        self.part, self.epoch = part, epoch

    @contextlib.contextmanager
    def child(self, parent, run_name: str, *, params, tags) -> Iterator[NullRun]:
        yield _DyingRun(self.epoch) if self.part in run_name else NullRun()


# ---------------------------------------------------------------- tickets without training


def tiny_ticket(directory: Path, source: str, seed: int, round_: int) -> TicketMeta:
    """A 4-weight ticket of (source, seed, round), its weights unique to them, for registry tests; returns its meta."""
    meta = TicketMeta(source=source, arch="tiny", seed=seed, round=round_, sparsity=0.5, rewind_epoch=0,
                      num_classes=2, prunable=("w",), pruning_rate=0.2)
    weights = {"w": torch.tensor([1.0, 0.0, 0.0, 2.0]) + seed + round_ / 100}
    save_ticket(directory, meta, weights, {"w": torch.tensor([True, False, False, True])})
    return read_ticket_meta(directory)


# ---------------------------------------------------------------- the real `lth` executable


def write_cli_study(root: Path, **overrides) -> Path:
    """tiny.yaml (tracking to root/mlflow.db) and the two tiny prepared datasets under root; returns the params path."""
    raw = tiny_raw(root, **{"tracking": {"register": False, "uri": f"sqlite:///{root / 'mlflow.db'}"}, **overrides})
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    if not (root / "data" / "prepared" / "fashion-mnist").is_dir():
        make_dataset(root / "data", "fashion-mnist", 4, seed=1)
        make_dataset(root / "data", "digits", 3, seed=2)
    return path


def lth_env(**extra: str) -> dict[str, str]:
    """The environment of a user with the venv on PATH and no tracking server configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", TQDM_DISABLE="1", PYTHONHASHSEED="0",
               GIT_PYTHON_REFRESH="quiet", OMP_NUM_THREADS="1", **extra)
    return env


def ray_env(tmp: Path) -> dict[str, str]:
    """lth_env for Ray, set explicitly on every `ray start` and driver: an unset mode makes a local ray.init write a
    token; HOME under `tmp`, so nothing of Ray's lands in the user's."""
    return lth_env(RAY_AUTH_MODE="disabled", PYTHONPATH=str(SRC), RAY_USAGE_STATS_ENABLED="0", HOME=str(tmp))


def run_lth(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`lth ARGS` in `cwd`, output captured."""
    return subprocess.run([str(BIN / "lth"), *args], cwd=cwd, env=env or lth_env(), capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- ports and servers


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], log: Path, env: dict[str, str], health: str | Callable[[], bool],
                 timeout: float = 45.0) -> subprocess.Popen:
    """Start a server in its own process group and wait until `health` (a URL) answers 200, or (a check) is true."""
    ready = health if callable(health) else lambda: _answers(health)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if ready():
            return proc
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"{cmd[0]} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server we started (and its workers: the process group it leads)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def postgres_bin() -> Path | None:
    """The directory of initdb, postgres and createdb: Debian's newest /usr/lib/postgresql/<v>/bin, else PATH's."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: [int(n) for n in re.findall(r"\d+", p.parts[-3])])
    found = debian[-1] if debian else shutil.which("initdb")
    return Path(found).parent if found else None


@contextlib.contextmanager
def postgres_cluster(bin_dir: Path, database: str) -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (free port, temp dir) with `database`; yields its SQLAlchemy URL.

    postgres refuses to run as root: run as root (CI), the cluster belongs to the `postgres` user that Debian's
    package makes, in a directory of /tmp (pytest's own temp dirs are closed to other users).
    """
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="lth-pg-"))
    try:
        if as_user:
            shutil.chown(root, "postgres")
        data, port = root / "data", str(free_port())
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "lth", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True)
        address = ["-h", "127.0.0.1", "-p", port]
        ready = [str(bin_dir / "pg_isready"), *address, "-U", "lth", "-d", "postgres"]
        proc = start_server([*as_user, str(bin_dir / "postgres"), "-D", str(data), *address, "-k", str(root),
                             "-c", "fsync=off", "-c", "max_connections=200"], root / "postgres.log", dict(os.environ),
                            lambda: subprocess.run(ready, capture_output=True).returncode == 0)
        try:
            subprocess.run([str(bin_dir / "createdb"), *address, "-U", "lth", database], check=True)
            yield f"postgresql+psycopg2://lth@127.0.0.1:{port}/{database}"
        finally:
            stop_server(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- hand-made transfer results (the report's input)


FRACTION = {0: 0.0, 1: 0.2, 2: 0.36, 3: 0.488}  # 1 - 0.8^round

# (target, arm, source, size_fraction) -> {round: per-seed test accuracies}; seeds 0, 1, 2 (beta: 0, 1)
STUDY: dict[tuple[str, str, str, float], dict[int, list[float]]] = {
    ("alpha", "scratch", "", 1.0): {0: [0.80, 0.82, 0.84]},
    ("alpha", "transfer", "nat", 1.0): {0: [0.78, 0.80, 0.82], 1: [0.85, 0.86, 0.87], 2: [0.88, 0.90, 0.92],
                                        3: [0.83, 0.84, 0.85]},
    ("alpha", "target", "alpha", 1.0): {0: [0.80, 0.81, 0.82], 1: [0.80, 0.81, 0.82], 2: [0.82, 0.83, 0.84],
                                        3: [0.84, 0.85, 0.86]},
    ("alpha", "reinit", "alpha", 1.0): {0: [0.80, 0.81, 0.82], 1: [0.75, 0.76, 0.77], 2: [0.73, 0.74, 0.75],
                                        3: [0.69, 0.70, 0.71]},
    ("alpha", "trained", "nat", 1.0): {0: [0.78, 0.80, 0.82], 1: [0.78, 0.79, 0.80], 2: [0.79, 0.80, 0.81],
                                       3: [0.80, 0.81, 0.82]},
    ("alpha", "related", "rel", 1.0): {0: [0.80, 0.81, 0.82], 1: [0.82, 0.83, 0.84], 2: [0.86, 0.87, 0.88],
                                       3: [0.85, 0.86, 0.87]},
    ("alpha", "size", "alpha", 0.5): {0: [0.70, 0.71, 0.72], 1: [0.77, 0.78, 0.79], 2: [0.78, 0.79, 0.80],
                                      3: [0.76, 0.77, 0.78]},
    ("beta", "scratch", "beta", 1.0): {0: [0.60, 0.64]},  # scratch written with source = target: same thing
    ("beta", "transfer", "nat", 1.0): {0: [0.50, 0.52], 1: [0.58, 0.60], 2: [0.55, 0.57], 3: [0.50, 0.52]},
    ("beta", "target", "beta", 1.0): {0: [0.60, 0.62], 1: [0.62, 0.66], 2: [0.61, 0.63], 3: [0.59, 0.61]},
}


def study_rows(study: dict = STUDY) -> pd.DataFrame:
    """The hand-made results table in the `lth transfer` CSV format."""
    rows = []
    for (target, arm, source, size), by_round in study.items():
        for rnd, accs in by_round.items():
            for seed, acc in enumerate(accs):
                rows.append({"target": target, "arm": arm, "source": source, "seed": seed, "round": rnd,
                             "fraction_pruned": FRACTION[rnd], "size_fraction": size, "test_acc": acc,
                             "test_loss": 1 - acc, "val_acc": acc, "val_loss": 1 - acc, "best_epoch": 2,
                             "epochs": 4, "seconds": 1.5})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def study_params(tmp_path: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> Params:
    """A study configured for STUDY, writing under tmp_path."""
    return params_from_dict({
        "paths": {"results": str(tmp_path / "results"), "reports": str(tmp_path / "reports")},
        "prepare": {"datasets": {"alpha": {}, "beta": {}, "nat": {}, "rel": {}}},
        "imp": {"sources": ["nat"], "rounds": 3},
        "transfer": {"targets": ["alpha", "beta"], "sources": ["nat"], "seeds": list(seeds),
                     "related": [{"source": "rel", "target": "alpha"}], "size_fractions": [0.5]},
    }, "test")


def write_results(tmp_path: Path, df: pd.DataFrame | None = None, seeds: tuple[int, ...] = (0, 1, 2)) -> Params:
    """Write STUDY (or df) as results/transfer/<target>.csv; return the matching params."""
    df = study_rows() if df is None else df
    params = study_params(tmp_path, seeds)
    out = Path(params.paths.results) / "transfer"
    out.mkdir(parents=True, exist_ok=True)
    for target, rows in df.groupby("target"):
        rows.to_csv(out / f"{target}.csv", index=False)
    return params


# ---------------------------------------------------------------- MLflow runs


def runs_of(client: Any, experiment: str) -> list[Any]:
    """Every run of an MLflow experiment (it must exist)."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} missing"
    return client.search_runs([exp.experiment_id], max_results=1000)


def parents_and_children(client: Any, experiment: str) -> tuple[list[Any], list[Any]]:
    """An experiment's parent runs and nested runs."""
    runs = runs_of(client, experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]
