"""The one place that talks to MLflow (this package and lth.registry_query). Jobs see only `Tracker` and `Run`.

Every call names its run id explicitly (MlflowClient, no fluent active-run state), so several trackers
and processes can log to one store at once; nesting is the `mlflow.parentRunId` tag.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from lth.config import Params, TrackingConfig
from lth.provenance import git_commit
from lth.tickets import META, WEIGHTS, TicketMeta
from lth.tracking.store import Store, _chunks
from lth.tracking.store import check_reachable, project_dir, redact, tracking_uri  # noqa: F401 (public API)

log = logging.getLogger(__name__)
PARENT_TAG = "mlflow.parentRunId"
JOB_KEY_TAG = "lth.job_key"
PROJECT_RUN_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run` for the command it launches
PROJECT_RUN_TAG = "lth.project_run_id"  # on a job's parent run: the `mlflow run` run that launched it
JOB_RUN_TAG = "lth.job_run_id"  # on that project run: the job's parent run
TICKET_ARTIFACTS = "ticket"  # run artifact folder holding the ticket directory
MAX_PARAM_LEN, MAX_TAG_LEN = 6000, 8000  # MLflow's value limits
METRICS_PER_BATCH, PARAMS_TAGS_PER_BATCH = 1000, 100  # MLflow's log_batch limits
SEARCH_PAGE = 100


class Run(Protocol):
    """A tracked run (a job's parent run or one nested run)."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class Tracker(Protocol):
    """Opens parent and nested runs and registers tickets."""

    def job(self, experiment: str, run_name: str, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> contextlib.AbstractContextManager[Run]: ...
    def child(self, parent: Run, run_name: str, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> contextlib.AbstractContextManager[Run]: ...
    def register_ticket(self, run: Run, ticket_dir: Path, meta: TicketMeta) -> None: ...
    def ensure_registered(self, parent: Run, run_name: str, ticket_dir: Path, meta: TicketMeta, *,
                          params: Mapping[str, Any], tags: Mapping[str, str],
                          metrics: Mapping[str, float]) -> bool: ...


class NullRun:
    """A run that records nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
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

    def ensure_registered(self, parent: Run, run_name: str, ticket_dir: Path, meta: TicketMeta, *,
                          params: Mapping[str, Any], tags: Mapping[str, str],
                          metrics: Mapping[str, float]) -> bool:
        return False


# ---------------------------------------------------------------- runs

class MlflowRun:
    """One MLflow run addressed by id; metrics are buffered and sent with log_batch."""

    def __init__(self, store: Store, info: Any, *, tags: Mapping[str, str],
                 flush_every: int = 500, flush_seconds: float = 10.0, fresh: bool = False) -> None:
        self.store = store
        self.run_id: str | None = info.run_id
        self.experiment_id: str = info.experiment_id
        self.artifact_uri: str = info.artifact_uri
        self.fresh = fresh  # created by this process: nothing logged yet, so no need to read it back
        self.tags = dict(tags)  # the job's own tags, inherited by its nested runs
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._metrics: list[Metric] = []
        self._params: list[Param] = []  # a fresh run's params ride along with its next metrics batch
        self._last_flush = time.monotonic()
        self._last_step = 0

    def log_params(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> None:
        """Log params once (values stringified, cut to MLflow's limit) and `tags`, in as few calls as possible.

        A fresh run's params are sent with its next metrics batch (at most `flush_seconds` later), which
        saves one store round trip per run; a reused run skips the keys it already has.
        """
        have = {} if self.fresh else self.store.call(self.store.client.get_run, self.run_id).data.params
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in have]
        if self.fresh and not tags:
            self._params.extend(items)
            return
        tag_items = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in (tags or {}).items()]
        for i in range(0, max(len(items), len(tag_items)), PARAMS_TAGS_PER_BATCH):
            self.store.call(self.store.client.log_batch, self.run_id, params=items[i:i + PARAMS_TAGS_PER_BATCH],
                            tags=tag_items[i:i + PARAMS_TAGS_PER_BATCH])

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
        """Queue buffered metrics (and a fresh run's params) for the writer thread, in MLflow's batch sizes."""
        metrics, self._metrics = self._metrics, []
        params, self._params = self._params, []
        for i in range(max(-(-len(metrics) // METRICS_PER_BATCH), -(-len(params) // PARAMS_TAGS_PER_BATCH))):
            self.store.call_later(self.store.client.log_batch, self.run_id,
                            metrics=metrics[i * METRICS_PER_BATCH:(i + 1) * METRICS_PER_BATCH],
                            params=params[i * PARAMS_TAGS_PER_BATCH:(i + 1) * PARAMS_TAGS_PER_BATCH])
        self._last_flush = time.monotonic()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Queue tags (values cut to MLflow's limit) for the writer thread."""
        items = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]
        for chunk in _chunks(items, PARAMS_TAGS_PER_BATCH):
            self.store.call_later(self.store.client.log_batch, self.run_id, tags=chunk)


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
        self._models: set[str] = set()  # registered models known to exist (saves a failing create per ticket)
        self._provenance_cache: dict[str, str] | None = None
        self._jobs = 0  # jobs open in this tracker (a job may run others inside it)

    def _provenance(self) -> dict[str, str]:
        """The code's provenance tags, read from git once per tracker (two git processes per call otherwise)."""
        if self._provenance_cache is None:
            self._provenance_cache = _provenance_tags()
        return self._provenance_cache

    def _search(self, exp_id: str, where: str) -> list[Any]:
        return self.store.call(self.store.client.search_runs, [exp_id], filter_string=where,
                               order_by=["attributes.start_time DESC"], max_results=SEARCH_PAGE)

    def _mark_stale(self, run_id: str) -> None:
        self.store.call(self.store.client.set_tag, run_id, "lth.stale", "true")
        self.store.call(self.store.client.set_terminated, run_id, "FAILED")

    @contextlib.contextmanager
    def _lifetime(self, run: MlflowRun, *, wait: bool) -> Iterator[MlflowRun]:
        """FINISHED when the block ends, FAILED (KILLED on Ctrl-C) when it raises; the exception propagates.

        A nested run's last metrics and its end are queued (the job goes on); a job (`wait`) waits for all its
        queued writes before it is marked ended, so a finished job is completely in the store. A failed write
        is raised when the block succeeded; when the block raised, its own exception goes on and the failed
        write is logged.
        """
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            try:
                self._end(run, status, wait=wait)
            except Exception as exc:
                if status == "FINISHED":
                    raise
                log.warning("MLflow write failed while ending run %s after an error: %s", run.run_id, exc)

    def _end(self, run: MlflowRun, status: str, *, wait: bool) -> None:
        """Flush and end `run` (a job first waits for every queued write); raise the first failed write."""
        error: Exception | None = None

        def attempt(fn: Any, *args: Any) -> None:
            nonlocal error
            try:
                fn(*args)
            except Exception as exc:
                error = error or exc

        attempt(run.flush)
        if wait:
            attempt(self.store.drain)
            self.store.call(self.store.client.set_terminated, run.run_id, "FAILED" if error else status)
        else:  # queued even after a failure (call_later queues first, then raises earlier failures)
            attempt(self.store.call_later, self.store.client.set_terminated, run.run_id, status)
        if error is not None:
            raise error

    @contextlib.contextmanager
    def job(self, experiment: str, run_name: str, *, params: Mapping[str, Any],
            tags: Mapping[str, str]) -> Iterator[Run]:
        """The job's parent run, reused when the same job ran before (so a resume adds no duplicate)."""
        exp_id = self.store.experiment_id(experiment)
        key = job_key(experiment, run_name, params, tags)
        found = [r for r in self._search(exp_id, f"tags.`{JOB_KEY_TAG}` = {_quote(key)} "
                                                  f"and attributes.run_name = {_quote(run_name)}")
                 if PARENT_TAG not in r.data.tags]
        all_tags = dict(tags) | self._provenance() | {JOB_KEY_TAG: key, "mlflow.runName": run_name}
        if found:
            info = found[0].info
            run_id = info.run_id
            self.store.call(self.store.client.update_run, run_id, status="RUNNING")
            # Nested runs still RUNNING under a reused parent belong to a killed try: mark them FAILED. This is
            # the only sweep (child() relies on it), so it pages through all of them.
            where = f"tags.`{PARENT_TAG}` = {_quote(run_id)} and attributes.status = 'RUNNING'"
            while stale := self._search(exp_id, where):  # marked runs drop out of the next search
                for old in stale:
                    self._mark_stale(old.info.run_id)
                if len(stale) < SEARCH_PAGE:
                    break
        else:
            info = self.store.call(self.store.client.create_run, exp_id, run_name=run_name,
                                   tags={k: str(v)[:MAX_TAG_LEN] for k, v in all_tags.items()}).info
        run = MlflowRun(self.store, info, tags=tags, fresh=not found, **self._run_options)
        outermost = self._jobs == 0  # tune and transfer run IMP jobs inside their own
        self._jobs += 1
        try:
            with self._lifetime(run, wait=True):
                run.log_params(params, tags=all_tags if found else None)
                if outermost:
                    self._link_project_run(run)
                yield run
        finally:
            self._jobs -= 1

    def _link_project_run(self, run: MlflowRun) -> None:
        """Under `mlflow run`, tag the project's run and the job's parent run with each other's id.

        The job keeps its own parent run in its own experiment (so a rerun finds it again, whatever launched
        it); the project run, in the experiment `mlflow run` chose, points to it. A MLFLOW_RUN_ID this store
        does not know (another tracking URI) is left alone.
        """
        project_run = os.environ.get(PROJECT_RUN_ENV)
        if not project_run or project_run == run.run_id:
            return
        try:
            self.store.call(self.store.client.set_tag, project_run, JOB_RUN_TAG, run.run_id)
        except MlflowException:
            return
        run.set_tags({PROJECT_RUN_TAG: project_run})

    @contextlib.contextmanager
    def child(self, parent: Run, run_name: str, *, params: Mapping[str, Any],
              tags: Mapping[str, str]) -> Iterator[Run]:
        """A nested run under `parent` (stale runs of a crashed try were marked FAILED when job() reused it)."""
        assert isinstance(parent, MlflowRun) and parent.run_id is not None
        # No search for stale runs of the same name here: a parent comes only from job(), which is either new
        # (no children yet) or reused, and then job() has already marked its still-RUNNING children FAILED.
        # That saves a store round trip per nested run (benchmarks/tracking_overhead).
        all_tags = parent.tags | dict(tags) | self._provenance() | {"mlflow.runName": run_name}
        info = self.store.call(self.store.client.create_run, parent.experiment_id, run_name=run_name,
                               tags={k: str(v)[:MAX_TAG_LEN] for k, v in all_tags.items()}
                               | {PARENT_TAG: parent.run_id}).info
        run = MlflowRun(self.store, info, tags=parent.tags, fresh=True, **self._run_options)
        run.log_params(params)
        with self._lifetime(run, wait=False):
            yield run

    def register_ticket(self, run: Run, ticket_dir: Path, meta: TicketMeta) -> None:
        """Upload the ticket directory under `ticket/` and make it a version of ticket-<source>-<arch>.

        Queued for the writer thread (the next round trains meanwhile); the ticket directory is complete and
        never changes once written. The job waits for it before it ends.
        """
        if not self.cfg.register:
            return
        assert isinstance(run, MlflowRun) and run.run_id is not None
        self.store.submit(self._register, run.run_id, run.artifact_uri, ticket_dir, meta)

    def ensure_registered(self, parent: Run, run_name: str, ticket_dir: Path, meta: TicketMeta, *,
                          params: Mapping[str, Any], tags: Mapping[str, str],
                          metrics: Mapping[str, float]) -> bool:
        """Register a ticket found on disk unless its alias already names this very ticket; True if it did.

        A try killed after a round's ticket was written but before it was registered leaves the ticket on disk
        and the registry without it; the resumed job skips that round, so it registers the ticket here, under a
        new nested run `run_name` (tagged lth.registered_on_resume). One lookup per ticket found on disk.
        """
        if not self.cfg.register:
            return False
        name = registered_model_name(meta.source, meta.arch)
        weights = meta.sha256.get(WEIGHTS, "")
        try:
            current = self.store.call(self.store.client.get_model_version_by_alias, name,
                                      ticket_alias(meta.round, meta.seed))
            registered = current.tags.get("weights_sha256")
            if registered is None:  # registered before versions carried the tag: read its ticket.json once
                registered = self._registered_weights(current)
                if registered == weights:
                    self.store.call(self.store.client.set_model_version_tag, name, current.version,
                                    "weights_sha256", weights)
            if registered == weights:
                return False
        except MlflowException as exc:  # no such model, or no such alias
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
        with self.child(parent, run_name, params=params, tags=dict(tags) | {"lth.registered_on_resume": "true"}) as run:
            run.log_metrics(metrics)
            self.register_ticket(run, ticket_dir, meta)
        return True

    def _registered_weights(self, version: Any) -> str | None:
        """The weights sha256 in a registered version's uploaded ticket.json (for versions without the tag)."""
        if not version.run_id:
            return None
        with tempfile.TemporaryDirectory(prefix="lth-ticket-") as tmp:
            try:
                got = self.store.call(self.store.client.download_artifacts, version.run_id,
                                      f"{TICKET_ARTIFACTS}/{META}", tmp)
                return json.loads(Path(got).read_text()).get("sha256", {}).get(WEIGHTS)
            except (MlflowException, OSError, ValueError):
                return None

    def _register(self, run_id: str, artifact_uri: str, ticket_dir: Path, meta: TicketMeta) -> None:
        client = self.store.client
        self.store.call(client.log_artifacts, run_id, str(ticket_dir), TICKET_ARTIFACTS)
        name = registered_model_name(meta.source, meta.arch)
        if name not in self._models:
            try:
                self.store.call(client.create_registered_model, name,
                                description=f"Lottery tickets found by IMP on {meta.source} ({meta.arch})")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # an earlier ticket (or another job) created it
                    raise
            self._models.add(name)
        version = self.store.call(client.create_model_version, name,
                                  source=f"{artifact_uri.rstrip('/')}/{TICKET_ARTIFACTS}",
                                  run_id=run_id, tags=version_tags(meta))
        # MlflowClient.set_registered_model_alias first loads the whole registered model (every version) to
        # check it is not a prompt, which ticket-* models never are: the registry client skips that read, the
        # costliest part of registering a ticket. The public call stays the fallback.
        registry = getattr(client, "_get_registry_client", None)
        set_alias = registry().set_registered_model_alias if registry else client.set_registered_model_alias
        self.store.call(set_alias, name, ticket_alias(meta.round, meta.seed), version.version)


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
            "data_version": meta.data_version, "code_version": meta.code_version,
            "weights_sha256": meta.sha256.get(WEIGHTS, "")}


def get_tracker(params: Params) -> Tracker:
    """The study's MLflow tracker (checks a tracking server is reachable before any training)."""
    return MlflowTracker(params.tracking)
