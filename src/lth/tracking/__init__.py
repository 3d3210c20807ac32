"""Tracking, the port: what jobs log to (`Tracker`, `Run`) and the tracker that records nothing.

This module imports no MLflow, so commands and workers that track nothing never load it. The MLflow
adapter behind the port is `lth.tracking.mlflow` (the one place that talks to MLflow, and where
`get_tracker` lives); the commands import it only when they track.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol, Sequence

from lth.tracking.inputs import DataInput, dataset_inputs

if TYPE_CHECKING:
    from lth.tickets import TicketMeta


__all__ = ["DataInput", "NullRun", "NullTracker", "Run", "Tracker", "dataset_inputs"]


class Run(Protocol):
    """A tracked run (a job's parent run or one nested run).

    `log_inputs`: the datasets it used and, for a fine-tune, the ticket it started from (the adapter links
    the ticket's registered version).
    """

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_inputs(self, datasets: Sequence[DataInput], ticket: TicketMeta | None = None) -> None: ...


class Tracker(Protocol):
    """Opens parent and nested runs and registers tickets."""

    def job(self, experiment: str, run_name: str, *, params: Mapping[str, Any],
            tags: Mapping[str, str]) -> contextlib.AbstractContextManager[Run]: ...
    def child(self, parent: Run, run_name: str, *, params: Mapping[str, Any],
              tags: Mapping[str, str]) -> contextlib.AbstractContextManager[Run]: ...
    def attach(self, run_id: str, tags: Mapping[str, str]) -> contextlib.AbstractContextManager[Run]: ...
    def register_ticket(self, run: Run, ticket_dir: Path, meta: TicketMeta) -> None: ...
    def ensure_registered(self, parent: Run, run_name: str, ticket_dir: Path, meta: TicketMeta, *,
                          params: Mapping[str, Any], tags: Mapping[str, str],
                          metrics: Mapping[str, float]) -> bool: ...
    def end_stale(self, parent: Run) -> int: ...


class NullRun:
    """A run that records nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_inputs(self, datasets: Sequence[DataInput], ticket: TicketMeta | None = None) -> None:
        pass


class NullTracker:
    """A tracker that records nothing (tests, dry runs)."""

    @contextlib.contextmanager
    def job(self, experiment: str, run_name: str, *, params: Mapping[str, Any],
            tags: Mapping[str, str]) -> Iterator[Run]:
        yield NullRun()

    @contextlib.contextmanager
    def child(self, parent: Run, run_name: str, *, params: Mapping[str, Any],
              tags: Mapping[str, str]) -> Iterator[Run]:
        yield NullRun()

    @contextlib.contextmanager
    def attach(self, run_id: str, tags: Mapping[str, str]) -> Iterator[Run]:
        yield NullRun()

    def register_ticket(self, run: Run, ticket_dir: Path, meta: TicketMeta) -> None:
        pass

    def ensure_registered(self, parent: Run, run_name: str, ticket_dir: Path, meta: TicketMeta, *,
                          params: Mapping[str, Any], tags: Mapping[str, str],
                          metrics: Mapping[str, float]) -> bool:
        return False

    def end_stale(self, parent: Run) -> int:
        return 0
