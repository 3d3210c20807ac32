"""`lth tune`: an Optuna study of the rewind epoch and the fine-tuning learning rate of a transferred ticket.

The only module that imports optuna. Every trial shares the source's one dense run (its early
checkpoints are the rewind points); the ticket of round `tune.round` is computed once per rewind epoch
(lth.study.tune_tickets), so trials that differ only in learning rate reuse it. `tune.n_trials` is the number of
finished (complete or pruned) trials the study should have: a rerun adds only the missing ones, and
raising it resumes the same study with more trials. A study (and its ticket cache) resumes only under
the settings it was started with, so that its trials stay comparable.

In parallel (`Parallel`, e.g. Ray tasks), N workers run trials on the one study in its shared storage
(tune_worker): each takes a trial while the study's finished trials plus those under way in this run are
fewer than tune.n_trials, so the total is exact but for two workers starting their last trial within the
same few milliseconds. A worker that dies leaves its trial RUNNING until its heartbeat lapses; the others
then mark it FAIL and run one in its place. Workers get the study's tickets and the target's splits as
bytes (lth.study.tune_tickets) and log their trials as nested runs of the driver's parent run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy.exc
import yaml
from sqlalchemy.engine import make_url

from lth.config import Params, flatten
from lth.data.registry import get_spec
from lth.data.store import DATASET_JSON, PreparedDataset, load_prepared, prepared_dir, read_dataset_meta
from lth.errors import UserError
from lth.fsutil import atomic_write_text
from lth.tracking import NullRun, NullTracker, Run, Tracker
from lth.study.files import Files, read_files, scratch_project
from lth.study.step import Step, StepResult, run_step
from lth.training import EpochMetrics
from lth.study.transfer import FineTune, initial_network
from lth.study.imp import rewind_points
from lth.study.tune_tickets import (
    check_settings, claim_cache, ensure_dense, ensure_ticket, study_settings, ticket_files,
)

PRUNER_STARTUP_TRIALS = 3  # trials that always run to the end before the median pruner may stop one
PRUNER_WARMUP_EPOCHS = 1  # never prune after the first epoch: a fresh head's first accuracy says little
HEARTBEAT_S = 60  # a trial whose process died is marked FAIL this long (+ grace) after its last heartbeat
GRACE_S = 180
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
SETTINGS_ATTR = "lth.settings"
WORKER_ATTR = "lth.worker"  # trial user attr: host:pid of the process that ran it
WORKER_SEED_STRIDE = 1_000_003  # parallel worker i samples from seed + i * this, so no two draw the same trials
WAIT_S = 2.0  # how often a worker whose turn is over looks whether a trial under way failed


@dataclass(frozen=True)
class Parallel:
    """How trials run on other workers: launch(fn, args, progress) runs fn(i, *args) on each worker i and
    returns their results, showing progress() as it changes; make_tracker builds a worker's tracker."""

    launch: Callable[[Callable[..., Any], tuple[Any, ...], Callable[[], str]], list[Any]]
    make_tracker: Callable[[], Tracker] | None = None


@dataclass(frozen=True)
class TuneResult:
    """What the study found: the best trial's values, one row per trial, and the files written."""

    study_name: str
    best_trial: int
    rewind_epoch: int
    lr: float
    val_acc: float
    trials: list[dict[str, Any]]
    best_path: Path
    trials_path: Path
    workers: dict[str, list[int]]  # process (host:pid) -> numbers of the trials it ran in this call


def tune_dir(params: Params) -> Path:
    """results/tune/: the default Optuna database, best.yaml and trials.csv."""
    return Path(params.paths.results) / "tune"


def storage_url(params: Params) -> str:
    """tune.storage (a relative sqlite path made absolute), else sqlite:///<abs>/results/tune/optuna.db."""
    # Absolute, because `dvc exp run` works in a temporary copy that a relative path would point into.
    url = params.tune.storage or f"sqlite:///{(tune_dir(params) / 'optuna.db').resolve()}"
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise UserError(f"tune.storage: {url!r} is not a database URL (e.g. sqlite:///abs/optuna.db, "
                        "postgresql+psycopg2://user@host/db)") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        path = Path(parsed.database).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = parsed.set(database=str(path)).render_as_string(hide_password=False)
    return url


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def shared_storage(params: Params) -> dict[str, str]:
    """The study's storage for a check that workers on other hosts can reach it (URL -> what to do if not)."""
    url = storage_url(params)
    return {url: f"tune.storage {_shown(url)} is a sqlite file on this host, which the cluster's other nodes cannot "
                 "open: set tune.storage / --storage to a PostgreSQL or MySQL URL (Optuna's advice for workers on "
                 "several hosts)"}


