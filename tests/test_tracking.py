"""MLflow tracking: nested IMP runs with per-epoch steps, the ticket registry, `lth tickets list|fetch`."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from helpers import free_port, parents_and_children, runs_of, tiny_params, tiny_ticket, write_toy
from lth.tracking import mlflow as tracking
from lth.tracking.mlflow import store as store_module
from lth.tracking.mlflow import trackers
from lth.cli.tickets import tickets
from lth.config import TrackingConfig
from lth.errors import UserError
from lth.study.imp import make_job, run_imp
from lth.provenance import data_version, git_commit
from lth.tracking.mlflow.query import fetch_ticket, list_tickets
from lth.tickets import load_ticket
from lth.tracking.mlflow import get_tracker
from lth.tracking.mlflow import MlflowTracker

ROUNDS = 2  # tiny_params' default


# ---------------------------------------------------------------- runs


def test_imp_job_is_one_parent_run_with_a_nested_run_per_round(tracked_imp: dict[str, Any]) -> None:
    client = tracked_imp["client"]
    parents, children = parents_and_children(client, "imp/toy")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "imp toy s0" and parent.info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == [f"imp toy s0 r{k:02d}" for k in range(ROUNDS + 1)]
    for child in children:
        assert child.data.tags[tracking.PARENT_TAG] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.tags["data_version"] == data_version(tracked_imp["params"].paths.data, "toy") != ""
        assert child.data.tags.get("lth.git_commit", "") == git_commit()
    assert parent.data.params["train.lr"] == str(tracked_imp["params"].train.lr)
    assert parent.data.params["source"] == "toy" and parent.data.tags["mlflow.runName"] == "imp toy s0"
    assert parent.data.metrics["rounds_done"] == ROUNDS


def test_every_epoch_is_logged_with_its_step(tracked_imp: dict[str, Any]) -> None:
    client = tracked_imp["client"]
    _, children = parents_and_children(client, "imp/toy")
    for child in children:
        epochs = int(child.data.metrics["epochs"])
        history = client.get_metric_history(child.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1))
        # One val_loss point per epoch; the round's summary is best_val_loss, the curve's minimum.
        val = client.get_metric_history(child.info.run_id, "val_loss")
        assert sorted(m.step for m in val) == list(range(1, epochs + 1))
        assert child.data.metrics["best_val_loss"] == min(m.value for m in val)
        round_ = int(child.data.tags["round"])
        assert child.data.tags["sparsity"] == f"{child.data.metrics['sparsity']:.4f}"
        assert abs(child.data.metrics["sparsity"] - (1 - 0.8 ** round_)) < 0.01  # round k keeps 0.8^k


def test_artifacts_live_beside_the_store_not_in_the_cwd(tracked_imp: dict[str, Any]) -> None:
    exp = tracked_imp["client"].get_experiment_by_name("imp/toy")
    assert exp.artifact_location == (tracked_imp["root"] / "mlruns" / "imp" / "toy").as_uri()


def test_rerunning_a_job_reuses_its_parent_run(tmp_path: Path) -> None:
    write_toy(tmp_path / "data")
    params = tiny_params(tmp_path, rounds=1)
    client = MlflowClient(params.tracking.uri, params.tracking.uri)
    run_imp(make_job("toy", 0, params), params, get_tracker(params))
    run_imp(make_job("toy", 0, params), params, get_tracker(params))  # nothing left to do
    parents, children = parents_and_children(client, "imp/toy")
    assert len(parents) == 1 and len(children) == 2
    # A killed job resumed later: round 1 missing again -> same parent, one new nested run.
    import shutil

    shutil.rmtree(tmp_path / "models" / "tickets" / "toy" / "seed0" / "round01")
    run_imp(make_job("toy", 0, params), params, get_tracker(params))
    parents, children = parents_and_children(client, "imp/toy")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == ["imp toy s0 r00", "imp toy s0 r01", "imp toy s0 r01"]
    assert {c.data.tags[tracking.PARENT_TAG] for c in children} == {parents[0].info.run_id}


def test_failed_and_stale_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = MlflowTracker(TrackingConfig(uri=uri))
    client = tracker.store.client
    # A killed try: the job and one nested run are left RUNNING (their context managers never exit; they are
    # kept referenced, since a collected generator would close its run).
    killed = tracker.job("imp/x", "job", params={"a": 1}, tags={})
    killed_parent = killed.__enter__()
    killed_child = tracker.child(killed_parent, "round", params={}, tags={})
    stale_run = killed_child.__enter__()
    finished_before = tracker.child(killed_parent, "round0", params={}, tags={})
    with finished_before as done:
        pass
    tracker.store.drain()  # its end was queued: written before the "new process" below looks
    assert client.get_run(stale_run.run_id).info.status == "RUNNING"
    # The rerun (a new process, so a new tracker) reuses the parent and sweeps its RUNNING children.
    rerun = MlflowTracker(TrackingConfig(uri=uri))
    with pytest.raises(RuntimeError, match="boom"):
        with rerun.job("imp/x", "job", params={"a": 1}, tags={}) as parent:
            assert parent.run_id == killed_parent.run_id
            old = client.get_run(stale_run.run_id)
            assert old.info.status == "FAILED" and old.data.tags["lth.stale"] == "true"
            assert client.get_run(done.run_id).info.status == "FINISHED"  # finished runs are left alone
            with rerun.child(parent, "round", params={}, tags={}) as run:
                raise RuntimeError("boom")
    assert client.get_run(parent.run_id).info.status == "FAILED"
    assert client.get_run(run.run_id).info.status == "FAILED"
    for cm in (killed_child, killed):  # close the abandoned runs now, not at interpreter exit
        cm.gen.close()


def test_stale_sweep_pages_through_many_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trackers, "SEARCH_PAGE", 2)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = MlflowTracker(TrackingConfig(uri=uri))
    killed = [tracker.job("imp/x", "job", params={}, tags={})]  # a killed try, its runs left RUNNING
    parent = killed[0].__enter__()
    killed += [tracker.child(parent, f"r{i}", params={}, tags={}) for i in range(5)]
    stale = [cm.__enter__().run_id for cm in killed[1:]]
    with MlflowTracker(TrackingConfig(uri=uri)).job("imp/x", "job", params={}, tags={}):
        pass
    assert {tracker.store.client.get_run(r).info.status for r in stale} == {"FAILED"}
    for cm in reversed(killed):
        cm.gen.close()


def test_metrics_are_batched_and_long_params_truncated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}"), flush_every=10**6,
                            flush_seconds=10**6)
    client = tracker.store.client
    calls: list[int] = []
    real = client.log_batch

    def counting(run_id: str, metrics: Any = (), **kw: Any) -> None:
        calls.append(len(metrics))
        real(run_id, metrics=metrics, **kw)

    monkeypatch.setattr(client, "log_batch", counting)
    params = {f"p{i}": i for i in range(150)} | {"long": "x" * 10_000}
    with tracker.job("imp/x", "job", params=params, tags={}) as parent:
        with tracker.child(parent, "r", params={}, tags={}) as run:
            for step in range(1, 1201):
                run.log_metrics({"loss": 1.0 / step, "acc": 0.5}, step=step)
            assert client.get_metric_history(run.run_id, "loss") == []  # still buffered
    assert max(calls) == tracking.METRICS_PER_BATCH and sum(calls) == 2400
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "loss")) == list(range(1, 1201))
    got = client.get_run(parent.run_id).data.params
    assert len(got) == 151 and len(got["long"]) == tracking.MAX_PARAM_LEN


def test_database_locked_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tracking.Store(TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}"))
    monkeypatch.setattr(time, "sleep", lambda s: None)
    tries = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert store.call(flaky) == "ok" and len(tries) == 3


def _lose_first_answers(client: Any, method: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """client.<method> carries out each create, but the first answer per name is lost (the server died meanwhile)."""
    real, lost = getattr(client, method), []

    def lossy(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        name = kwargs.get("run_name") or args[0]
        if name not in lost:
            lost.append(name)
            try:
                raise requests.ConnectionError("('Connection aborted.', RemoteDisconnected('Remote end closed "
                                               "connection without response'))")
            except requests.ConnectionError as exc:  # as MLflow's REST client reports it
                raise MlflowException(f"API request to {method} failed with exception {exc}")
        return result

    monkeypatch.setattr(client, method, lossy)
    return lost


def test_a_create_whose_answer_was_lost_is_made_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A run or a ticket version created by a try whose answer was lost is found, not created again."""
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}"))
    client = tracker.store.client
    lost_runs = _lose_first_answers(client, "create_run", monkeypatch)
    lost_versions = _lose_first_answers(client, "create_model_version", monkeypatch)
    meta = tiny_ticket(tmp_path / "ticket", "lost", 0, 1)
    with tracker.job("imp/lost", "job", params={}, tags={}) as parent:
        with tracker.child(parent, "round", params={}, tags={}) as run:
            tracker.register_ticket(run, tmp_path / "ticket", meta)
    assert (lost_runs, lost_versions) == (["job", "round"], ["ticket-lost-tiny"])  # each first answer was lost
    runs = runs_of(client, "imp/lost")
    assert sorted(r.info.run_name for r in runs) == ["job", "round"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    versions = client.search_model_versions("name = 'ticket-lost-tiny'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run.run_id)]
    assert str(client.get_model_version_by_alias("ticket-lost-tiny", "r01-s0").version) == "1"
    shown = re.findall(r"MLflow server sqlite:///\S+ unreachable \(ConnectionError\), retrying in 1s \(1/\d+\)",
                       capsys.readouterr().err)
    assert len(shown) == 3


def test_a_server_down_for_longer_than_retry_seconds_stops_the_job(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Waits are shown and bounded: after tracking.retry_seconds, one error naming the server; then no more waits."""
    monkeypatch.setattr(store_module, "check_reachable", lambda uri: None)  # it went down after the job started
    monkeypatch.setenv(store_module.MLFLOW_RETRIES_ENV, "0")
    url = f"http://127.0.0.1:{free_port()}"
    store = tracking.Store(TrackingConfig(uri=url, retry_seconds=3))
    t0 = time.monotonic()
    with pytest.raises(UserError, match=rf"^MLflow tracking server {url} unreachable for 3s \(ConnectionError\); "
                                        "start it again .* raise tracking.retry_seconds$"):
        store.call(store.client.get_experiment_by_name, "x")
    assert 3 <= time.monotonic() - t0 < 6
    assert capsys.readouterr().err.splitlines() == [
        f"MLflow server {url} unreachable (ConnectionError), retrying in 1s (1/2)",
        f"MLflow server {url} unreachable (ConnectionError), retrying in 2s (2/2)"]
    t0 = time.monotonic()
    with pytest.raises(UserError, match="unreachable for 3s"):  # the same outage: its budget is spent
        store.call(store.client.get_experiment_by_name, "x")
    assert time.monotonic() - t0 < 1


def test_default_uri_is_an_absolute_sqlite_file_in_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/m.db")
    assert tracking.tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve()}/rel/m.db"
    assert tracking.tracking_uri(TrackingConfig(uri="http://h:5000")) == "http://h:5000"


def test_unreachable_server_fails_before_any_work(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = tiny_params(tmp_path, uri=f"http://user:secret@127.0.0.1:{port}")
    with pytest.raises(UserError, match=rf"MLflow tracking server http://127.0.0.1:{port} unreachable") as exc:
        get_tracker(params)
    assert "secret" not in str(exc.value)
    with pytest.raises(UserError, match="unreachable"):
        list_tickets(params)


# ---------------------------------------------------------------- registry


def test_every_ticket_is_a_registered_version_with_tags_and_alias(tracked_imp: dict[str, Any]) -> None:
    client = MlflowClient(tracked_imp["uri"], tracked_imp["uri"])  # a fresh client, as a separate process would use
    found = client.search_model_versions("tags.source = 'toy' and tags.round = '1'")
    assert len(found) == 1
    version = found[0]
    meta = load_ticket(tracked_imp["dirs"][1]).meta
    assert version.name == "ticket-toy-resnet8w4" and version.run_id
    assert {k: version.tags[k] for k in ("source", "arch", "seed", "round", "sparsity", "rewind_epoch")} == {
        "source": "toy", "arch": "resnet8w4", "seed": "0", "round": "1", "sparsity": f"{meta.sparsity:.4f}",
        "rewind_epoch": "1"}
    for k in range(ROUNDS + 1):
        assert client.get_model_version_by_alias("ticket-toy-resnet8w4", f"r{k:02d}-s0").tags["round"] == str(k)
    assert not list((tracked_imp["root"] / "mlruns").rglob("*.pkl"))  # safetensors + JSON only


def test_fetch_picks_the_nearest_round_and_its_mask_matches_the_sparsity_tag(
        tracked_imp: dict[str, Any], tmp_path: Path) -> None:
    out, row = fetch_ticket(tracked_imp["params"], "toy", 0.21, out_dir=tmp_path / "t")
    assert (row["round"], row["seed"], row["alias"]) == (1, 0, "r01-s0")
    ticket = load_ticket(out)
    zeros = sum(int((~m).sum()) for m in ticket.mask.values()) / sum(m.numel() for m in ticket.mask.values())
    tag = tracked_imp["client"].get_model_version(row["model"], str(row["version"])).tags["sparsity"]
    assert f"{zeros:.4f}" == tag
    assert ticket.meta.round == 1 and (out / "weights.safetensors").read_bytes() == (
        tracked_imp["dirs"][1] / "weights.safetensors").read_bytes()
    out2, row2 = fetch_ticket(tracked_imp["params"], "toy", 0.37, seed=0, out_dir=out)  # replaces a ticket dir
    assert row2["round"] == 2 and load_ticket(out2).meta.round == 2


def test_fetch_without_a_near_ticket_or_for_an_unknown_source_lists_what_exists(
        tracked_imp: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "t"
    with pytest.raises(UserError, match=r"available sparsities: 0\.0000, 0\.2\d{3}, 0\.3\d{3}$"):
        fetch_ticket(tracked_imp["params"], "toy", 0.9, out_dir=out)
    with pytest.raises(UserError, match=r"no tickets registered for source 'cifar' .*known sources: toy$"):
        fetch_ticket(tracked_imp["params"], "cifar", 0.2, out_dir=out)
    with pytest.raises(UserError, match=r"available seeds: 0$"):
        fetch_ticket(tracked_imp["params"], "toy", 0.2, seed=3, out_dir=out)
    with pytest.raises(UserError, match=r"available archs: resnet8w4$"):
        fetch_ticket(tracked_imp["params"], "toy", 0.2, arch="resnet50", out_dir=out)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written
    keep = tmp_path / "mine"
    (keep / "notes.txt").parent.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a ticket directory"):
        fetch_ticket(tracked_imp["params"], "toy", 0.2, out_dir=keep)
    assert (keep / "notes.txt").read_text() == "mine"


def test_tickets_cli_lists_and_fetches(tracked_imp: dict[str, Any], tmp_path: Path) -> None:
    import yaml

    from lth.config import to_dict

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(tracked_imp["params"])))
    runner = CliRunner()
    listed = runner.invoke(tickets, ["list", "--source", "toy", "--params", str(params_file)])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split() == ["model", "version", "source", "arch", "seed", "round", "sparsity", "alias", "run_id"]
    assert [line.split()[7] for line in lines[1:]] == ["r00-s0", "r01-s0", "r02-s0"]
    fetched = runner.invoke(tickets, ["fetch", "--source", "toy", "--sparsity", "0.36", "-o", str(tmp_path / "t"),
                                      "--params", str(params_file)])
    assert fetched.exit_code == 0, fetched.output
    assert "round 2" in fetched.output and "sparsity 0.3" in fetched.output and str(tmp_path / "t") in fetched.output
    bad = runner.invoke(tickets, ["fetch", "--source", "toy", "--sparsity", "0.8", "-o", str(tmp_path / "u"),
                                  "--params", str(params_file)])
    assert isinstance(bad.exception, UserError) and "available sparsities" in str(bad.exception)


def test_a_bad_ticket_request_is_one_line_on_stderr_and_exit_2(
        tracked_imp: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import sys

    import yaml

    from lth.cli import main
    from lth.config import to_dict

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(tracked_imp["params"])))
    argv = ["lth", "tickets", "fetch", "--source", "nope", "--sparsity", "0.2", "-o", str(tmp_path / "x"),
            "--params", str(params_file)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith("lth: error: no tickets registered for source 'nope'") and "known sources: toy" in err
    assert not (tmp_path / "x").exists()


def test_registration_can_be_turned_off(tmp_path: Path) -> None:
    write_toy(tmp_path / "data")
    params = tiny_params(tmp_path, rounds=1, register=False)
    run_imp(make_job("toy", 0, params), params, get_tracker(params))
    assert MlflowClient(params.tracking.uri, params.tracking.uri).search_model_versions("name LIKE 'ticket-%'") == []
    assert list_tickets(params) == []


def test_queued_write_failure_fails_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes queued for the writer thread still fail loudly: at the job's end, with the job marked FAILED."""
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}"))
    client = tracker.store.client
    real = client.log_batch

    def broken(run_id: str, metrics: Any = (), **kw: Any) -> None:
        if metrics:
            raise MlflowException("disk full")
        real(run_id, metrics=metrics, **kw)

    monkeypatch.setattr(client, "log_batch", broken)
    with pytest.raises(MlflowException, match="disk full"):
        with tracker.job("imp/x", "job", params={}, tags={}) as parent:
            with tracker.child(parent, "round", params={}, tags={}) as run:
                run.log_metrics({"acc": 0.5}, step=1)
            # The child's metrics are flushed on the writer thread; the job's body does not see the failure.
    assert client.get_run(parent.run_id).info.status == "FAILED"
    assert client.get_run(run.run_id).info.status == "FINISHED"  # its end was queued after the failed batch


def test_queued_writes_keep_their_order(tmp_path: Path) -> None:
    """Metric batches, run ends and registrations queued by a job are all in the store when the job ends."""
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}"), flush_every=3)
    client = tracker.store.client
    with tracker.job("imp/x", "job", params={}, tags={}) as parent:
        ids = []
        for r in range(4):
            with tracker.child(parent, f"r{r}", params={"round": r}, tags={}) as run:
                for step in range(7):  # several queued batches per run (flush_every=3)
                    run.log_metrics({"loss": float(step)}, step=step)
                ids.append(run.run_id)
    for run_id in ids:
        got = client.get_run(run_id)
        assert got.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(7))
    assert client.get_run(parent.run_id).info.status == "FINISHED"


