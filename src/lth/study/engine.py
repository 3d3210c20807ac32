"""Executors of the study plan: the local one, and what any remote one shares (the driver's policy, files as bytes).

A remote unit runs in a scratch project of its own: its inputs arrive as bytes (prepared splits, tickets),
it runs the same function the local executor runs, and it returns its outputs as bytes; the driver writes
them atomically into the project's paths. So a worker needs no shared filesystem and writes nothing into
the driver's tree, and the files are the ones a serial run writes.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from lth.config import Params
from lth.data.prepare import prepare_dataset
from lth.data.store import load_prepared, prepared_dir
from lth.fsutil import atomic_dir, atomic_write_bytes, atomic_write_text
from lth.study.files import Files, file_key, read_files, scratch_project
from lth.study.imp import imp_round, job_run as imp_job_run, load_job_data, round_inputs, run_imp
from lth.study.plan import TRAINING, Unit, build_plan, finetune_row_path, is_done, outputs
from lth.study.transfer import job_run as transfer_job_run, run_finetune, run_transfer, write_results_csv
from lth.tickets import ticket_dir
from lth.tracking import NullRun, NullTracker, Tracker


# ---------------------------------------------------------------- the local executor


def run_local(params: Params, tracker: Tracker, plan: list[Unit] | None = None) -> None:
    """Run the plan in this process, job by job, exactly as `dvc repro`'s stages do (the report excepted)."""
    plan = plan or build_plan(params)
    started: set[tuple[str, str, int, float]] = set()
    for unit in plan:
        if unit.kind == "prepare" and not is_done(unit, params):
            prepare_dataset(unit.dataset, params)
        elif unit.kind == "imp" and (unit.kind, unit.dataset, unit.seed, 1.0) not in started:
            started.add((unit.kind, unit.dataset, unit.seed, 1.0))
            run_imp(unit.job(params), params, tracker)  # every round of the job, in order
        elif unit.kind == "results":
            run_transfer(unit.dataset, params, tracker)  # its fine-tunes and size rounds, then the CSV


# ---------------------------------------------------------------- inputs and outputs of a unit


def unit_inputs(unit: Unit, params: Params) -> list[Path]:
    """What a training unit reads besides its prepared dataset: the rewind point and round r-1, or a ticket."""
    if unit.kind in ("imp", "size"):
        return round_inputs(unit.job(params), unit.round, params)
    ft = unit.finetune
    assert ft is not None
    return [] if ft.arm == "scratch" else [ticket_dir(params.paths.models, ft.source, ft.seed, ft.round)]


def write_outputs(unit: Unit, files: Files, params: Params) -> None:
    """Write a unit's returned files into the project, each output atomically and in order (ticket last)."""
    for out in outputs(unit, params):
        prefix = file_key(out, params)
        mine = {k: v for k, v in files.items() if k == prefix or k.startswith(prefix + "/")}
        if not mine:
            raise RuntimeError(f"unit {unit.key} returned no {prefix}")
        if prefix in mine:
            atomic_write_bytes(out, mine[prefix])
            continue
        with atomic_dir(out) as tmp:
            for key, content in mine.items():
                dest = tmp / key[len(prefix) + 1:]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(content)


@dataclass(frozen=True)
class UnitResult:
    """What a worker returns: the unit's output files and where and when it ran."""

    files: Files
    host: str
    gpu: str
    start: float
    end: float
    worker: str = ""  # host:pid of the process that ran it (one row of the report's timeline)


