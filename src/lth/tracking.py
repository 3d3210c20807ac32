"""The one place that talks to MLflow. Jobs see only `Tracker` and `Run`.

(The MLflow implementation lands with the MLOps issue; `NullTracker` records nothing.)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

from lth.config import Params
from lth.tickets import TicketMeta


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


def get_tracker(params: "Params") -> Tracker:
    """The tracker for a study (MLflow once the MLOps issue lands)."""
    return NullTracker()
