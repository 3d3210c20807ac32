"""What MLflow's UI shows about a run's lineage: its datasets, its code, its ticket; tickets that explain themselves;
experiments that open in the training view; system metrics per job."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from helpers import parents_and_children, tiny_params, write_toy
from lth.config import TrackingConfig
from lth.data.store import load_prepared, read_dataset_meta
from lth.provenance import git_branch
from lth.study.transfer import FineTune, run_finetune
from lth.tickets import WEIGHTS, read_ticket_meta, ticket_dir
from lth.tracking import dataset_inputs
from lth.tracking.inputs import split_digest
from lth.tracking.mlflow import get_tracker
from lth.tracking.mlflow.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Store
from lth.tracking.mlflow.trackers import command_line


def _inputs(run: Any) -> dict[str, Any]:
    """A run's dataset inputs by context (train, validation, test, ticket)."""
    return {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
            for d in run.inputs.dataset_inputs}


def test_every_imp_run_lists_its_three_splits_with_their_digests(tracked_imp: dict[str, Any]) -> None:
    parents, children = parents_and_children(tracked_imp["client"], "imp/toy")
    meta = read_dataset_meta(tracked_imp["params"].paths.data, "toy")
    for run in parents + children:
        inputs = _inputs(run)
        assert sorted(inputs) == ["test", "train", "validation"], run.info.run_name
        for context, split in (("train", "train"), ("validation", "val"), ("test", "test")):
            ds = inputs[context]
            assert (ds.name, ds.digest) == ("toy", split_digest(meta, split))
            assert json.loads(ds.source)["uri"].endswith("data/prepared/toy")
            assert json.loads(ds.profile)["num_rows"] == meta["counts"][split]["total"]


def test_runs_carry_the_source_columns_and_experiments_the_training_view(tracked_imp: dict[str, Any]) -> None:
    client = tracked_imp["client"]
    assert client.get_experiment_by_name("imp/toy").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    parents, children = parents_and_children(client, "imp/toy")
    for run in parents + children:
        tags = run.data.tags
        assert tags["mlflow.source.name"] == command_line() and tags["mlflow.source.type"] == "LOCAL"
        assert tags.get("mlflow.source.git.branch", "") == git_branch()


def test_the_source_name_is_the_command_as_typed() -> None:
    assert command_line(["/x/.venv/bin/lth", "imp", "fashion-mnist", "--seed", "0"]) == "lth imp fashion-mnist --seed 0"
    assert command_line(["/x/src/lth/__main__.py", "transfer", "my target"]) == "lth transfer 'my target'"


def test_an_older_experiment_gets_the_kind_tag_on_its_next_job(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    exp_id = client.create_experiment("imp/old")  # as lth created them before
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(exp_id).tags
    assert Store(TrackingConfig(uri=uri)).experiment_id("imp/old") == exp_id
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_a_dataset_names_its_dvc_path_and_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toy(tmp_path / "data")
    (tmp_path / ".dvc").mkdir()
    # as `dvc remote add -d` writes it; config.local overrides (credentials, a personal remote)
    (tmp_path / ".dvc" / "config").write_text("[core]\n    remote = local\n['remote \"local\"']\n    url = storage\n"
                                              "['remote \"s3r\"']\n    url = s3://bucket/lth\n")
    monkeypatch.chdir(tmp_path)
    data = load_prepared("data", "toy")
    inputs = dataset_inputs("data", data)
    assert {d.source for d in inputs} == {"data/prepared/toy"}
    assert {d.remote for d in inputs} == {str(tmp_path / ".dvc" / "storage")}
    (tmp_path / ".dvc" / "config.local").write_text("[core]\n    remote = s3r\n")
    assert {d.remote for d in dataset_inputs("data", data)} == {"s3://bucket/lth"}
    half = dataset_inputs("data", data, train_fraction=0.5)
    assert half[0].context == "train" and half[0].digest != inputs[0].digest  # a subset is another dataset
    assert [d.digest for d in half[1:]] == [d.digest for d in inputs[1:]]


def test_ticket_versions_carry_a_description_and_a_signature(tracked_imp: dict[str, Any], tmp_path: Path) -> None:
    client = tracked_imp["client"]
    name = "ticket-toy-" + tracked_imp["params"].model.name
    assert "A ticket is a sparse subnetwork" in client.get_registered_model(name).description
    for mv in client.search_model_versions(f"name = '{name}'"):
        meta = read_ticket_meta(tracked_imp["dirs"][int(mv.tags["round"])])
        assert f"seed {meta.seed}, IMP round {meta.round}" in mv.description
        assert f"lth tickets fetch --source toy --seed {meta.seed} --sparsity {meta.sparsity:.4f}" in mv.description
        assert "load_ticket(" in mv.description
        got = client.download_artifacts(mv.run_id, "ticket/MLmodel", str(tmp_path / str(mv.version)))
        signature = yaml.safe_load(Path(got).read_text())["signature"]
        [inp], [out] = json.loads(signature["inputs"]), json.loads(signature["outputs"])
        assert inp["tensor-spec"] == {"dtype": "float32", "shape": [-1, 3, -1, -1]}
        assert out["tensor-spec"] == {"dtype": "float32", "shape": [-1, meta.num_classes]}


def test_a_fine_tune_links_the_ticket_version_it_started_from(tracked_imp: dict[str, Any], tmp_path: Path) -> None:
    p = tracked_imp["params"]
    params = replace(p, paths=replace(p.paths, results=str(tmp_path / "results")))
    tracker = get_tracker(params)
    data = load_prepared(p.paths.data, "toy")
    with tracker.job("transfer/toy", "transfer toy", params={}, tags={}) as parent:
        for ft in (FineTune("toy", "scratch", "", 0, 0), FineTune("toy", "transfer", "toy", 0, 1)):
            run_finetune(ft, data, params, tracker, parent)
    client = tracked_imp["client"]
    _, children = parents_and_children(client, "transfer/toy")
    runs = {r.data.tags["arm"]: r for r in children}
    meta = read_ticket_meta(ticket_dir(p.paths.models, "toy", 0, 1))
    version = client.get_model_version_by_alias(f"ticket-toy-{p.model.name}", "r01-s0")
    assert version.tags["weights_sha256"] == meta.sha256[WEIGHTS]
    uri = f"models:/{version.name}/{version.version}"
    assert runs["transfer"].data.tags["lth.ticket"] == uri
    ticket = _inputs(runs["transfer"])["ticket"]
    assert (ticket.name, json.loads(ticket.source)["uri"]) == (version.name, uri)
    assert "ticket" not in _inputs(runs["scratch"]) and "lth.ticket" not in runs["scratch"].data.tags
    assert sorted(_inputs(runs["scratch"])) == ["test", "train", "validation"]


@pytest.mark.parametrize("on", [True, False])
def test_system_metrics_are_logged_per_job_when_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # instead of every 10 s
    params = tiny_params(tmp_path, system_metrics=on)
    tracker = get_tracker(params)
    with tracker.job("imp/sys", "sys", params={}, tags={}) as run:
        time.sleep(1.5)  # a few samples
    metrics = MlflowClient(params.tracking.uri).get_run(run.run_id).data.metrics
    have = {k for k in metrics if k.startswith("system/")}
    if on:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= have
    else:
        assert have == set()


def test_lth_ui_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([shutil.which("lth") or "lth", "ui", "--port", str(port), "--params", str(params)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port" in line
