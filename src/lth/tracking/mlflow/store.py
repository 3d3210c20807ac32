"""The MLflow store: tracking URI, one client, retries, and MLflow/S3 failures turned into one-line errors."""

from __future__ import annotations

import fcntl
import logging
import os
import random
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import requests  # a dependency of mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lth.config import TrackingConfig
from lth.errors import UserError

T = TypeVar("T")
# Which of MLflow's UIs an experiment opens in: the runs table ("Model training"), not the GenAI traces overview.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
log = logging.getLogger(__name__)
# MLflow announces creating and upgrading its sqlite tables at INFO on stderr; lth's stderr is for its own messages.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def project_dir(cwd: Path | None = None) -> Path:
    """The working directory, or the DVC project whose `.dvc/tmp/exps/...` temporary copy it is."""
    # `dvc exp run --temp` and `dvc queue` run stages in .dvc/tmp/exps/<...>/tmpXXXX, deleted afterwards.
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri(cfg: TrackingConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite:///<absolute project dir>/mlflow.db."""
    # Absolute and outside any `dvc exp run --temp` copy, which would take the runs with it when deleted.
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_dir() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(project_dir() / uri[len('sqlite:///'):]).resolve()}"
    return uri


def redact(uri: str) -> str:
    """The URI without any user:password part, for messages."""
    return re.sub(r"//[^/@]*@", "//", uri)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (UserError) when an http(s) tracking server does not answer GET /health."""
    if not _is_http(uri):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as exc:
        raise UserError(_unreachable(uri, exc)) from None


def _unreachable(uri: str, exc: BaseException) -> str:
    return (f"MLflow tracking server {redact(uri)} unreachable: {type(exc).__name__}; start it (mlflow server) "
            "or unset MLFLOW_TRACKING_URI / tracking.uri")


def _s3_problem(exc: BaseException, where: str) -> str | None:
    """A one-line message for S3 credential/endpoint failures (botocore is imported only by boto3)."""
    kind = type(exc).__name__
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL", "the default AWS endpoint")
    if kind in ("NoCredentialsError", "PartialCredentialsError"):
        return f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return f"S3 endpoint {redact(endpoint)} unreachable for {where}: start it or fix MLFLOW_S3_ENDPOINT_URL"
    if kind == "ClientError":
        return f"S3 refused access to {where}: {exc}"
    return None


class Store:
    """An MlflowClient bound to one tracking URI, with retries and one-line user errors."""

    def __init__(self, cfg: TrackingConfig, attempts: int = 8) -> None:
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.attempts = attempts
        check_reachable(self.uri)  # before any training, not after the first round
        self._checked_s3: set[str] = set()
        self._writer: ThreadPoolExecutor | None = None  # one thread: queued writes run in submission order
        self._pending: list[Future[Any]] = []
        if not self.uri.startswith("sqlite:///"):
            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            return
        # The client creates or upgrades the sqlite tables; MLflow's migrations race when several processes
        # open a new file at once, so one process at a time does it.
        db = Path(self.uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(f"{db.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            self.call(self.client.search_registered_models, max_results=1)  # the registry's store, created lazily

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs), retried with backoff while sqlite says "database is locked"."""
        for attempt in range(self.attempts):
            try:
                return fn(*args, **kwargs)
            except MlflowException as exc:
                text = str(exc)
                if "database is locked" in text and attempt < self.attempts - 1:
                    # Several processes share one sqlite file; the writer holds the lock briefly.
                    time.sleep(min(0.05 * 2 ** attempt, 2.0) * (1 + random.random()))
                    continue
                if _is_http(self.uri) and ("Max retries exceeded" in text or "Connection refused" in text):
                    raise UserError(_unreachable(self.uri, exc)) from None
                raise
            except Exception as exc:
                message = _s3_problem(exc, "MLflow artifacts")
                if message is not None:
                    raise UserError(message) from None
                if isinstance(exc, requests.ConnectionError):
                    raise UserError(_unreachable(self.uri, exc)) from None
                raise
        raise AssertionError("unreachable")

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run fn(*args, **kwargs) on the store's writer thread, after everything submitted before it.

        For writes the job need not wait for (metric batches, run ends, ticket registration): training goes on
        meanwhile. A failure is raised on the caller's thread, with its traceback and a note naming the write,
        at the next submit or drain (further failures meanwhile are logged). The thread is joined at
        interpreter exit, so queued writes are not lost when a command returns.
        """
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lth-mlflow")
        self._pending.append(self._writer.submit(_noted, fn, *args, **kwargs))
        self._raise_failed()  # after queuing: a run's end is still written when an earlier write failed

    def call_later(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """`call(fn, ...)` (with its retries) on the writer thread; see submit."""
        self.submit(self.call, fn, *args, **kwargs)

    def drain(self) -> None:
        """Wait for every submitted write; raise the first failure (log the others)."""
        failures = []
        while self._pending:
            exc = self._pending[0].exception()  # waits; if interrupted, the rest stay pending
            self._pending.pop(0)
            if exc is not None:
                failures.append(exc)
        _raise_first(failures)

    def _raise_failed(self) -> None:
        failures = [exc for f in self._pending if f.done() and (exc := f.exception()) is not None]
        self._pending = [f for f in self._pending if not f.done()]
        _raise_first(failures)

    def artifact_location(self, experiment: str) -> str | None:
        """<tracking.artifact_location>/<experiment>, else <db dir>/mlruns/<experiment> for sqlite."""
        # MLflow's own default for sqlite is ./mlruns of whatever cwd first created the experiment.
        if self.cfg.artifact_location:
            return f"{self.cfg.artifact_location.rstrip('/')}/{experiment}"
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).parent / "mlruns" / experiment).as_uri()
        return None  # a server decides (e.g. --artifacts-destination)

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`, created (or restored) when needed; checks S3 before any run."""
        exp = self.call(self.client.get_experiment_by_name, name)
        if exp is None:
            try:
                exp_id = self.call(self.client.create_experiment, name, artifact_location=self.artifact_location(name),
                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
                    raise
                exp_id = self.call(self.client.get_experiment_by_name, name).experiment_id
            exp = self.call(self.client.get_experiment, exp_id)
        elif exp.lifecycle_stage == "deleted":
            self.call(self.client.restore_experiment, exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # created by an older lth (or by hand)
            self.call(self.client.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.check_s3(exp.artifact_location)
        return exp.experiment_id

    def check_s3(self, location: str) -> None:
        """For s3:// artifact locations logged to directly: credentials and endpoint work (UserError if not)."""
        if not location.startswith("s3://") or location in self._checked_s3:
            return
        import boto3
        from botocore.config import Config

        bucket = location[len("s3://"):].split("/", 1)[0]
        # A fresh session: the default one caches credentials it found earlier in this process.
        s3 = boto3.session.Session().client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL"),
                          config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))
        try:
            s3.head_bucket(Bucket=bucket)
        except Exception as exc:
            message = _s3_problem(exc, location)
            if message is None:
                raise
            raise UserError(message) from None
        self._checked_s3.add(location)


def _noted(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(...) on the writer thread; its exception gets a note naming the write (it surfaces later, elsewhere)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        target = args[0] if getattr(fn, "__name__", "") == "call" and args else fn
        run_id = next((a for a in args[1:2] if isinstance(a, str)), None) if target is not fn else None
        exc.add_note(f"(a queued MLflow write failed: {getattr(target, '__name__', repr(target))}"
                     + (f" for run {run_id})" if run_id else ")"))
        raise


def _raise_first(failures: list[BaseException]) -> None:
    for exc in failures[1:]:
        log.warning("another queued MLflow write failed too: %s", exc)
    if failures:
        raise failures[0]


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
