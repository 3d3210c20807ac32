"""One tracked fit-and-test step: the shape every training of the study shares.

An IMP round, a fine-tune and a tuning trial each open a nested run, fit with early stopping (every epoch
logged), test the best weights, log the end-of-training metrics and save their output inside the run (so a
kill leaves the run FAILED, never a second FINISHED one), then drop the fit's checkpoint. Only the output
and the names differ; they are the caller's.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from torch import nn
from tqdm.auto import tqdm

from lth.config import Params
from lth.data.loader import Normalizer
from lth.data.store import PreparedDataset
from lth.pruning import Mask
from lth.tickets import TicketMeta
from lth.tracking import Run, Tracker, dataset_inputs
from lth.training import EpochMetrics, FitResult, evaluate, fit

T = TypeVar("T")


def announce_resume(name: str) -> Callable[[int, int], None]:
    """fit()'s on_resume: one line on stderr, so a user sees a killed fit go on instead of starting over."""
    return lambda done, cap: tqdm.write(f"resuming {name} after epoch {done}/{cap}", file=sys.stderr)


def end_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's end-of-training metrics; best_* names keep them off the per-epoch val_* curves."""
    return {(f"best_{k}" if k in ("val_acc", "val_loss") else k): float(v) for k, v in metrics.items()}


@dataclass(frozen=True)
class Step:
    """What to train and where it is tracked: the run's name, params and tags, the fit's seed and options."""

    name: str
    params: Mapping[str, Any]
    tags: Mapping[str, str]
    seed: int
    mask: Mask | None = None
    checkpoint: Path | None = None  # a killed step resumes from it; removed once the output is saved
    keep_epochs: tuple[int, ...] = ()
    lr: float | None = None
    max_epochs: int | None = None
    test: bool = True  # tuning chooses on validation only and never looks at the test split
    extra: Mapping[str, float] = field(default_factory=dict)  # more end metrics (sparsity, fraction_pruned)
    train_fraction: float = 1.0  # the training split was reduced to this (its own dataset input)
    ticket: TicketMeta | None = None  # the ticket a fine-tune starts from: an input of its run


@dataclass(frozen=True)
class StepResult:
    """The fit and the step's end metrics (test_*, val_* of the best epoch, best_epoch, epochs, seconds, extra)."""

    fit: FitResult
    metrics: dict[str, float]


def run_step(tracker: Tracker, parent: Run, model: nn.Module, data: PreparedDataset, params: Params, step: Step,
             save: Callable[[Run, StepResult | None], T], on_epoch: Callable[[EpochMetrics], None] | None = None,
             stops: tuple[type[BaseException], ...] = ()) -> T:
    """Fit `model` on `data` as a nested run of `parent`, test it, log, and return what `save` wrote.

    `on_epoch` may raise one of `stops` to end the fit early (a pruned trial): the run still ends FINISHED,
    `save` gets None, and the exception is raised again once the run is closed.
    """
    norm = Normalizer(data.mean, data.std)
    t0 = time.perf_counter()
    stopped: BaseException | None = None
    with tracker.child(parent, step.name, params=step.params, tags=step.tags) as run:
        run.log_inputs(dataset_inputs(params.paths.data, data, train_fraction=step.train_fraction), ticket=step.ticket)

        def log_epoch(m: EpochMetrics) -> None:
            run.log_metrics(m.as_dict(), step=m.epoch)
            if on_epoch is not None:
                on_epoch(m)

        try:
            result = fit(model, data.train, data.val, norm, params.train, seed=step.seed, mask=step.mask,
                         keep_epochs=step.keep_epochs, on_epoch=log_epoch, desc=step.name,
                         checkpoint=step.checkpoint, lr=step.lr, max_epochs=step.max_epochs,
                         on_resume=announce_resume(step.name))
        except stops as exc:
            stopped = exc
            out = save(run, None)
        else:
            model.load_state_dict(result.best_state)
            metrics = _end_of_training(model, data, norm, params, step, result) | {"seconds": time.perf_counter() - t0}
            run.log_metrics(end_metrics(metrics))
            out = save(run, StepResult(result, metrics))
    if stopped is not None:
        raise stopped
    if step.checkpoint is not None:
        for p in (step.checkpoint, step.checkpoint.with_suffix(".json")):
            p.unlink(missing_ok=True)
    return out


def _end_of_training(model: nn.Module, data: PreparedDataset, norm: Normalizer, params: Params, step: Step,
                     result: FitResult) -> dict[str, float]:
    """Test (unless the step never looks at it) and the best epoch's validation metrics."""
    metrics: dict[str, float] = {}
    if step.test:
        test = evaluate(model, data.test, norm, params.train)
        metrics |= {"test_acc": test.acc, "test_loss": test.loss}
    best = result.best
    return metrics | {"val_acc": best.val_acc if best else float("nan"),
                      "val_loss": best.val_loss if best else float("nan"),
                      "best_epoch": result.best_epoch, "epochs": len(result.history), **step.extra}
