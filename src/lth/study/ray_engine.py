"""The Ray executor, the one module that imports ray: every training unit of the plan is a Ray task.

The driver (this process) prepares data and writes every file; workers get their inputs as values
(prepared splits and tickets through Ray's object store) and return their outputs as bytes. IMP rounds
are submitted the moment they are ready and fine-tunes are capped (engine.Scheduler), so the IMP chains,
the critical path, never queue behind fine-tunes; a fine-tune of round r starts once round r's ticket is
written. Retries are the driver's (a dead worker's unit is submitted again), so each attempt is counted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from lth.config import EngineConfig, Params
from lth.errors import UserError
from lth.study.engine import (
    Scheduler, UnitResult, dataset_files, finish_results, parent_run, progress_line, run_unit, show, unit_inputs,
    write_outputs, write_record,
)
from lth.study.files import Files, read_files
from lth.study.plan import TRAINING, Unit, build_plan, is_done
from lth.tracking import NullTracker, Tracker
from lth.training import cap_gpu_memory

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
INSTALL = "pip install 'ray==2.60.0' (the version requirements.lock pins)"
T = TypeVar("T")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(f"engine.kind ray: ray is not installed; {INSTALL}") from None
    return ray


def is_local(address: str | None) -> bool:
    """Whether a cluster address is this host's loopback (None: a Ray the driver starts itself)."""
    if address is None:
        return True
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(address: str | None) -> Any:
    """Join the cluster at `address` (or $RAY_ADDRESS, as in a KubeRay RayJob), else start a local Ray; returns ray."""
    ray = _import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    check_address(address)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled" if is_local(address) else "token")
    with _native_stderr() as said:  # Ray's C++ core logs each refused try there (every second for 20 s)
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False if not address else None,
                     logging_level="ERROR")
        except ConnectionError as exc:  # the head answered (check_address) but did not let this driver in
            if not address:
                raise
            why = "its token is not this driver's" if "InvalidAuthToken" in said() else str(exc)
            raise UserError(f"--address {address}: the Ray cluster refused this driver ({why}); a cluster "
                            "started with RAY_AUTH_MODE=token takes only its own token: set RAY_AUTH_MODE=token "
                            "and RAY_AUTH_TOKEN_PATH to the token file its `ray start` used") from None
    return ray


def check_address(address: str | None) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when the head is not there or not ours to drive."""
    if address is None or address == "auto":  # "auto": the cluster this host belongs to (ray start ran here)
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"engine.address / --address {address!r}: expected host:port of `ray start --head`")
    if not is_local(address):
        token = os.environ.get("RAY_AUTH_TOKEN") or _token_file()
        if os.environ.get("RAY_AUTH_MODE") != "token" or not token:
            raise UserError(f"--address {address}: a cluster beyond this host runs any code its clients send; "
                            "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (a file only you can read) "
                            "as on its `ray start`")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as exc:
        raise UserError(f"--address {address}: no Ray head answers there ({exc.strerror or exc}); "
                        "start one with `ray start --head --port PORT` or fix engine.address") from None


@contextlib.contextmanager
def _native_stderr() -> Iterator[Callable[[], str]]:
    """Hold what native code writes to file descriptor 2 meanwhile; yields a reader; replays it on success."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)

        def said() -> str:
            held.seek(0)
            return held.read().decode(errors="replace")

        try:
            yield said
        except BaseException:
            os.dup2(saved, 2)
            raise
        else:
            os.dup2(saved, 2)
            sys.stderr.write(said())  # nothing is lost when the connection worked
        finally:
            os.close(saved)


def _token_file() -> bool:
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.is_file() and path.stat().st_size > 0


def _demand(kind: str, engine: EngineConfig) -> tuple[float, float]:
    """(CPUs, GPUs) a training unit of `kind` asks for."""
    if kind == "finetune":
        return engine.finetune_cpus, engine.finetune_gpus
    return engine.imp_cpus, engine.imp_gpus


