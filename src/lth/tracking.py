"""The one place that talks to MLflow (with lth.registry_query). Jobs see only `Tracker` and `Run`.

Every call names its run id explicitly (MlflowClient, no fluent active-run state), so several trackers
and processes can log to one store at once; nesting is the `mlflow.parentRunId` tag.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, TypeVar

import requests  # a dependency of mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from lth.config import Params, TrackingConfig
from lth.errors import UserError
from lth.provenance import git_commit
from lth.tickets import TicketMeta

T = TypeVar("T")
# MLflow announces creating and upgrading its sqlite tables at INFO on stderr; lth's stderr is for its own messages.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
PARENT_TAG = "mlflow.parentRunId"
JOB_KEY_TAG = "lth.job_key"
TICKET_ARTIFACTS = "ticket"  # run artifact folder holding the ticket directory
MAX_PARAM_LEN, MAX_TAG_LEN = 6000, 8000  # MLflow's value limits
METRICS_PER_BATCH, PARAMS_TAGS_PER_BATCH = 1000, 100  # MLflow's log_batch limits


class Run(Protocol):
    """A tracked run (a job's parent run or one nested run)."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None: ...


class Tracker(Protocol):
    """Opens parent and nested runs and registers tickets."""

    def job(self, experiment: str, run_name: str, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> contextlib.AbstractContextManager[Run]: ...
    def child(self, parent: Run, run_name: str, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> contextlib.AbstractContextManager[Run]: ...
    def register_ticket(self, run: Run, ticket_dir: Path, meta: TicketMeta) -> None: ...


class NullRun:
    """A run that records nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        pass


class NullTracker:
    """A tracker that records nothing (tests, dry runs)."""

    @contextlib.contextmanager
    def job(self, experiment: str, run_name: str, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[Run]:
        yield NullRun()

    @contextlib.contextmanager
    def child(self, parent: Run, run_name: str, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[Run]:
        yield NullRun()

    def register_ticket(self, run: Run, ticket_dir: Path, meta: TicketMeta) -> None:
        pass


# ---------------------------------------------------------------- the store: URI, client, error handling

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
                exp_id = self.call(self.client.create_experiment, name,
                                   artifact_location=self.artifact_location(name))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
                    raise
                exp_id = self.call(self.client.get_experiment_by_name, name).experiment_id
            exp = self.call(self.client.get_experiment, exp_id)
        elif exp.lifecycle_stage == "deleted":
            self.call(self.client.restore_experiment, exp.experiment_id)
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


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ---------------------------------------------------------------- runs

class MlflowRun:
    """One MLflow run addressed by id; metrics are buffered and sent with log_batch."""

    def __init__(self, store: Store, run_id: str, *, tags: Mapping[str, str],
                 flush_every: int = 500, flush_seconds: float = 10.0) -> None:
        self.store = store
        self.run_id: str | None = run_id
        self.tags = dict(tags)  # the job's own tags, inherited by its nested runs
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._metrics: list[Metric] = []
        self._last_flush = time.monotonic()
        self._last_step = 0

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params once (values stringified, cut to MLflow's limit); keys already logged are skipped."""
        have = self.store.call(self.store.client.get_run, self.run_id).data.params
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in have]
        for chunk in _chunks(items, PARAMS_TAGS_PER_BATCH):
            self.store.call(self.store.client.log_batch, self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Buffer metrics; they are sent every `flush_every` values or `flush_seconds`, and at run end."""
        # Without a step, a value is a summary: log it at the last step so it becomes the run's latest value.
        step = self._last_step if step is None else step
        self._last_step = max(self._last_step, step)
        ts = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        if len(self._metrics) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Send buffered metrics, at most METRICS_PER_BATCH per call."""
        pending, self._metrics = self._metrics, []
        for chunk in _chunks(pending, METRICS_PER_BATCH):
            self.store.call(self.store.client.log_batch, self.run_id, metrics=chunk)
        self._last_flush = time.monotonic()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags (values cut to MLflow's limit)."""
        items = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]
        for chunk in _chunks(items, PARAMS_TAGS_PER_BATCH):
            self.store.call(self.store.client.log_batch, self.run_id, tags=chunk)

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        """Upload a directory under `artifact_path` of this run."""
        self.store.call(self.store.client.log_artifacts, self.run_id, str(local_dir), artifact_path)


def job_key(experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """Identity of a job: same experiment, name, params and tags -> same parent run on a rerun."""
    blob = json.dumps([experiment, run_name, {k: str(v) for k, v in params.items()}, dict(tags)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError(f"run names and keys may not contain quotes: {value!r}")
    return f"'{value}'"


def _provenance_tags() -> dict[str, str]:
    commit = git_commit()
    return {"lth.git_commit": commit, "mlflow.source.git.commit": commit.split("+")[0]} if commit else {}


class MlflowTracker:
    """Tracker that logs parent and nested runs to MLflow and registers tickets."""

    def __init__(self, cfg: TrackingConfig, *, flush_every: int = 500, flush_seconds: float = 10.0) -> None:
        self.cfg = cfg
        self.store = Store(cfg)
        self._run_options: dict[str, Any] = {"flush_every": flush_every, "flush_seconds": flush_seconds}

    def _search(self, exp_id: str, where: str) -> list[Any]:
        return self.store.call(self.store.client.search_runs, [exp_id], filter_string=where,
                               order_by=["attributes.start_time DESC"], max_results=100)

    def _mark_stale(self, run_id: str) -> None:
        self.store.call(self.store.client.set_tag, run_id, "lth.stale", "true")
        self.store.call(self.store.client.set_terminated, run_id, "FAILED")

    @contextlib.contextmanager
    def _lifetime(self, run: MlflowRun) -> Iterator[MlflowRun]:
        """FINISHED when the block ends, FAILED (KILLED on Ctrl-C) when it raises; the exception propagates."""
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            try:
                run.flush()
            finally:
                self.store.call(self.store.client.set_terminated, run.run_id, status)

    @contextlib.contextmanager
    def job(self, experiment: str, run_name: str, *, params: Mapping[str, Any],
            tags: Mapping[str, str]) -> Iterator[Run]:
        """The job's parent run, reused when the same job ran before (so a resume adds no duplicate)."""
        exp_id = self.store.experiment_id(experiment)
        key = job_key(experiment, run_name, params, tags)
        found = [r for r in self._search(exp_id, f"tags.`{JOB_KEY_TAG}` = {_quote(key)} "
                                                  f"and attributes.run_name = {_quote(run_name)}")
                 if PARENT_TAG not in r.data.tags]
        all_tags = dict(tags) | _provenance_tags() | {JOB_KEY_TAG: key, "mlflow.runName": run_name}
        if found:
            run_id = found[0].info.run_id
            self.store.call(self.store.client.update_run, run_id, status="RUNNING")
            # Nested runs still RUNNING under a reused parent belong to a killed try (a finished step whose
            # run was not closed is skipped on resume, so child() would never see it): mark them FAILED.
            where = f"tags.`{PARENT_TAG}` = {_quote(run_id)} and attributes.status = 'RUNNING'"
            for old in self._search(exp_id, where):
                self._mark_stale(old.info.run_id)
        else:
            run_id = self.store.call(self.store.client.create_run, exp_id, run_name=run_name).info.run_id
        run = MlflowRun(self.store, run_id, tags=tags, **self._run_options)
        run.set_tags(all_tags)
        run.log_params(params)
        with self._lifetime(run):
            yield run

    @contextlib.contextmanager
    def child(self, parent: Run, run_name: str, *, params: Mapping[str, Any],
              tags: Mapping[str, str]) -> Iterator[Run]:
        """A nested run under `parent`; a stale RUNNING one of the same name (a crashed try) is marked FAILED."""
        assert isinstance(parent, MlflowRun) and parent.run_id is not None
        exp_id = self.store.call(self.store.client.get_run, parent.run_id).info.experiment_id
        where = f"tags.`{PARENT_TAG}` = {_quote(parent.run_id)} and attributes.run_name = {_quote(run_name)}"
        for old in self._search(exp_id, where):
            if old.info.status in ("RUNNING", "SCHEDULED"):
                self._mark_stale(old.info.run_id)
        run_id = self.store.call(self.store.client.create_run, exp_id, run_name=run_name,
                                 tags={PARENT_TAG: parent.run_id}).info.run_id
        run = MlflowRun(self.store, run_id, tags=parent.tags, **self._run_options)
        run.set_tags(parent.tags | dict(tags) | _provenance_tags() | {"mlflow.runName": run_name})
        run.log_params(params)
        with self._lifetime(run):
            yield run

    def register_ticket(self, run: Run, ticket_dir: Path, meta: TicketMeta) -> None:
        """Upload the ticket directory under `ticket/` and make it a version of ticket-<source>-<arch>."""
        if not self.cfg.register:
            return
        assert run.run_id is not None
        run.log_artifacts(ticket_dir, TICKET_ARTIFACTS)
        name = registered_model_name(meta.source, meta.arch)
        client = self.store.client
        try:
            self.store.call(client.create_registered_model, name,
                            description=f"Lottery tickets found by IMP on {meta.source} ({meta.arch})")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # an earlier ticket (or another job) created it
                raise
        artifact_uri = self.store.call(client.get_run, run.run_id).info.artifact_uri.rstrip("/")
        version = self.store.call(client.create_model_version, name, source=f"{artifact_uri}/{TICKET_ARTIFACTS}",
                                  run_id=run.run_id, tags=version_tags(meta))
        self.store.call(client.set_registered_model_alias, name, ticket_alias(meta.round, meta.seed),
                        version.version)


def registered_model_name(source: str, arch: str) -> str:
    """ticket-<source>-<arch>."""
    return f"ticket-{source}-{arch}"


def ticket_alias(round_: int, seed: int) -> str:
    """r<kk>-s<seed>."""
    return f"r{round_:02d}-s{seed}"


def version_tags(meta: TicketMeta) -> dict[str, str]:
    """Registry tags of a ticket version (strings: registry filters compare strings with = and LIKE)."""
    return {"source": meta.source, "arch": meta.arch, "seed": str(meta.seed), "round": str(meta.round),
            "sparsity": f"{meta.sparsity:.4f}", "rewind_epoch": str(meta.rewind_epoch),
            "data_version": meta.data_version, "code_version": meta.code_version}


def get_tracker(params: Params) -> Tracker:
    """The study's MLflow tracker (checks a tracking server is reachable before any training)."""
    return MlflowTracker(params.tracking)