def open_study(source: str, target: str, params: Params, pruner: optuna.pruners.BasePruner | None = None,
               worker: int | None = None) -> optuna.Study:
    """The study tune.study_name in its storage, created or loaded (resumed) when its settings match.

    `worker`: the index of a parallel worker, which samples from a seed of its own.
    """
    url = storage_url(params)
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5.0, and what resuming needs
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        study = optuna.create_study(storage=storage, study_name=params.tune.study_name, direction="maximize",
                                    load_if_exists=True, pruner=pruner or optuna.pruners.MedianPruner(
                                        n_startup_trials=PRUNER_STARTUP_TRIALS,
                                        n_warmup_steps=PRUNER_WARMUP_EPOCHS))
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"Optuna storage {_shown(url)} unusable: {reason}") from None
    settings = study_settings(source, target, params)
    if SETTINGS_ATTR not in study.user_attrs:
        study.set_user_attr(SETTINGS_ATTR, settings)
    check_settings(study.user_attrs[SETTINGS_ATTR], settings, f"study {study.study_name!r} in {_shown(url)}",
                    "give tune.study_name (--study-name) a new name, or delete that study")
    # Seeded by how far the study got, so a resumed study does not replay its first trials' samples.
    done = len(study.trials)
    # TPE's constant liar (on by default in Optuna 5) keeps parallel workers away from each other's trials
    study.sampler = optuna.samplers.TPESampler(seed=params.tune.seed + done + (worker or 0) * WORKER_SEED_STRIDE,
                                               n_startup_trials=max(2, min(10, params.tune.n_trials // 2)))
    return study


class _Objective:
    """One trial: the ticket for its rewind epoch, transferred to the target and fine-tuned at its lr."""

    def __init__(self, source: str, target: str, data: PreparedDataset, params: Params, tracker: Tracker,
                 parent: Run) -> None:
        self.source, self.target, self.data = source, target, data
        self.params, self.tracker, self.parent = params, tracker, parent
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.ran: list[int] = []

    def __call__(self, trial: optuna.Trial) -> float:
        """Best validation accuracy of the fine-tune (TrialPruned when the median pruner stops it)."""
        cfg = self.params.tune
        trial.set_user_attr(WORKER_ATTR, self.worker)
        self.ran.append(trial.number)
        rewind_epoch = trial.suggest_int("rewind_epoch", *cfg.rewind_epochs)
        lr = trial.suggest_float("lr", *cfg.lr_range, log=True)
        root = ensure_ticket(self.source, rewind_epoch, self.params, self.tracker)
        ft = FineTune(self.target, "transfer", self.source, cfg.seed, cfg.round)
        model, mask = initial_network(ft, self.data, replace(self.params, paths=replace(self.params.paths,
                                                                                         models=str(root))))
        tags = {"source": self.source, "target": self.target, "study": cfg.study_name,
                "trial": str(trial.number), "round": str(cfg.round), WORKER_ATTR: self.worker}
        step = Step(f"tune {cfg.study_name} t{trial.number:03d}",
                    {"trial": trial.number, "rewind_epoch": rewind_epoch, "lr": lr, "round": cfg.round}, tags,
                    seed=ft.fit_seed, mask=mask, lr=lr, max_epochs=cfg.max_epochs, test=False)
        history: list[EpochMetrics] = []

        def on_epoch(m: EpochMetrics) -> None:
            history.append(m)
            trial.report(m.val_acc, m.epoch)
            if trial.should_prune():  # raised through fit(), which stops there
                raise optuna.TrialPruned(f"pruned after epoch {m.epoch}")

        def save(run: Run, done: StepResult | None) -> float:
            """The objective: the fine-tune's best validation accuracy over its epochs."""
            objective = max((m.val_acc for m in history), default=0.0)
            run.log_metrics({"objective": objective} | ({} if done else {"epochs": float(len(history))}))
            run.set_tags({"optuna.state": "COMPLETE" if done is not None else "PRUNED"})
            return objective

        return run_step(self.tracker, self.parent, model, self.data, self.params, step, save, on_epoch=on_epoch,
                        stops=(optuna.TrialPruned,))


def check_tune_inputs(source: str, target: str, params: Params) -> None:
    """Fail before any work: unknown or unprepared datasets, rewind epochs without checkpoints, a bad storage URL."""
    for name in (source, target):
        get_spec(name)
        read_dataset_meta(params.paths.data, name)
    kept = rewind_points(params, params.imp.rewind_epoch)
    hi = params.tune.rewind_epochs[1]
    if hi not in kept:  # the dense run is shared with `lth imp`, which keeps only these epochs
        raise UserError(f"tune.rewind_epochs goes up to {hi} but the dense run keeps checkpoints of epochs "
                        f"0..{kept[-1]}: set imp.keep_epochs >= {hi}")
    storage_url(params)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, rewind_epoch, lr, val_acc, epochs, seconds."""
    rows = []
    for t in study.trials:
        steps = t.intermediate_values
        value = t.value if t.value is not None else (steps[max(steps)] if steps else float("nan"))
        seconds = t.duration.total_seconds() if t.duration is not None else float("nan")
        rows.append({"trial": t.number, "state": t.state.name, "rewind_epoch": t.params.get("rewind_epoch"),
                     "lr": t.params.get("lr"), "val_acc": value, "epochs": len(steps), "seconds": seconds})
    return rows


def write_best(path: Path, source: str, target: str, study: optuna.Study, best: optuna.trial.FrozenTrial) -> None:
    """best.yaml: the best values shaped to be merged into params.yaml, with the study's stats as comments."""
    states = [t.state for t in study.trials]
    header = [
        f"# lth tune {source} -> {target}, study {study.study_name!r}: best of {sum(s in FINISHED for s in states)} "
        f"finished trials ({states.count(optuna.trial.TrialState.PRUNED)} pruned, "
        f"{states.count(optuna.trial.TrialState.FAIL)} failed)",
        f"# best: trial {best.number}, validation accuracy {best.value:.4f}",
        "# merge into params.yaml: imp.rewind_epoch (the tickets) and transfer.lr (the fine-tunes)",
    ]
    body = {"imp": {"rewind_epoch": int(best.params["rewind_epoch"])}, "transfer": {"lr": float(best.params["lr"])}}
    atomic_write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=True))


def run_trials(study: optuna.Study, objective: _Objective, n_trials: int, first_new: int) -> list[int]:
    """Run trials until the study has `n_trials` finished; returns the numbers of those this process ran.

    Trials numbered `first_new` or later that are RUNNING belong to this run's other workers and count as on
    their way; older RUNNING ones are a dead run's, failed by Optuna once their heartbeat lapses.
    """
    while True:
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        if finished >= n_trials:
            return objective.ran
        underway = sum(t.state == optuna.trial.TrialState.RUNNING and t.number >= first_new for t in trials)
        if finished + underway < n_trials:
            study.optimize(objective, n_trials=1)
        else:  # the last trials are others': wait, in case one fails (its worker died) and needs running again
            optuna.storages.fail_stale_trials(study)
            time.sleep(WAIT_S)


def tune_worker(index: int, source: str, target: str, params: Params, files: Files, first_new: int,
                make_tracker: Callable[[], Tracker] | None,
                parent: tuple[str, dict[str, str]] | None) -> dict[str, Any]:
    """One parallel worker: trials on the shared study, nested under the driver's run `parent` (id, tags).

    `files`: the study's tickets and the target's splits (run_tune sends them); `params.tune.storage` is the
    URL the driver resolved. Returns the worker (host:pid) and the numbers of the trials it ran.
    """
    tracker = make_tracker() if make_tracker is not None else NullTracker()
    with scratch_project(params, files) as scratch:
        study = open_study(source, target, scratch, worker=index)
        data = load_prepared(scratch.paths.data, target)
        with tracker.attach(*parent) if parent else contextlib.nullcontext(NullRun()) as run:
            objective = _Objective(source, target, data, scratch, tracker, run)
            ran = run_trials(study, objective, scratch.tune.n_trials, first_new)
    return {"worker": objective.worker, "trials": ran}


def progress(study: optuna.Study, n_trials: int) -> Callable[[], str]:
    """A line for the driver: finished/total trials, those running, and the best so far."""
    def line() -> str:
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = max(complete, key=lambda t: (t.value, -t.number), default=None)
        found = f", best val_acc {best.value:.4f} (trial {best.number})" if best is not None else ""
        return f"tune {study.study_name}: {finished}/{n_trials} trials finished, {running} running{found}"
    return line


def _worker_files(source: str, target: str, params: Params, tracker: Tracker) -> Files:
    """What a worker reads: every ticket of the study, the target's splits and the source's meta (its version)."""
    return (ticket_files(source, params, tracker) | read_files(prepared_dir(params.paths.data, target), params)
            | read_files(prepared_dir(params.paths.data, source) / DATASET_JSON, params))


def run_tune(source: str, target: str, params: Params, tracker: Tracker | None = None, *,
             pruner: optuna.pruners.BasePruner | None = None, parallel: Parallel | None = None) -> TuneResult:
    """Run (or resume) the study until it has tune.n_trials finished trials; write best.yaml and trials.csv.

    `parallel`: run the trials on its workers (tune_worker) instead of in this process.
    """
    import pandas as pd

    tracker = tracker or NullTracker()
    cfg = params.tune
    check_tune_inputs(source, target, params)
    study = open_study(source, target, params, pruner)
    claim_cache(params, study_settings(source, target, params))
    job_params = {k: v for k, v in flatten(cfg, "tune").items() if k != "tune.n_trials"}  # same parent on resume
    job_params |= {"tune.storage": _shown(storage_url(params)), "source": source, "target": target}
    job_params |= flatten(params.train, "train") | flatten(params.model, "model")
    sparsity = 1 - (1 - params.imp.pruning_rate) ** cfg.round
    tags = {"source": source, "target": target, "study": cfg.study_name, "arch": params.model.name,
            "sparsity": f"{sparsity:.4f}"}
    with tracker.job(f"tune/{target}", f"tune {source}->{target} {cfg.study_name}", params=job_params,
                     tags=tags) as parent:
        ensure_dense(source, params, tracker)
        first_new = len(study.trials)
        workers: dict[str, list[int]] = {}
        if parallel is None:
            objective = _Objective(source, target, load_prepared(params.paths.data, target), params, tracker, parent)
            workers = {objective.worker: run_trials(study, objective, cfg.n_trials, first_new)}
        elif sum(t.state in FINISHED for t in study.trials) < cfg.n_trials:
            files = _worker_files(source, target, params, tracker)
            shared = replace(params, tune=replace(cfg, storage=storage_url(params)))  # not a path under scratch
            link = (parent.run_id, tags) if parent.run_id else None
            ran = parallel.launch(tune_worker, (source, target, shared, files, first_new, parallel.make_tracker,
                                                link), progress(study, cfg.n_trials))
            workers = {r["worker"]: r["trials"] for r in ran}
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise UserError(f"study {cfg.study_name!r}: no trial completed ({len(study.trials)} pruned or failed)")
        best = max(complete, key=lambda t: (t.value, -t.number))
        parent.log_metrics({"best_val_acc": best.value, "best_rewind_epoch": float(best.params["rewind_epoch"]),
                            "best_lr": best.params["lr"],
                            "trials_finished": float(sum(t.state in FINISHED for t in study.trials))})
        parent.set_tags({"best_trial": str(best.number)})
    rows = trial_rows(study)
    best_path, trials_path = tune_dir(params) / "best.yaml", tune_dir(params) / "trials.csv"
    write_best(best_path, source, target, study, best)
    atomic_write_text(trials_path, pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))
    return TuneResult(study_name=cfg.study_name, best_trial=best.number, rewind_epoch=int(best.params["rewind_epoch"]),
                      lr=float(best.params["lr"]), val_acc=float(best.value), trials=rows, best_path=best_path,
                      trials_path=trials_path, workers=workers)
