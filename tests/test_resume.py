"""SIGKILL `lth imp` and `lth transfer` at seeded random points, rerun until done: the same bytes as one clean run.

Kill points are tied to progress (a fit checkpoint or a ticket appearing) plus a seeded random delay, so each
kill lands somewhere new (mid-epoch, between epochs, between rounds) whatever the machine's speed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
from mlflow import MlflowClient

from helpers import BIN, lth_env, run_lth, write_cli_study
from lth.tracking.mlflow import PARENT_TAG

pytestmark = pytest.mark.e2e
IMP = ["imp", "fashion-mnist", "--seed", "0", "--params", "tiny.yaml"]
TRANSFER = ["transfer", "digits", "--arm", "scratch", "--arm", "transfer", "--arm", "trained", "--params", "tiny.yaml"]
SEED_DIR = Path("models/tickets/fashion-mnist/seed0")
RESULTS = Path("results/transfer/digits")


def kill_when(args: list[str], cwd: Path, ready: Callable[[], bool], delay: float, timeout: float = 180) -> bool:
    """Start `lth ARGS`; once `ready()` holds, wait `delay` s and SIGKILL it. True if it was killed, not finished."""
    with open(cwd / "kill.log", "ab") as log:
        proc = subprocess.Popen([str(BIN / "lth"), *args], cwd=cwd, env=lth_env(), stdout=log, stderr=log,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline, "no progress before the kill point"
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is not None:
            assert proc.returncode == 0, (cwd / "kill.log").read_text()[-3000:]
            return False
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kill_and_finish(args: list[str], cwd: Path, points: list[Callable[[], bool]], seed: int) -> int:
    """Kill at each point (after a seeded random delay), then rerun to completion; returns the kills survived."""
    rng = random.Random(seed)
    kills = sum(kill_when(args, cwd, ready, rng.uniform(0.0, 0.6)) for ready in points)
    done = run_lth(args, cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return kills


def exists(path: Path) -> Callable[[], bool]:
    return path.exists


def tensors(root: Path) -> dict[str, bytes]:
    """Every ticket and rewind-point safetensors file under root/models, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "models").rglob("*.safetensors"))
            if ".checkpoints" not in p.parts}


def check_runs(db: Path, experiment: str, steps: int) -> Counter:
    """One reused FINISHED parent; per step at most one FINISHED child and none left RUNNING; complete curves."""
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert [p.info.status for p in parents] == ["FINISHED"]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    status = Counter(r.info.status for r in children)
    assert status["RUNNING"] == 0
    names = {r.info.run_name for r in children}
    assert len(names) == steps
    for name in names:
        finished = [r for r in children if r.info.run_name == name and r.info.status == "FINISHED"]
        assert len(finished) <= 1, f"{name} logged twice as FINISHED"
        for run in finished:  # a resumed fit replays the epochs of the killed try into its own run
            epochs = int(run.data.metrics["epochs"])
            history = client.get_metric_history(run.info.run_id, "train_loss")
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), name
    return status


def test_imp_and_transfer_survive_sigkill(tmp_path: Path) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for root in (clean, killed):
        root.mkdir()
        write_cli_study(root, transfer={"rounds": [0, 2]})

    assert run_lth(IMP, clean).returncode == 0
    ckpt = killed / SEED_DIR / ".checkpoints"
    imp_kills = kill_and_finish(IMP, killed, [
        exists(ckpt / "round00.json"),  # dense run, after its first epoch
        exists(killed / SEED_DIR / "round00" / "ticket.json"),  # between round 0 and round 1
        exists(ckpt / "round01.json"),  # round 1, mid-training
        exists(killed / SEED_DIR / "round01" / "ticket.json"),  # between rounds 1 and 2
    ], seed=0)
    assert tensors(killed) == tensors(clean) and len(tensors(clean)) == 3 * 3 + 3
    imp_status = check_runs(killed / "mlflow.db", "imp/fashion-mnist", steps=3)
    assert check_runs(clean / "mlflow.db", "imp/fashion-mnist", steps=3) == Counter(FINISHED=3)

    shutil.copytree(clean / "models", killed / "models", dirs_exist_ok=True)
    assert run_lth(TRANSFER, clean).returncode == 0
    runs = killed / RESULTS / "runs"
    transfer_kills = kill_and_finish(TRANSFER, killed, [
        exists(killed / RESULTS / ".checkpoints"),  # first fine-tune, mid-training
        exists(runs / "scratch-none-s0-r00.json"),  # between fine-tunes
        exists(runs / "trained-fashion-mnist-s0-r02.json"),  # between the trained and transfer arms
    ], seed=1)
    csv = Path("results/transfer/digits.csv")
    a, b = (pd.read_csv(root / csv).drop(columns="seconds") for root in (clean, killed))
    assert len(a) == 5 and a.to_csv() == b.to_csv()
    transfer_status = check_runs(killed / "mlflow.db", "transfer/digits", steps=5)
    assert not list(killed.rglob("*.tmp")), "a killed atomic write left its temporary file behind"

    kills = imp_kills + transfer_kills
    print(f"kills survived: imp {imp_kills}, transfer {transfer_kills}; child runs imp {dict(imp_status)}, "
          f"transfer {dict(transfer_status)}")
    assert imp_kills >= 3 and transfer_kills >= 2, kills
