"""A real `mlflow server` on 127.0.0.1 with artifacts on S3 (moto's server): nested runs over REST, registry, fetch."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from helpers import free_port, start_server, stop_server, tiny_params, write_toy
from lth.errors import UserError
from lth.study.imp import make_job, run_imp
from lth.tracking.mlflow.query import fetch_ticket, list_tickets
from lth.tickets import load_ticket
from lth.tracking.mlflow import get_tracker
from lth.tracking.mlflow import PARENT_TAG

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
BUCKET = "lth-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with one bucket; yields the endpoint URL."""
    import boto3

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = start_server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, os.environ | S3_ENV,
                 f"{endpoint}/moto-api/")
    try:
        boto3.client("s3", endpoint_url=endpoint, **_creds()).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop_server(proc)


def _creds() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@pytest.fixture(scope="module")
def server(s3: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` with a sqlite backend and artifacts proxied to s3://lth-test/server; yields its URL."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", f"s3://{BUCKET}/server"]
    env = os.environ | S3_ENV | {"MLFLOW_S3_ENDPOINT_URL": s3}
    proc = start_server(cmd, root / "server.log", env, f"{url}/health", timeout=60)
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def remote_study(server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One IMP job (rounds 0..1) logged to the server, which proxies the artifacts to S3."""
    root = tmp_path_factory.mktemp("remote")
    write_toy(root / "data")
    params = tiny_params(root, rounds=1, uri=server)
    dirs = run_imp(make_job("toy", 0, params), params, get_tracker(params))
    return {"params": params, "dirs": dirs, "url": server}


def test_nested_runs_are_visible_through_the_rest_api(remote_study: dict[str, Any]) -> None:
    url = remote_study["url"]
    exp = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "imp/toy"},
                       timeout=10).json()["experiment"]
    runs = requests.post(f"{url}/api/2.0/mlflow/runs/search",
                         json={"experiment_ids": [exp["experiment_id"]], "max_results": 100}, timeout=10).json()["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if PARENT_TAG not in t]
    assert len(parents) == 1 and parents[0]["info"]["run_name"] == "imp toy s0"
    pid = parents[0]["info"]["run_id"]
    children = sorted(r["info"]["run_name"] for r, t in zip(runs, tags) if t.get(PARENT_TAG) == pid)
    assert children == ["imp toy s0 r00", "imp toy s0 r01"]
    assert all(r["info"]["status"] == "FINISHED" for r in runs)
    child = next(r for r, t in zip(runs, tags) if t.get(PARENT_TAG) == pid)
    history = requests.get(f"{url}/api/2.0/mlflow/metrics/get-history",
                           params={"run_id": child["info"]["run_id"], "metric_key": "train_loss"}, timeout=10).json()
    assert sorted(m["step"] for m in history["metrics"]) == list(range(1, len(history["metrics"]) + 1))


def test_tickets_are_registered_on_the_server_with_artifacts_on_s3(remote_study: dict[str, Any], s3: str) -> None:
    import boto3

    rows = list_tickets(remote_study["params"], "toy")
    assert [(r["round"], r["alias"]) for r in rows] == [(0, "r00-s0"), (1, "r01-s0")]
    assert all(r["artifact"].startswith("mlflow-artifacts:") for r in rows)  # proxied by the server
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3, **_creds())
            .list_objects_v2(Bucket=BUCKET, Prefix="server/")["Contents"]]
    assert sum(k.endswith("/ticket/mask.safetensors") for k in keys) == 2


def test_fetch_through_the_server_downloads_a_verified_ticket(remote_study: dict[str, Any], tmp_path: Path) -> None:
    out, row = fetch_ticket(remote_study["params"], "toy", 0.19, out_dir=tmp_path / "t")
    ticket = load_ticket(out)
    pruned = sum(int((~m).sum()) for m in ticket.mask.values()) / sum(m.numel() for m in ticket.mask.values())
    assert row["round"] == 1 and f"{pruned:.4f}" == f"{row['sparsity']:.4f}"
    assert (out / "mask.safetensors").read_bytes() == (remote_study["dirs"][1] / "mask.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"available sparsities: 0\.0000, 0\.2\d{3}$"):
        fetch_ticket(remote_study["params"], "toy", 0.6, out_dir=tmp_path / "u")
    assert not (tmp_path / "u").exists()


def test_unreachable_server_is_a_user_error(tmp_path: Path) -> None:
    params = tiny_params(tmp_path, uri=f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(UserError, match="MLflow tracking server http://127.0.0.1:.* unreachable.*start it"):
        get_tracker(params)
    assert time.monotonic() - t0 < 10


def test_direct_s3_artifacts_and_bad_s3_settings(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toy(tmp_path / "data")
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3)
    params = tiny_params(tmp_path, rounds=1, artifact_location=f"s3://{BUCKET}/direct")
    run_imp(make_job("toy", 0, params), params, get_tracker(params))
    out, row = fetch_ticket(params, "toy", 0.2, out_dir=tmp_path / "t")
    assert row["artifact"].startswith(f"s3://{BUCKET}/direct/imp/toy/") and load_ticket(out).meta.round == 1

    def job_on(params_: Any) -> None:
        tracker = get_tracker(params_)
        with tracker.job("imp/other", "x", params={}, tags={}):
            pass

    other = tiny_params(tmp_path / "o", artifact_location=f"s3://{BUCKET}/other")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UserError, match=r"S3 endpoint http://127.0.0.1:\d+ unreachable for s3://lth-test/other/imp/other: start it"):
        job_on(other)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(UserError, match=r"no AWS credentials for s3://lth-test/other/imp/other: set AWS_ACCESS_KEY_ID"):
        job_on(other)
