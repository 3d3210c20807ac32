"""The MLflow tracker: parent and nested runs, their lifetime, the stale-run sweep, ticket registration.

Every call names its run id explicitly (MlflowClient, no fluent active-run state), so several trackers
and processes can log to one store at once; nesting is the `mlflow.parentRunId` tag.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlflow.exceptions import MlflowException

from lth.config import Params, TrackingConfig
from lth.provenance import git_branch, git_commit
from lth.tickets import TicketMeta
from lth.tracking import Run
from lth.tracking.mlflow.registry import TicketRegistry
from lth.tracking.mlflow.runs import MAX_TAG_LEN, MlflowRun
from lth.tracking.mlflow.store import Store

log = logging.getLogger(__name__)
# MLflow's system metrics announce starting, stopping and "no GPU" at INFO on stderr; lth's stderr is for its own.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
PARENT_TAG = "mlflow.parentRunId"
JOB_KEY_TAG = "lth.job_key"
PROJECT_RUN_ENV = "MLFLOW_RUN_ID"  # set by `mlflow run` for the command it launches
PROJECT_RUN_TAG = "lth.project_run_id"  # on a job's parent run: the `mlflow run` run that launched it
JOB_RUN_TAG = "lth.job_run_id"  # on that project run: the job's parent run
SEARCH_PAGE = 100


def job_key(experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """Identity of a job: same experiment, name, params and tags -> same parent run on a rerun."""
    blob = json.dumps([experiment, run_name, {k: str(v) for k, v in params.items()}, dict(tags)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError(f"run names and keys may not contain quotes: {value!r}")
    return f"'{value}'"


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process as a user typed it, e.g. `lth imp fashion-mnist --seed 0`."""
    argv = sys.argv if argv is None else argv
    prog = Path(argv[0]).name if argv else "python"
    if prog == "__main__.py" and Path(argv[0]).parent.name == "lth":  # python -m lth
        prog = "lth"
    return shlex.join([prog, *argv[1:]])


def _provenance_tags() -> dict[str, str]:
    """Code provenance as MLflow's fluent API records it (its UI's Source column), plus lth's own commit tag."""
    # PROJECT when `mlflow run` launched the command (its UI then links the project run), LOCAL otherwise.
    tags = {"mlflow.source.name": command_line(),
            "mlflow.source.type": "PROJECT" if os.environ.get(PROJECT_RUN_ENV) else "LOCAL"}
    if branch := git_branch():
        tags["mlflow.source.git.branch"] = branch
    if commit := git_commit():
        tags |= {"lth.git_commit": commit, "mlflow.source.git.commit": commit.split("+")[0]}
    return tags


