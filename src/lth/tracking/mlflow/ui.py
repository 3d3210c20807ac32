"""MLflow's web UI over the study's store (`lth ui`): start it on 127.0.0.1 and name the study's pages.

MLflow 3's UI opens an experiment in its GenAI view (a traces overview) unless the URL asks for the
training view; the browser then remembers the choice. Every URL made here asks for it, and every experiment
lth creates also carries the experiment-kind tag some builds read instead (store.EXPERIMENT_KIND_TAG).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import requests

from lth.config import Params
from lth.errors import UserError
from lth.tracking.mlflow.store import Store, redact

TRAINING_VIEW = "workflowType=machine_learning"  # the UI's query parameter for the runs table
START_TIMEOUT_S = 90.0  # `mlflow ui` takes ~15 s to answer /health on a small machine


@dataclass(frozen=True)
class StudyPage:
    """One experiment of the study and the URL of its runs table."""

    experiment: str
    url: str


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in the training view, e.g. http://127.0.0.1:5000/#/experiments/1?workflowType=..."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?{TRAINING_VIEW}"


def study_experiments(params: Params) -> list[str]:
    """The experiments the study's jobs log to, in pipeline order: imp/<source>, transfer/<target>, tune/<target>."""
    names = [f"imp/{s}" for s in params.imp.sources] + [f"transfer/{t}" for t in params.transfer.targets]
    return list(dict.fromkeys(names + [f"tune/{params.tune.target}"]))


def study_pages(params: Params, base: str, store: Store | None = None) -> list[StudyPage]:
    """The study's experiments that exist in the store, with their runs-table URLs."""
    store = store or Store(params.tracking)
    pages = []
    for name in study_experiments(params):
        exp = store.call(store.client.get_experiment_by_name, name)
        if exp is not None and exp.lifecycle_stage == "active":
            pages.append(StudyPage(name, experiment_url(base, exp.experiment_id)))
    return pages


def check_port_free(host: str, port: int) -> None:
    """A UserError when something already listens on host:port (e.g. an earlier `lth ui`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is in use (another `lth ui` or `mlflow ui`?): stop it or pass "
                            "--port") from None


def start_server(uri: str, host: str, port: int) -> subprocess.Popen[bytes]:
    """`mlflow ui` over the store at `uri`, serving its artifacts, in its own process group."""
    check_port_free(host, port)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)


def wait_ready(proc: subprocess.Popen[bytes], base: str, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until the server answers /health; a UserError when it exits or does not answer in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"`mlflow ui` exited with status {proc.returncode} before it answered at {redact(base)}"
                            " (see its messages above)")
        try:
            if requests.get(f"{base}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise UserError(f"`mlflow ui` did not answer at {base}/health within {timeout:.0f} s")