class _KilledBeforeRegistering(MlflowTracker):
    """A try killed between writing round `skip`'s ticket and registering it (the ticket is on disk only)."""

    def __init__(self, cfg: TrackingConfig, skip: int) -> None:
        super().__init__(cfg)
        self.skip = skip

    def register_ticket(self, run: Any, ticket_dir: Path, meta: Any) -> None:
        if meta.round != self.skip:
            super().register_ticket(run, ticket_dir, meta)


def test_resume_registers_a_ticket_a_killed_try_left_unregistered(tmp_path: Path) -> None:
    write_toy(tmp_path / "data")
    params = tiny_params(tmp_path)
    job = make_job("toy", 0, params)
    run_imp(job, params, _KilledBeforeRegistering(params.tracking, skip=2))
    client = MlflowClient(params.tracking.uri, params.tracking.uri)
    name = tracking.registered_model_name("toy", params.model.name)
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, "r02-s0")
    runs_before = len(runs_of(client, "imp/toy"))

    dirs = run_imp(job, params, get_tracker(params))  # every round is on disk: nothing trains
    version = client.get_model_version_by_alias(name, "r02-s0")
    assert version.tags["weights_sha256"] == load_ticket(dirs[2]).meta.sha256["weights.safetensors"]
    assert version.tags["round"] == "2" and version.tags["sparsity"] == f"{load_ticket(dirs[2]).meta.sparsity:.4f}"
    catch_up = client.get_run(version.run_id)
    assert catch_up.data.tags["lth.registered_on_resume"] == "true" and catch_up.info.run_name == "imp toy s0 r02"
    assert "test_acc" in catch_up.data.metrics and catch_up.info.status == "FINISHED"
    assert len(runs_of(client, "imp/toy")) == runs_before + 1  # rounds 0 and 1 were registered: left alone
    assert len(client.search_model_versions(f"name = '{name}'")) == ROUNDS + 1

    run_imp(job, params, get_tracker(params))  # idempotent: a third run adds nothing
    assert len(client.search_model_versions(f"name = '{name}'")) == ROUNDS + 1
    assert len(runs_of(client, "imp/toy")) == runs_before + 1


