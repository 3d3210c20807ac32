"""SIGKILL `lth imp` and `lth transfer` at seeded random points, rerun until done: the same bytes as one clean run.

Kill points are tied to progress (a fit checkpoint or a ticket appearing) plus a seeded random delay, so each
kill lands somewhere new (mid-epoch, between epochs, between rounds) whatever the machine's speed. Same bytes
alone would not show a resume (a fit started over gives them too): each try's "resuming <run> after epoch k"
lines are checked against the checkpoints it found, and the study anneals its learning rate after epoch 1.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from helpers import BIN, lth_env, run_lth, write_cli_study
from lth.tracking.mlflow import PARENT_TAG

pytestmark = pytest.mark.e2e
IMP = ["imp", "fashion-mnist", "--seed", "0", "--params", "tiny.yaml"]
TRANSFER = ["transfer", "digits", "--arm", "scratch", "--arm", "transfer", "--arm", "trained", "--params", "tiny.yaml"]
SEED_DIR = Path("models/tickets/fashion-mnist/seed0")
RESULTS = Path("results/transfer/digits")


RESUMED = re.compile(r"resuming (.+) after epoch (\d+)/\d+")


@dataclass
class Try:
    """One start of `lth`: the fits it could resume (checkpoint stem -> finished epochs) and what it printed."""

    resumable: dict[str, int]
    output: str = ""
    killed: bool = False

    def resumed(self) -> list[int]:
        """The epochs this try said it resumed after ('resuming <run> after epoch k/cap' on stderr)."""
        return [int(m.group(2)) for m in RESUMED.finditer(self.output)]


def resumable(cwd: Path, output_of: Callable[[str], Path]) -> dict[str, int]:
    """Complete checkpoints under cwd whose fit has not written its output yet: stem -> epochs they hold."""
    found = {}
    for info in cwd.rglob(".checkpoints/*.json"):
        epoch = json.loads(info.read_text())["epoch"]
        # a kill between the tensors and the JSON leaves them disagreeing: that fit rightly starts over
        if load_file(str(info.with_suffix(".safetensors")))["__epoch__"].item() == epoch:
            if not output_of(info.stem).exists():
                found[info.stem] = epoch
    return found


def kill_when(args: list[str], cwd: Path, ready: Callable[[], bool], delay: float,
              output_of: Callable[[str], Path], timeout: float = 180) -> Try:
    """Start `lth ARGS`; once `ready()` holds, wait `delay` s and SIGKILL it (unless it finished first)."""
    attempt = Try(resumable(cwd, output_of))
    log_path = cwd / "kill.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(BIN / "lth"), *args], cwd=cwd, env=lth_env(), stdout=log, stderr=log,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline, "no progress before the kill point"
            time.sleep(0.001)  # a kill point right after a checkpoint must land inside the fit's next epoch
        time.sleep(delay)
        if proc.poll() is not None:
            assert proc.returncode == 0, log_path.read_text()[-3000:]
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            attempt.killed = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    attempt.output = log_path.read_text()
    return attempt


def kill_and_finish(args: list[str], cwd: Path, points: list[Callable[[], bool]], seed: int,
                    output_of: Callable[[str], Path]) -> tuple[int, int]:
    """Kill at each point, then rerun to completion; checks every try resumed what it should.

    The first kill lands at once (mid-fit); the others after a seeded random delay. Each try may only say it
    resumed a checkpoint that was there when it started, at that checkpoint's epoch; the last try, which
    finishes everything, must resume every checkpoint left unfinished; at least one try resumes.
    """
    rng = random.Random(seed)
    tries = [kill_when(args, cwd, ready, 0.0 if i == 0 else rng.uniform(0.0, 0.6), output_of)
             for i, ready in enumerate(points)]
    last = Try(resumable(cwd, output_of))
    done = run_lth(args, cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    last.output = done.stderr
    for t in [*tries, last]:
        assert Counter(t.resumed()) <= Counter(t.resumable.values()), (t.resumable, t.output[-2000:])
    assert sorted(last.resumed()) == sorted(last.resumable.values()), (last.resumable, last.output[-2000:])
    resumes = sum(len(t.resumed()) for t in [*tries, last])
    assert resumes >= 1, "no try resumed a killed fit"
    return sum(t.killed for t in tries), resumes


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
        write_cli_study(root, transfer={"rounds": [0, 2]},
                        train={"lr_schedule": "step", "lr_anneal_epochs": [1], "lr_anneal_factor": 0.5})

    assert run_lth(IMP, clean).returncode == 0
    ckpt = killed / SEED_DIR / ".checkpoints"
    imp_kills, imp_resumes = kill_and_finish(IMP, killed, [
        exists(ckpt / "round00.json"),  # dense run, after its first epoch
        exists(killed / SEED_DIR / "round00" / "ticket.json"),  # between round 0 and round 1
        exists(ckpt / "round01.json"),  # round 1, mid-training
        exists(killed / SEED_DIR / "round01" / "ticket.json"),  # between rounds 1 and 2
    ], seed=0, output_of=lambda stem: killed / SEED_DIR / stem / "ticket.json")
    assert tensors(killed) == tensors(clean) and len(tensors(clean)) == 3 * 3 + 3
    imp_status = check_runs(killed / "mlflow.db", "imp/fashion-mnist", steps=3)
    assert check_runs(clean / "mlflow.db", "imp/fashion-mnist", steps=3) == Counter(FINISHED=3)

    shutil.copytree(clean / "models", killed / "models", dirs_exist_ok=True)
    assert run_lth(TRANSFER, clean).returncode == 0
    runs = killed / RESULTS / "runs"
    transfer_kills, transfer_resumes = kill_and_finish(TRANSFER, killed, [
        exists(killed / RESULTS / ".checkpoints" / "scratch-none-s0-r00.json"),  # first fine-tune, mid-training
        exists(runs / "scratch-none-s0-r00.json"),  # between fine-tunes
        exists(runs / "trained-fashion-mnist-s0-r02.json"),  # between the trained and transfer arms
    ], seed=1, output_of=lambda stem: runs / f"{stem}.json")
    csv = Path("results/transfer/digits.csv")
    a, b = (pd.read_csv(root / csv).drop(columns="seconds") for root in (clean, killed))
    assert len(a) == 5 and a.to_csv() == b.to_csv()
    transfer_status = check_runs(killed / "mlflow.db", "transfer/digits", steps=5)
    assert not list(killed.rglob("*.tmp")), "a killed atomic write left its temporary file behind"

    kills = imp_kills + transfer_kills
    print(f"kills survived: imp {imp_kills}, transfer {transfer_kills}; fits resumed: imp {imp_resumes}, "
          f"transfer {transfer_resumes}; child runs imp {dict(imp_status)}, "
          f"transfer {dict(transfer_status)}")
    assert imp_kills >= 3 and transfer_kills >= 2, kills