def check_fits(nodes: list[dict], engine: EngineConfig, kinds: set[str]) -> None:
    """A unit no node can hold would wait forever in Ray's queue: say so before any training."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    for kind in sorted(kinds):
        cpus, gpus = _demand(kind, engine)
        if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in alive):
            prefix = "finetune" if kind == "finetune" else "imp"
            biggest = max(((r.get("CPU", 0), r.get("GPU", 0)) for r in alive), default=(0, 0))
            raise UserError(f"engine.{prefix}_cpus={cpus:g} / engine.{prefix}_gpus={gpus:g}: no node of the "
                            f"cluster has that much (largest: {biggest[0]:g} CPUs, {biggest[1]:g} GPUs); "
                            "lower them or add a bigger node")


_TRACKERS: dict[str, Tracker] = {}  # a worker process's trackers, by URI (one client and writer thread each)


def _task(unit: Unit, params: Params, tracking: tuple[str, Callable[[], Tracker]] | None,
          parent: tuple[str, dict[str, str]] | None, data: Files, extra: Files, *tickets: Files) -> UnitResult:
    """A worker's side: run the unit in its own scratch project, nested under the driver's run; return its files."""
    import ray

    gpu = ",".join(str(i) for i in ray.get_gpu_ids())
    cap_gpu_memory(_demand(unit.kind, params.engine)[1])  # a fractional GPU: this process keeps to its share
    inputs = {**data, **extra}
    for ticket in tickets:
        inputs |= ticket
    tracker = None
    if tracking is not None and parent is not None:
        uri, make = tracking
        tracker = _TRACKERS.get(uri) or _TRACKERS.setdefault(uri, make())
    return run_unit(unit, params, inputs, tracker, parent, gpu=gpu)


def is_shared_store(uri: str) -> bool:
    """Whether workers on other hosts can write to a tracking URI (a server or a database, not a local file)."""
    return "://" in uri and not uri.startswith(("sqlite:", "file:"))


def tracking_store(uri: str) -> dict[str, str]:
    """check_shared's entry for the MLflow tracking URI that workers log to."""
    return {uri: f"tracking URI {uri} is a file on this host, which the cluster's other nodes cannot write: start "
                 "`mlflow server` (README: Run the study on a cluster) and set MLFLOW_TRACKING_URI=http://HOST:PORT "
                 "or tracking.uri"}


def check_shared(nodes: list[dict], stores: Mapping[str, str]) -> None:
    """On a cluster of more than one alive node, no store that workers write (URI -> what to do) may be a local file."""
    if sum(bool(n.get("Alive")) for n in nodes) > 1:
        for uri, fix in stores.items():
            if not is_shared_store(uri):
                raise UserError(fix)