def test_a_job_under_mlflow_run_links_the_project_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}"))
    client = tracker.store.client
    project = client.create_run(client.create_experiment("project")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", project)
    with tracker.job("imp/x", "job", params={}, tags={}) as parent:
        pass
    assert client.get_run(parent.run_id).data.tags[tracking.PROJECT_RUN_TAG] == project
    assert client.get_run(project).data.tags[tracking.JOB_RUN_TAG] == parent.run_id
    with tracker.job("tune/x", "tune", params={}, tags={}) as outer:  # tune and transfer run IMP jobs inside
        with tracker.job("imp/x", "imp inside tune", params={}, tags={}) as inner:
            pass
    assert client.get_run(project).data.tags[tracking.JOB_RUN_TAG] == outer.run_id  # the outermost job only
    assert tracking.PROJECT_RUN_TAG not in client.get_run(inner.run_id).data.tags
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)  # a run of another store: ignored, the job still runs
    with tracker.job("imp/y", "job", params={}, tags={}) as other:
        pass
    assert tracking.PROJECT_RUN_TAG not in client.get_run(other.run_id).data.tags


def test_a_failed_queued_write_does_not_hide_the_jobs_own_error(tmp_path: Path) -> None:
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}"))
    client = tracker.store.client

    def slow_failing_write() -> None:  # still queued when the job's body raises
        time.sleep(0.3)
        raise MlflowException("disk full")

    with pytest.raises(RuntimeError, match="training diverged"):
        with tracker.job("imp/x", "job", params={}, tags={}) as parent:
            tracker.store.submit(slow_failing_write)
            raise RuntimeError("training diverged")
    assert client.get_run(parent.run_id).info.status == "FAILED"
    assert tracker.store._pending == []  # drained: nothing left to surface later