def run_unit(unit: Unit, params: Params, inputs: Files, tracker: Tracker | None = None,
             parent: tuple[str, Mapping[str, str]] | None = None, gpu: str = "") -> UnitResult:
    """Run one training unit in a scratch project built from `inputs`; return its outputs as bytes.

    `parent`: the id and tags of the job's run the driver opened; the unit's run is nested under it.
    """
    start = time.time()
    tracker = tracker or NullTracker()
    with scratch_project(params, inputs) as scratch:
        with tracker.attach(*parent) if parent else contextlib.nullcontext(NullRun()) as run:
            if unit.kind in ("imp", "size"):
                job = unit.job(scratch)
                imp_round(job, unit.round, load_job_data(job, scratch), scratch, tracker, run)
            else:
                ft = unit.finetune
                assert ft is not None and unit.kind == "finetune"
                run_finetune(ft, load_prepared(scratch.paths.data, ft.target), scratch, tracker, run,
                             save_to=finetune_row_path(ft, scratch))
        files: Files = {}
        for out in outputs(unit, scratch):
            files |= read_files(out, scratch)
        host = socket.gethostname()
        return UnitResult(files, host, gpu, start, time.time(), worker=f"{host}:{os.getpid()}")


def parent_run(unit: Unit, params: Params) -> tuple[str, str, dict, dict[str, str]]:
    """Experiment, name, params and tags of the job run a training unit nests under (as in a serial run)."""
    if unit.kind == "finetune":
        return transfer_job_run(unit.dataset, params)
    return imp_job_run(unit.job(params), params)


def dataset_files(name: str, params: Params) -> Files:
    """A prepared dataset's files (splits, labels, meta.json), to send to a worker."""
    return read_files(prepared_dir(params.paths.data, name), params)


# ---------------------------------------------------------------- the driver's policy


@dataclass
class Record:
    """What the driver knows of one unit: its state, attempts, and where and when it ran last."""

    key: str
    kind: str
    state: str = "waiting"  # waiting | running | done | failed | skipped (done before this run)
    attempts: int = 0
    host: str = ""
    gpu: str = ""
    worker: str = ""
    start: float = 0.0
    end: float = 0.0
    error: str = ""


@dataclass
class Scheduler:
    """The driver's policy, free of Ray (the benchmark's simulation runs it too).

    Ray has no task priorities and starts tasks roughly in submission order, so IMP rounds (the critical
    path: each chain is one round after another) are submitted the moment they are ready, and fine-tunes
    only into the slots the running rounds leave free (`finetune_slots` is what the cluster holds, a round
    taking `chain_weight` of them), so no fine-tune queues in front of the next IMP round.
    Needs are counted, not rescanned, so a plan of ~12,000 units costs the driver milliseconds.
    """

    plan: list[Unit]
    finetune_slots: int
    max_retries: int
    chain_weight: float = 1.0  # fine-tune slots one IMP round takes (its GPUs, or CPUs, over a fine-tune's)
    records: dict[str, Record] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.records = self.records or {u.key: Record(u.key, u.kind) for u in self.plan}
        self._order = {u.key: i for i, u in enumerate(self.plan)}
        self._by_key = {u.key: u for u in self.plan}
        self._dependents: dict[str, list[str]] = {u.key: [] for u in self.plan}
        self._blocked: dict[str, int] = {}
        for u in self.plan:
            needs = [n for n in u.needs if n in self._by_key]  # a need outside the plan is an input already there
            self._blocked[u.key] = len(needs)
            for n in needs:
                self._dependents[n].append(u.key)
        self._ready: dict[bool, list[tuple[int, str]]] = {True: [], False: []}  # fine-tune or not -> heap
        for key, count in self._blocked.items():
            if count == 0:
                self._push(key)
        self._running: Counter = Counter()

    def _push(self, key: str, first: bool = False) -> None:
        heapq.heappush(self._ready[self._by_key[key].kind == "finetune"], (-1 if first else self._order[key], key))

    def mark_done_before(self, keys: set[str]) -> None:
        """Units whose outputs already exist (a resumed run): never run again."""
        for key in keys:
            self.records[key].state = "skipped"
        for heap in self._ready.values():
            heap[:] = [item for item in heap if item[1] not in keys]
            heapq.heapify(heap)
        for key in keys:
            self._release(key)

    def _release(self, key: str) -> None:
        for dep in self._dependents[key]:
            self._blocked[dep] -= 1
            if self._blocked[dep] == 0 and self.records[dep].state == "waiting":
                self._push(dep)

    def running(self, kind: str | None = None) -> int:
        """How many units (of `kind`) are in flight."""
        return sum(self._running.values()) if kind is None else self._running[kind]

    def next_units(self) -> list[Unit]:
        """Units to start now: every ready IMP round (and driver unit), then fine-tunes into the free slots."""
        chosen = [self._by_key[heapq.heappop(self._ready[False])[1]] for _ in range(len(self._ready[False]))]
        in_chains = self._running["imp"] + self._running["size"] + sum(u.kind in ("imp", "size") for u in chosen)
        slots = self.finetune_slots - self._running["finetune"] - math.ceil(in_chains * self.chain_weight - 1e-9)
        chosen += [self._by_key[heapq.heappop(self._ready[True])[1]] for _ in range(min(slots, len(self._ready[True])))]
        for unit in chosen:
            rec = self.records[unit.key]
            rec.state, rec.attempts = "running", rec.attempts + 1
            self._running[unit.kind] += 1
        return chosen

    def succeeded(self, key: str, host: str = "", gpu: str = "", start: float = 0.0, end: float = 0.0,
                  worker: str = "") -> None:
        """A unit finished and its outputs are written."""
        rec = self.records[key]
        rec.state, rec.host, rec.gpu, rec.worker, rec.start, rec.end = "done", host, gpu, worker, start, end
        self._running[rec.kind] -= 1
        self._release(key)

    def errored(self, key: str, error: str) -> bool:
        """A unit's attempt failed; returns whether it is to be run again (else it counts as failed)."""
        rec = self.records[key]
        rec.error = error
        self._running[rec.kind] -= 1
        if rec.attempts <= self.max_retries:
            rec.state = "waiting"
            self._push(key, first=True)  # ahead of the others: it was due already
            return True
        rec.state = "failed"
        return False

    def counts(self) -> Counter:
        """Units per state."""
        return Counter(r.state for r in self.records.values())

    def finished_all(self) -> bool:
        """Nothing in flight and nothing can start (done, failed, or needing a failed unit)."""
        return self.running() == 0 and not self._ready[False] and not self._ready[True]