class RayDriver:
    """Runs the plan's training units as Ray tasks; the rest (prepare, results) here, in plan order."""

    def __init__(self, params: Params, prepare: Callable[[Unit, Params], None], tracker: Tracker | None = None,
                 tracking: tuple[str, Callable[[], Tracker]] | None = None) -> None:
        """`tracker` opens the jobs' parent runs here; `tracking` (URI, factory) builds a worker's tracker."""
        self.params = params
        self.tracker = tracker or NullTracker()
        self.tracking = tracking
        self._jobs = contextlib.ExitStack()
        self._parents: dict[tuple[str, str], tuple[str, dict[str, str]] | None] = {}
        self.engine = params.engine
        self.prepare = prepare
        self.ray = _import_ray()
        self._data: dict[str, Any] = {}  # dataset -> object ref of its files (sent once)
        self._tickets: dict[Path, Any] = {}  # ticket dir -> object ref (sent once, shared by its fine-tunes)
        # Retries are ours (Scheduler.errored), so each attempt is counted in the record. CPU tasks reuse their
        # worker process (max_calls=0); GPU tasks keep Ray's one process per task, since PyTorch's allocator
        # would hold a finished task's GPU memory (ray#29606; a process start is ~1 s against minutes of training).
        self._remote = {False: self.ray.remote(max_retries=0, max_calls=0)(_task),
                        True: self.ray.remote(max_retries=0)(_task)}

    def connect(self, address: str | None) -> None:
        """Join the cluster at `address` (see connect())."""
        connect(address)

    def _submit(self, unit: Unit) -> Any:
        if unit.dataset not in self._data:
            self._data[unit.dataset] = self.ray.put(dataset_files(unit.dataset, self.params))
        extra: Files = {}
        tickets = []
        for path in unit_inputs(unit, self.params):
            if path.is_dir():  # a ticket: sent once to the object store, shared by every unit that reads it
                if path not in self._tickets:
                    self._tickets[path] = self.ray.put(read_files(path, self.params))
                tickets.append(self._tickets[path])
            else:
                extra |= read_files(path, self.params)
        cpus, gpus = _demand(unit.kind, self.engine)
        return self._remote[gpus > 0].options(num_cpus=cpus, num_gpus=gpus, name=f"lth {unit.key}").remote(
            unit, self.params, self.tracking, self._parent(unit), self._data[unit.dataset], extra, *tickets)

    def _parent(self, unit: Unit) -> tuple[str, dict[str, str]] | None:
        """The run (id, tags) of the unit's job, opened here on first use and ended when the study ends."""
        experiment, name, job_params, tags = parent_run(unit, self.params)
        if (experiment, name) not in self._parents:
            run = self._jobs.enter_context(self.tracker.job(experiment, name, params=job_params, tags=tags))
            self._jobs.callback(self.tracker.end_stale, run)  # runs before the job's run ends (stack order)
            self._parents[experiment, name] = (run.run_id, tags) if run.run_id else None
        return self._parents[experiment, name]

    def _release(self, unit: Unit) -> None:
        for path in unit_inputs(unit, self.params):
            self._uses[path] -= 1
            if self._uses[path] <= 0:
                self._tickets.pop(path, None)

    def slots(self) -> int:
        """Fine-tunes the cluster holds at once (the cap on those queued)."""
        if self.engine.finetunes_in_flight:
            return self.engine.finetunes_in_flight
        res = self.ray.cluster_resources()
        cpus, gpus = _demand("finetune", self.engine)
        by_cpu = int(res.get("CPU", 1) // cpus)
        return max(1, min(by_cpu, int(res.get("GPU", 0) // gpus)) if gpus else by_cpu)

    def run(self, plan: list[Unit] | None = None) -> Scheduler:
        """Run every unit not done yet; returns the scheduler's records (failed units included)."""
        plan = plan or build_plan(self.params)
        plan = [u for u in plan if u.kind != "report"]  # the CLI builds the report (study does not import report)
        nodes = self.ray.nodes()
        check_fits(nodes, self.engine, {u.kind for u in plan if u.kind in TRAINING})
        if self.tracking:
            check_shared(nodes, tracking_store(self.tracking[0]))
        with self._jobs:
            return self._run(plan)

    def _run(self, plan: list[Unit]) -> Scheduler:
        e = self.engine
        weight = e.imp_gpus / e.finetune_gpus if e.finetune_gpus else e.imp_cpus / e.finetune_cpus
        sched = Scheduler(plan, self.slots(), e.max_retries, chain_weight=weight)
        sched.mark_done_before({u.key for u in plan if is_done(u, self.params)})
        # How many units still read each ticket: its object-store copy is dropped after the last one.
        self._uses = Counter(p for u in plan if u.kind in TRAINING and sched.records[u.key].state == "waiting"
                             for p in unit_inputs(u, self.params))
        started, last_record = time.time(), 0.0
        inflight: dict[Any, Unit] = {}
        while True:
            for unit in sched.next_units():
                if unit.kind in TRAINING:
                    inflight[self._submit(unit)] = unit
                    continue
                (self.prepare if unit.kind == "prepare" else finish_results)(unit, self.params)
                sched.succeeded(unit.key, start=time.time(), end=time.time())
            if not inflight:
                if sched.finished_all():
                    break
                continue
            ready, _ = self.ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                unit = inflight.pop(ref)
                try:
                    result: UnitResult = self.ray.get(ref)
                except (self.ray.exceptions.RayError, OSError) as exc:
                    sched.errored(unit.key, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                else:
                    write_outputs(unit, result.files, self.params)
                    self._release(unit)
                    sched.succeeded(unit.key, result.host, result.gpu, result.start, result.end, result.worker)
                show(progress_line(sched, started))
            if time.time() - last_record > 5:
                write_record(sched, self.params)
                last_record = time.time()
        write_record(sched, self.params)
        show(progress_line(sched, started), final=True)
        return sched

    def shutdown(self) -> None:
        """Leave the cluster (a Ray this driver started stops with it)."""
        self.ray.shutdown()


def _call(fn: Callable[..., T], index: int, args: tuple[Any, ...], gpu_share: float) -> T:
    cap_gpu_memory(gpu_share)  # a fractional GPU: this process keeps to its share, as a study unit does
    return fn(index, *args)


class RayWorkers:
    """N copies of one function as Ray tasks, for work that shares out its own pieces (an Optuna study's trials)."""

    def __init__(self, engine: EngineConfig, address: str | None) -> None:
        self.engine = engine
        self.ray = connect(address)

    def check(self, stores: Mapping[str, str]) -> None:
        """Before any work: a worker no node can hold; a store workers write (URI -> fix) that is a local file."""
        nodes = self.ray.nodes()
        check_fits(nodes, self.engine, {"finetune"})
        check_shared(nodes, stores)

    def run(self, fn: Callable[..., T], n: int, args: tuple[Any, ...], name: str,
            progress: Callable[[], str] | None = None) -> list[T]:
        """fn(i, *args) for i in 0..n-1, each a Ray task with a fine-tune's resources; their results in order.

        A task whose worker dies is run again (engine.max_retries); `progress()` is shown whenever it changes.
        """
        cpus, gpus = _demand("finetune", self.engine)
        remote = self.ray.remote(max_retries=self.engine.max_retries)(_call)
        shared = self.ray.put(args)  # one copy in the object store for every task
        refs = [remote.options(num_cpus=cpus, num_gpus=gpus, name=f"{name} w{i}").remote(fn, i, shared, gpus)
                for i in range(n)]
        shown, pending = "", list(refs)
        try:
            while pending:
                ready, pending = self.ray.wait(pending, num_returns=len(pending), timeout=1.0)
                self.ray.get(ready)  # a worker's error now, not once the others are done
                if progress is not None and (line := progress()) != shown:
                    show(line)
                    shown = line
            if progress is not None:
                show(progress(), final=True)
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as exc:
            for ref in refs:  # one failed: the others would only work on for nobody
                self.ray.cancel(ref, force=True)
            if isinstance(exc.cause, UserError):
                raise exc.cause from None
            raise

    def shutdown(self) -> None:
        """Leave the cluster (a Ray this driver started stops with it)."""
        self.ray.shutdown()