class MlflowTracker:
    """Tracker that logs parent and nested runs to MLflow and registers tickets."""

    def __init__(self, cfg: TrackingConfig, *, flush_every: int = 500, flush_seconds: float = 10.0) -> None:
        self.cfg = cfg
        self.store = Store(cfg)
        self._run_options: dict[str, Any] = {"flush_every": flush_every, "flush_seconds": flush_seconds}
        self.registry = TicketRegistry(self.store)
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

    def _create_run(self, exp_id: str, run_name: str, tags: Mapping[str, Any]) -> Any:
        """A new run's info; made once even when the server's answer is lost and the create is sent again."""
        start = int(time.time() * 1000)  # sent with the create: the run a lost try made has this very start time
        where = f"attributes.run_name = {_quote(run_name)} and attributes.start_time = {start}"
        if PARENT_TAG in tags:
            where += f" and tags.`{PARENT_TAG}` = {_quote(tags[PARENT_TAG])}"

        def made() -> Any:
            runs = self.store.client.search_runs([exp_id], filter_string=where, max_results=1)
            return runs[0] if runs else None

        return self.store.create(self.store.client.create_run, made, exp_id, run_name=run_name, start_time=start,
                                 tags={k: str(v)[:MAX_TAG_LEN] for k, v in tags.items()}).info

    def _mark_stale(self, run_id: str) -> None:
        self.store.call(self.store.client.set_tag, run_id, "lth.stale", "true")
        self.store.call(self.store.client.set_terminated, run_id, "FAILED")

    def _end_stale(self, exp_id: str, run_id: str) -> int:
        """Mark every nested run still RUNNING under `run_id` FAILED (tag lth.stale), paging through all of them."""
        where = f"tags.`{PARENT_TAG}` = {_quote(run_id)} and attributes.status = 'RUNNING'"
        count = 0
        while stale := self._search(exp_id, where):  # marked runs drop out of the next search
            for old in stale:
                self._mark_stale(old.info.run_id)
            count += len(stale)
            if len(stale) < SEARCH_PAGE:
                break
        return count

    def end_stale(self, parent: Run) -> int:
        """A cluster's driver, once none of a job's units is in flight: the runs of attempts whose worker died."""
        assert isinstance(parent, MlflowRun) and parent.run_id is not None
        self.store.drain()
        return self._end_stale(parent.experiment_id, parent.run_id)

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
            # the only sweep of a serial run (child() relies on it).
            self._end_stale(exp_id, run_id)
        else:
            info = self._create_run(exp_id, run_name, all_tags)
        run = MlflowRun(self.store, info, tags=tags, fresh=not found, **self._run_options)
        outermost = self._jobs == 0  # tune and transfer run IMP jobs inside their own
        self._jobs += 1
        try:
            with self._lifetime(run, wait=True), self._system_metrics(run, outermost):
                run.log_params(params, tags=all_tags if found else None)
                if outermost:
                    self._link_project_run(run)
                yield run
        finally:
            self._jobs -= 1

    @contextlib.contextmanager
    def _system_metrics(self, run: MlflowRun, outermost: bool) -> Iterator[None]:
        """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on the outermost job's run.

        A thread samples every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides) and logs through its
        own client; it stops before the run ends. Jobs nested in another (tune's IMP) share the outer one's.
        """
        if not (self.cfg.system_metrics and outermost):
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # loads psutil

        monitor = SystemMetricsMonitor(run.run_id, resume_logging=not run.fresh, tracking_uri=self.store.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

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
        info = self._create_run(parent.experiment_id, run_name, all_tags | {PARENT_TAG: parent.run_id})
        run = MlflowRun(self.store, info, tags=parent.tags, fresh=True, **self._run_options)
        run.log_params(params)
        with self._lifetime(run, wait=False):
            yield run

    @contextlib.contextmanager
    def attach(self, run_id: str, tags: Mapping[str, str]) -> Iterator[Run]:
        """A job's parent run that another process opened (a cluster's driver), to nest this process's runs under.

        Leaves only once this process's queued writes are stored, so a worker returns its unit when its runs,
        metrics and registered tickets are on the server (and its scratch ticket files may go).
        """
        info = self.store.call(self.store.client.get_run, run_id).info
        try:
            yield MlflowRun(self.store, info, tags=tags, **self._run_options)
        finally:
            self.store.drain()

    def register_ticket(self, run: Run, ticket_dir: Path, meta: TicketMeta) -> None:
        """Upload the ticket directory under `ticket/` and make it a version of ticket-<source>-<arch>.

        Queued for the writer thread (the next round trains meanwhile); the ticket directory is complete and
        never changes once written. The job waits for it before it ends.
        """
        if not self.cfg.register:
            return
        assert isinstance(run, MlflowRun) and run.run_id is not None
        self.store.submit(self.registry.register, run.run_id, run.artifact_uri, ticket_dir, meta)

    def ensure_registered(self, parent: Run, run_name: str, ticket_dir: Path, meta: TicketMeta, *,
                          params: Mapping[str, Any], tags: Mapping[str, str],
                          metrics: Mapping[str, float]) -> bool:
        """Register a ticket found on disk unless its alias already names this very ticket; True if it did.

        A try killed after a round's ticket was written but before it was registered leaves the ticket on disk
        and the registry without it; the resumed job skips that round, so it registers the ticket here, under a
        new nested run `run_name` (tagged lth.registered_on_resume). One lookup per ticket found on disk.
        """
        if not self.cfg.register or self.registry.holds(meta):
            return False
        with self.child(parent, run_name, params=params, tags=dict(tags) | {"lth.registered_on_resume": "true"}) as run:
            run.log_metrics(metrics)
            self.register_ticket(run, ticket_dir, meta)
        return True


def get_tracker(params: Params) -> MlflowTracker:
    """The study's MLflow tracker (checks a tracking server is reachable before any training)."""
    return MlflowTracker(params.tracking)

