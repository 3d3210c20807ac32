"""`lth tune`: a resumable Optuna study over the rewind epoch and the learning rate, tickets cached per rewind epoch."""

from __future__ import annotations

from dataclasses import replace
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors.torch import load_file

from helpers import free_port, parents_and_children, ray_env, run_lth, write_cli_study
from lth.study import tune as tune_mod
from lth.study import tune_tickets
from lth.cli import cli
from lth.config import Params, TrackingConfig, TuneConfig, params_from_dict, to_dict
from lth.errors import UserError
from lth.tickets import load_ticket, ticket_dir
from lth.tracking import NullTracker
from lth.tracking.mlflow import get_tracker
from lth.study.ray_engine import check_shared, tracking_store
from lth.study.tune import WORKER_ATTR, run_tune, shared_storage

TUNE = {"source": "fashion-mnist", "target": "digits", "round": 1, "rewind_epochs": (0, 1),
        "lr_range": (0.01, 0.1), "seed": 0, "study_name": "t", "max_epochs": 2}


@pytest.fixture
def tiny(study: Params) -> Iterator[Params]:
    """The conftest study cut to 2 epochs, IMP round 1 only, a 2-value rewind range, one CPU thread."""
    threads = torch.get_num_threads()  # fit() sets train.threads process-wide; give it back afterwards
    yield replace(study, train=replace(study.train, max_epochs=2, patience=5, threads=1),
                  imp=replace(study.imp, rounds=1, keep_epochs=1), tune=TuneConfig(n_trials=3, **TUNE))
    torch.set_num_threads(threads)


def _with_trials(params: Params, n: int) -> Params:
    return replace(params, tune=replace(params.tune, n_trials=n))


def _spy_run_imp(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the job of each IMP run that tune starts (the real run_imp still runs)."""
    calls: list[Any] = []
    real = tune_tickets.run_imp

    def spy(job: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(job)
        return real(job, *args, **kwargs)

    monkeypatch.setattr(tune_tickets, "run_imp", spy)
    return calls


def test_run_then_resume_adds_trials_and_reuses_tickets(tiny: Params, monkeypatch: pytest.MonkeyPatch) -> None:
    imp_calls = _spy_run_imp(monkeypatch)
    first = run_tune("fashion-mnist", "digits", tiny)
    assert len(first.trials) == 3
    again = run_tune("fashion-mnist", "digits", tiny)  # same total: nothing to add
    assert len(again.trials) == 3
    result = run_tune("fashion-mnist", "digits", _with_trials(tiny, 5))

    study = optuna.load_study(study_name="t", storage=tune_mod.storage_url(tiny))
    assert len(study.trials) == 5 and all(t.state.is_finished() for t in study.trials)
    assert Path(tiny.paths.results, "tune", "optuna.db").is_file()
    # each trial reported its validation accuracy after every epoch it trained
    for t in study.trials:
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
        assert 1 <= len(t.intermediate_values) <= 2
    # one dense run, then IMP once per distinct rewind epoch: trials differing only in lr reused the ticket
    rewinds = {t.params["rewind_epoch"] for t in study.trials}
    assert len(imp_calls) == 1 + len(rewinds)
    assert [j.rounds for j in imp_calls] == [0] + [1] * len(rewinds)
    cached = sorted(p.name for p in Path(tiny.paths.models, "tune", "t").iterdir())
    assert cached == sorted(f"rewind{e}" for e in rewinds) + ["settings.json"]
    for e in rewinds:
        meta = yaml.safe_load(Path(tiny.paths.models, "tune", "t", f"rewind{e}", "tickets", "fashion-mnist", "seed0",
                                   "round01", "ticket.json").read_text())
        assert meta["rewind_epoch"] == e and meta["round"] == 1 and meta["sparsity"] == pytest.approx(0.2, abs=0.01)

    best = yaml.safe_load(result.best_path.read_text())
    assert set(best) == {"imp", "transfer"}
    assert 0 <= best["imp"]["rewind_epoch"] <= 1 and 0.01 <= best["transfer"]["lr"] <= 0.1
    assert best["imp"]["rewind_epoch"] == result.rewind_epoch and best["transfer"]["lr"] == result.lr
    assert result.val_acc == max(t.value for t in study.trials if t.value is not None)
    # best.yaml merges into params.yaml: the result still validates
    merged = to_dict(tiny)
    merged["imp"]["rewind_epoch"] = best["imp"]["rewind_epoch"]
    merged["transfer"]["lr"] = best["transfer"]["lr"]
    assert params_from_dict(merged).transfer.lr == result.lr
    assert result.trials_path.read_text().count("\n") == 6  # header + 5 trials


class _PruneAfterFirst(optuna.pruners.BasePruner):
    """Lets trial 0 finish, prunes every later trial at its first report."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number >= 1


def test_pruned_trials_stop_training_and_are_tracked(tiny: Params, tmp_path: Path) -> None:
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", register=True)
    params = replace(_with_trials(tiny, 2), tracking=tracking)
    result = run_tune("fashion-mnist", "digits", params, get_tracker(params), pruner=_PruneAfterFirst())
    states = [row["state"] for row in result.trials]
    assert states == ["COMPLETE", "PRUNED"]
    assert [row["epochs"] for row in result.trials] == [2, 1]  # fit stopped at the pruned epoch
    assert result.best_trial == 0

    client = MlflowClient(params.tracking.uri)
    exp = client.get_experiment_by_name("tune/digits")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_name for r in parents] == ["tune fashion-mnist->digits t"]
    trials = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id),
                    key=lambda r: int(r.data.params["trial"]))
    assert [r.info.run_name for r in trials] == ["tune t t000", "tune t t001"]
    assert [r.data.tags["optuna.state"] for r in trials] == states
    assert {"rewind_epoch", "lr", "trial"} <= set(trials[0].data.params)
    curve = client.get_metric_history(trials[0].info.run_id, "val_acc")
    assert [m.step for m in curve] == [1, 2]
    # tune's per-rewind tickets are not the study's: nothing of theirs is in the registry
    versions = client.search_model_versions("name = 'ticket-fashion-mnist-resnet8w4'")
    assert {v.tags["round"] for v in versions} == {"0"}