def test_queued_write_errors_name_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}"))
    monkeypatch.setattr(tracker.store.client, "set_tag", lambda *a: (_ for _ in ()).throw(MlflowException("nope")))
    with pytest.raises(MlflowException) as info:
        tracker.store.call_later(tracker.store.client.set_tag, "abc123", "k", "v")
        tracker.store.drain()
    assert any("queued MLflow write failed" in note and "run abc123" in note for note in info.value.__notes__)


def test_versions_registered_without_the_weights_tag_are_not_registered_again(tmp_path: Path) -> None:
    write_toy(tmp_path / "data")
    params = tiny_params(tmp_path, rounds=1)
    job = make_job("toy", 0, params)
    run_imp(job, params, get_tracker(params))
    client = MlflowClient(params.tracking.uri, params.tracking.uri)
    name = tracking.registered_model_name("toy", params.model.name)
    for v in client.search_model_versions(f"name = '{name}'"):  # as an older lth registered them
        client.delete_model_version_tag(name, v.version, "weights_sha256")
    run_imp(job, params, get_tracker(params))
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2  # read from each version's uploaded ticket.json: the same weights
    assert {v.tags["weights_sha256"] for v in versions} == {
        load_ticket(d).meta.sha256["weights.safetensors"] for d in (tmp_path / "models/tickets/toy/seed0").glob("round*")}