def progress_line(sched: Scheduler, started: float, now: float | None = None) -> str:
    """done/running/failed/total and an ETA from the training units' pace so far."""
    counts = sched.counts()
    total = len(sched.records)
    done = counts["done"] + counts["skipped"]
    ran = [r for r in sched.records.values() if r.state == "done" and r.kind in TRAINING]
    left = sum(r.state in ("waiting", "running") and r.kind in TRAINING for r in sched.records.values())
    now = time.time() if now is None else now
    eta = "?"
    if ran and left:
        eta = f"{(now - started) / len(ran) * left:.0f}s"
    elif not left:
        eta = "0s"
    return (f"study: {done}/{total} done, {counts['running']} running, {counts['failed']} failed, "
            f"ETA {eta}")


RECORD_FIELDS = ("key", "kind", "state", "attempts", "host", "gpu", "worker", "start", "end", "error")


def write_record(sched: Scheduler, params: Params) -> Path:
    """results/study/units.csv: one row per unit (host, GPU, worker, start, end, attempts), for a timeline figure."""
    path = params.paths.units_csv
    lines = [",".join(RECORD_FIELDS)]
    for rec in sched.records.values():
        values = [getattr(rec, f) for f in RECORD_FIELDS]
        lines.append(",".join(json.dumps(v) if isinstance(v, str) and ("," in v or '"' in v or "\n" in v)
                              else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in values))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def finish_results(unit: Unit, params: Params) -> None:
    """A target's results unit: the CSV from its finished fine-tunes and size rounds."""
    write_results_csv(unit.dataset, params, params.transfer.arms)


def show(line: str, final: bool = False) -> None:
    """The driver's progress line on stderr: rewritten in place on a terminal, one line per change otherwise."""
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line.ljust(79) + ("\n" if final else ""))
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
