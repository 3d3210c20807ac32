"""`lth tune`: an Optuna study of the rewind epoch and the fine-tuning learning rate of a transferred ticket.

The only module that imports optuna. Every trial shares the source's one dense run (its early
checkpoints are the rewind points); the ticket of round `tune.round` is computed once per rewind epoch
(lth.study.tune_tickets), so trials that differ only in learning rate reuse it. `tune.n_trials` is the number of
finished (complete or pruned) trials the study should have: a rerun adds only the missing ones, and
raising it resumes the same study with more trials. A study (and its ticket cache) resumes only under
the settings it was started with, so that its trials stay comparable.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
import yaml
from sqlalchemy.engine import make_url

from lth.config import Params, flatten
from lth.data.loader import Normalizer
from lth.data.registry import get_spec
from lth.data.store import PreparedDataset, load_prepared, read_dataset_meta
from lth.errors import UserError
from lth.fsutil import atomic_write_text
from lth.tracking import NullTracker, Run, Tracker, dataset_inputs
from lth.training import EpochMetrics, fit
from lth.study.transfer import FineTune, initial_network
from lth.study.tune_tickets import check_settings, claim_cache, ensure_dense, ensure_ticket, study_settings

PRUNER_STARTUP_TRIALS = 3  # trials that always run to the end before the median pruner may stop one
PRUNER_WARMUP_EPOCHS = 1  # never prune after the first epoch: a fresh head's first accuracy says little
HEARTBEAT_S = 60  # a trial whose process died is marked FAIL this long (+ grace) after its last heartbeat
GRACE_S = 180
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
SETTINGS_ATTR = "lth.settings"


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
                        "postgresql://user@host/db)") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        path = Path(parsed.database).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = parsed.set(database=str(path)).render_as_string(hide_password=False)
    return url


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def open_study(source: str, target: str, params: Params,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """The study tune.study_name in its storage, created or loaded (resumed) when its settings match."""
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
    study.sampler = optuna.samplers.TPESampler(seed=params.tune.seed + done,
                                               n_startup_trials=max(2, min(10, params.tune.n_trials // 2)))
    return study


class _Objective:
    """One trial: the ticket for its rewind epoch, transferred to the target and fine-tuned at its lr."""

    def __init__(self, source: str, target: str, data: PreparedDataset, params: Params, tracker: Tracker,
                 parent: Run) -> None:
        self.source, self.target, self.data = source, target, data
        self.params, self.tracker, self.parent = params, tracker, parent

    def __call__(self, trial: optuna.Trial) -> float:
        """Best validation accuracy of the fine-tune (TrialPruned when the median pruner stops it)."""
        cfg = self.params.tune
        rewind_epoch = trial.suggest_int("rewind_epoch", *cfg.rewind_epochs)
        lr = trial.suggest_float("lr", *cfg.lr_range, log=True)
        root = ensure_ticket(self.source, rewind_epoch, self.params, self.tracker)
        ft = FineTune(self.target, "transfer", self.source, cfg.seed, cfg.round)
        model, mask = initial_network(ft, self.data, replace(self.params, paths=replace(self.params.paths,
                                                                                         models=str(root))))
        history: list[EpochMetrics] = []
        name = f"tune {cfg.study_name} t{trial.number:03d}"
        tags = {"source": self.source, "target": self.target, "study": cfg.study_name,
                "trial": str(trial.number), "round": str(cfg.round)}
        with self.tracker.child(self.parent, name, params={"trial": trial.number, "rewind_epoch": rewind_epoch,
                                                           "lr": lr, "round": cfg.round}, tags=tags) as run:
            run.log_inputs(dataset_inputs(self.params.paths.data, self.data))  # its ticket is not registered

            def on_epoch(m: EpochMetrics) -> None:
                history.append(m)
                run.log_metrics(m.as_dict(), step=m.epoch)
                trial.report(m.val_acc, m.epoch)
                if trial.should_prune():  # raised through fit(), which stops there
                    raise optuna.TrialPruned(f"pruned after epoch {m.epoch}")

            pruned = False
            try:
                fit(model, self.data.train, self.data.val, Normalizer(self.data.mean, self.data.std),
                    self.params.train, seed=ft.fit_seed, mask=mask, on_epoch=on_epoch, desc=name, lr=lr,
                    max_epochs=cfg.max_epochs)
            except optuna.TrialPruned:
                pruned = True
            best = max((m.val_acc for m in history), default=0.0)
            run.log_metrics({"best_val_acc": best, "epochs": float(len(history))})
            run.set_tags({"optuna.state": "PRUNED" if pruned else "COMPLETE"})
        if pruned:
            raise optuna.TrialPruned(f"pruned after epoch {len(history)}")
        return best


def check_tune_inputs(source: str, target: str, params: Params) -> None:
    """Fail before any work: unknown or unprepared datasets, rewind epochs without checkpoints, a bad storage URL."""
    for name in (source, target):
        get_spec(name)
        read_dataset_meta(params.paths.data, name)
    kept = max(params.imp.keep_epochs, params.imp.rewind_epoch)
    hi = params.tune.rewind_epochs[1]
    if hi > kept:  # the dense run is shared with `lth imp`, which keeps epochs 0..kept only
        raise UserError(f"tune.rewind_epochs goes up to {hi} but the dense run keeps checkpoints of epochs "
                        f"0..{kept}: set imp.keep_epochs >= {hi}")
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


def run_tune(source: str, target: str, params: Params, tracker: Tracker | None = None, *,
             pruner: optuna.pruners.BasePruner | None = None) -> TuneResult:
    """Run (or resume) the study until it has tune.n_trials finished trials; write best.yaml and trials.csv."""
    import pandas as pd

    tracker = tracker or NullTracker()
    cfg = params.tune
    check_tune_inputs(source, target, params)
    study = open_study(source, target, params, pruner)
    claim_cache(params, study_settings(source, target, params))
    data = load_prepared(params.paths.data, target)
    job_params = {k: v for k, v in flatten(cfg, "tune").items() if k != "tune.n_trials"}  # same parent on resume
    job_params |= {"tune.storage": _shown(storage_url(params)), "source": source, "target": target}
    job_params |= flatten(params.train, "train") | flatten(params.model, "model")
    sparsity = 1 - (1 - params.imp.pruning_rate) ** cfg.round
    tags = {"source": source, "target": target, "study": cfg.study_name, "arch": params.model.name,
            "sparsity": f"{sparsity:.4f}"}
    with tracker.job(f"tune/{target}", f"tune {source}->{target} {cfg.study_name}", params=job_params,
                     tags=tags) as parent:
        ensure_dense(source, params, tracker)
        missing = cfg.n_trials - sum(t.state in FINISHED for t in study.trials)
        if missing > 0:
            # The callback caps the total when several workers share the study (an RDB storage).
            study.optimize(_Objective(source, target, data, params, tracker, parent), n_trials=missing,
                           callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=FINISHED)])
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
                      trials_path=trials_path)
