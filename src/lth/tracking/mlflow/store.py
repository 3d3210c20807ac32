"""The MLflow store: tracking URI, one client, retries, and MLflow/S3 failures turned into one-line errors."""

from __future__ import annotations

import fcntl
import logging
import os
import random
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import requests  # a dependency of mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from tqdm import tqdm

from lth.config import TrackingConfig
from lth.errors import UserError

T = TypeVar("T")
# Which of MLflow's UIs an experiment opens in: the runs table ("Model training"), not the GenAI traces overview.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
log = logging.getLogger(__name__)
# MLflow's client retries failed HTTP requests itself (7 times, ~4 min), POSTs included: a create_run whose answer was
# lost is sent again and makes a second run. lth turns that off and retries itself (Store.call), finding what a lost
# create made (Store.create). A value the user set is kept.
MLFLOW_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
MAX_WAIT = 15.0  # seconds between tries while a server is unreachable, after 1, 2, 4, 8
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


def outage_waits(budget: float) -> list[float]:
    """Waits between tries while a server is unreachable: 1, 2, 4, 8, then 15 s, summing to `budget` seconds."""
    waits: list[float] = []
    while (left := budget - sum(waits)) > 0:
        waits.append(min(2.0 ** len(waits), MAX_WAIT, left))
    return waits


def outage_kind(exc: BaseException) -> str | None:
    """What failed when `exc` means the server is down or restarting (no answer, or a proxy's 502-504), else None."""
    seen: BaseException | None = exc
    while seen is not None:  # MLflow raises its own exception while handling the requests one
        if isinstance(seen, requests.exceptions.SSLError):  # a certificate problem: no restart fixes it
            return None
        if isinstance(seen, (requests.ConnectionError, requests.Timeout)):
            return type(seen).__name__
        if isinstance(seen, requests.exceptions.RetryError) and (code := re.search(r"too many (50[234]) ", str(seen))):
            return f"HTTP {code.group(1)}"
        seen = seen.__cause__ or seen.__context__
    return None


class Outage:
    """One stretch of time a tracking server does not answer, shared by a store's threads.

    Every try that fails during it waits for the next point of one schedule (`outage_waits` from its start), so
    threads retry together, each retry is announced once on stderr, and the whole outage lasts at most `budget`
    seconds: after that every call fails at once. A call that gets through ends it.
    """

    def __init__(self, uri: str, budget: float) -> None:
        self.uri = uri
        self.budget = budget
        self.waits = outage_waits(budget)
        self._lock = threading.Lock()
        self._since: float | None = None  # time.monotonic() of the first failure; None: the server answers
        self._shown = 0  # retries announced so far

    def wait(self, kind: str) -> None:
        """Sleep until the next retry of this outage (announcing it); UserError once the budget is spent."""
        with self._lock:
            now = time.monotonic()
            if self._since is None:
                self._since, self._shown = now, 0
            elapsed, at = now - self._since, 0.0
            for k, step in enumerate(self.waits, 1):
                at += step
                if at > elapsed:
                    break
            else:
                raise UserError(f"MLflow tracking server {redact(self.uri)} unreachable for {self.budget:g}s ({kind}); "
                                "start it again (mlflow server) or raise tracking.retry_seconds") from None
            pause = at - elapsed
            if k > self._shown:
                self._shown = k
                tqdm.write(f"MLflow server {redact(self.uri)} unreachable ({kind}), retrying in {pause:.0f}s "
                           f"({k}/{len(self.waits)})", file=sys.stderr)
        time.sleep(pause)

    def over(self) -> None:
        """A call got through."""
        if self._since is not None:
            with self._lock:
                self._since = None


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
        self.outage = Outage(self.uri, cfg.retry_seconds)
        if _is_http(self.uri):
            os.environ.setdefault(MLFLOW_RETRIES_ENV, "0")
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
        """fn(*args, **kwargs), retried while sqlite is locked or the tracking server does not answer.

        sqlite: backoff while another process holds the lock (`attempts` tries). A server: while it is down or
        restarting, wait and try again for at most tracking.retry_seconds per outage, each wait shown on stderr;
        after that a UserError naming the server.
        """
        return self._retrying(lambda: fn(*args, **kwargs))

    def create(self, fn: Callable[..., T], find: Callable[[], T | None], *args: Any, **kwargs: Any) -> T:
        """`call(fn, ...)` for a write that creates something (a run, a model version), so that it is made once.

        When a try fails without an answer, the server may have made the thing all the same: before trying again,
        find() looks for it (no retries of its own) and, if it returns one, that is the result.
        """
        return self._retrying(lambda: fn(*args, **kwargs), find)

    def _retrying(self, attempt: Callable[[], T], find: Callable[[], T | None] | None = None) -> T:
        locked = 0  # "database is locked" answers so far
        unsure = False  # a try failed without an answer: it may have been carried out
        while True:
            try:
                if unsure and find is not None and (found := find()) is not None:
                    result = found
                else:
                    result = attempt()
                self.outage.over()
                return result
            except Exception as exc:
                if isinstance(exc, MlflowException) and "database is locked" in str(exc) and locked < self.attempts - 1:
                    # Several processes share one sqlite file; the writer holds the lock briefly.
                    time.sleep(min(0.05 * 2 ** locked, 2.0) * (1 + random.random()))
                    locked += 1
                    continue
                if (kind := outage_kind(exc)) is not None:
                    self.outage.wait(kind)
                    unsure = True
                    continue
                if not isinstance(exc, MlflowException) and (message := _s3_problem(exc, "MLflow artifacts")):
                    raise UserError(message) from None
                raise

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