def test_cli_prints_table_and_best(tiny: Params, tmp_path: Path) -> None:
    raw = to_dict(tiny)  # tune.n_trials: 3
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(cli, ["tune", "fashion-mnist", "digits", "--params", str(path), "--n-trials", "1",
                                   "--study-name", "cli"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "rewind_epoch" in out.output and "best: trial" in out.output
    study = optuna.load_study(study_name="cli", storage=tune_mod.storage_url(tiny))
    assert len(study.trials) == 1


@pytest.mark.parametrize("change, message", [
    ({"source": "nope"}, "nope"),
    ({"target": "bio-textures"}, "not prepared"),
    ({"storage": "not a url"}, "not a database URL"),
    ({"storage": "postgresql://u:secret@127.0.0.1:1/db"}, "unusable"),
    ({"rewind_epochs": (0, 2)}, "imp.keep_epochs"),
])
def test_bad_input_is_one_line_before_training(tiny: Params, change: dict, message: str) -> None:
    cfg = {**TUNE, **change}
    source, target = cfg.pop("source"), cfg.pop("target")
    params = replace(tiny, tune=TuneConfig(source=source, target=target, **cfg))
    with pytest.raises(UserError, match=message) as err:
        run_tune(source, target, params)
    assert "\n" not in str(err.value) and "secret" not in str(err.value)
    assert not Path(tiny.paths.models, "tickets").exists()  # nothing trained


def test_round0_ticket_is_the_dense_run_rewound(tiny: Params) -> None:
    params = replace(tiny, tune=replace(tiny.tune, round=0))
    tune_mod.ensure_dense("fashion-mnist", params, NullTracker())
    # the study's own round-0 ticket is rewound to imp.rewind_epoch (1): used as it is
    assert tune_mod.ensure_ticket("fashion-mnist", 1, params, NullTracker()) == Path(params.paths.models)
    root = tune_mod.ensure_ticket("fashion-mnist", 0, params, NullTracker())
    assert root == Path(params.paths.models, "tune", "t", "rewind0")
    ticket = load_ticket(ticket_dir(root, "fashion-mnist", 0, 0))
    dense = load_file(str(Path(params.paths.models, "tickets", "fashion-mnist", "seed0", "dense",
                               "epoch00.safetensors")))
    assert ticket.meta.rewind_epoch == 0 and ticket.meta.sparsity == 0
    assert all(torch.equal(ticket.weights[k], dense[k]) for k in dense)


def test_study_resumes_only_under_its_own_settings(tiny: Params) -> None:
    run_tune("fashion-mnist", "digits", _with_trials(tiny, 1))
    changed = replace(tiny, train=replace(tiny.train, lr=0.2))
    with pytest.raises(UserError, match=r"study 't' .* other settings \(train.lr\).*new name"):
        run_tune("fashion-mnist", "digits", changed)
    renamed = replace(changed, tune=replace(changed.tune, study_name="t2", n_trials=1))
    assert len(run_tune("fashion-mnist", "digits", renamed).trials) == 1  # a new study, its own ticket cache
    assert Path(tiny.paths.models, "tune", "t2", "settings.json").is_file()
    # a cache left behind by a deleted study of the same name is not silently reused
    Path(tiny.paths.results, "tune", "optuna.db").unlink()
    with pytest.raises(UserError, match=r"ticket cache .*tune/t was started with other settings \(train.lr\)"):
        run_tune("fashion-mnist", "digits", changed)


# ---------------------------------------------------------------- parallel workers (Ray)


class _Instant:
    """An objective that returns at once (run_trials' bookkeeping without training)."""

    worker = "test"

    def __init__(self) -> None:
        self.ran: list[int] = []

    def __call__(self, trial: optuna.Trial) -> float:
        self.ran.append(trial.number)
        return 0.5


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() stands in for a dead worker
def test_a_dead_workers_trial_is_failed_and_run_again(tiny: Params, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial under way counts toward n_trials until its heartbeat lapses; then another worker runs one instead."""
    monkeypatch.setattr(tune_mod, "HEARTBEAT_S", 1)
    monkeypatch.setattr(tune_mod, "GRACE_S", 1)
    monkeypatch.setattr(tune_mod, "WAIT_S", 0.1)
    study = tune_mod.open_study("fashion-mnist", "digits", tiny)
    dead = study.ask()  # a worker of this run took trial 0, then died: its heartbeat stops
    study._storage.record_heartbeat(dead._trial_id)
    objective = _Instant()
    worker = threading.Thread(target=tune_mod.run_trials, args=(study, objective, 1, 0), daemon=True)
    worker.start()
    time.sleep(0.5)
    assert objective.ran == []  # trial 0 may still finish: waiting, not running a second trial
    worker.join(30)
    assert not worker.is_alive()
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"] and objective.ran == [1]

# batch 2, 3 epochs: a trial of ~2 s outlasts the ~3 s by which one Ray worker may start after the other
PARALLEL = {"train": {"threads": 1, "batch_size": 2},
            "tune": {"round": 1, "rewind_epochs": [0, 1], "max_epochs": 3, "study_name": "par"}}


@pytest.mark.e2e
def test_ray_workers_share_one_study_and_stop_at_n_trials(tmp_path: Path) -> None:
    write_cli_study(tmp_path, **PARALLEL)
    out = run_lth(["tune", "fashion-mnist", "digits", "--engine", "ray", "--workers", "2", "--n-trials", "4",
                   "--params", "tiny.yaml"], tmp_path, env=ray_env(tmp_path), timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="par", storage=f"sqlite:///{tmp_path / 'results/tune/optuna.db'}")
    # exactly n_trials in total, not n_trials per worker, and both workers ran some of them
    assert len(study.trials) == 4 and all(t.state in tune_mod.FINISHED for t in study.trials)
    assert len({t.user_attrs[WORKER_ATTR] for t in study.trials}) == 2
    best = yaml.safe_load((tmp_path / "results/tune/best.yaml").read_text())
    assert best["imp"]["rewind_epoch"] in (0, 1) and 1e-3 <= best["transfer"]["lr"] <= 1e-1
    assert "4/4 trials finished" in out.stderr and "best val_acc" in out.stderr
    assert "trials per worker" in out.stdout
    # every trial a nested run of the driver's one parent run, logged from its worker
    parents, children = parents_and_children(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), "tune/digits")
    assert [p.info.run_name for p in parents] == ["tune fashion-mnist->digits par"]
    assert sorted(r.info.run_name for r in children) == [f"tune par t{i:03d}" for i in range(4)]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags[WORKER_ATTR] for r in children} == {t.user_attrs[WORKER_ATTR] for t in study.trials}


@pytest.mark.e2e
def test_unreachable_ray_address_is_one_line_before_training(tmp_path: Path) -> None:
    write_cli_study(tmp_path, **PARALLEL)
    out = run_lth(["tune", "fashion-mnist", "digits", "--engine", "ray", "--workers", "2", "--address",
                   f"127.0.0.1:{free_port()}", "--params", "tiny.yaml"], tmp_path, env=ray_env(tmp_path), timeout=60)
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("lth: error: --address 127.0.0.1:") and "no Ray head answers" in line
    assert not (tmp_path / "models").exists() and not (tmp_path / "results/tune/optuna.db").exists()


def test_sqlite_storage_refused_on_a_cluster(tiny: Params) -> None:
    """Workers on several hosts cannot share a sqlite file: one line naming the storage and what to use."""
    nodes = [{"Alive": True}, {"Alive": True}]
    stores = tracking_store("http://mlflow:5000") | shared_storage(tiny)
    with pytest.raises(UserError, match=r"tune.storage sqlite:///.*optuna.db .*PostgreSQL or MySQL URL") as err:
        check_shared(nodes, stores)
    assert "\n" not in str(err.value)
    check_shared(nodes[:1], stores)  # one node: the file is fine
    check_shared(nodes, shared_storage(replace(tiny, tune=replace(tiny.tune, storage="postgresql://u@db/optuna"))))


def test_workers_need_ray(tiny: Params, tmp_path: Path) -> None:
    raw = to_dict(tiny)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(cli, ["tune", "fashion-mnist", "digits", "--params", str(path), "--workers", "2"])
    assert isinstance(out.exception, UserError) and "add --engine ray" in str(out.exception)  # main(): exit 2
    assert not Path(tiny.paths.models, "tickets").exists()
