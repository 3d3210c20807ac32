"""fit(): SGD with Nesterov momentum, random crops, early stopping on validation loss, masks enforced.

Pure core: returns weights and per-epoch metrics; the caller decides what to log and save. An optional
checkpoint file makes a killed fit resume at the last finished epoch with identical results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from torch import nn
from tqdm.auto import tqdm

from lth.config import TrainConfig
from lth.data.loader import Normalizer
from lth.data.store import Split
from lth.pruning import Mask
from lth.training.checkpoint import Checkpoint
from lth.training.epoch import State
from lth.training.metrics import EpochMetrics
from lth.training.schedule import LrSchedule
from lth.training.state import FitState, start, step


@dataclass
class FitResult:
    """Best-validation weights, the epoch they come from, the history and any kept early checkpoints."""

    best_state: State
    best_epoch: int
    history: list[EpochMetrics]
    kept: dict[int, State] = field(default_factory=dict)
    stopped_early: bool = False
    resumed_from: int = 0  # epochs a checkpoint had already finished (0: this fit started from scratch)
    epochs_trained: int = 0  # epochs trained by this call (the history also holds the resumed ones)

    @property
    def best(self) -> EpochMetrics | None:
        """Metrics of the best epoch (None when the best weights are the initial ones)."""
        return next((m for m in self.history if m.epoch == self.best_epoch), None)


def _announce(state: FitState, cap: int, on_resume: Callable[[int, int], None] | None,
              on_epoch: Callable[[EpochMetrics], None] | None) -> None:
    """Tell the caller a checkpoint was resumed, and replay its epochs: the killed try may not have logged
    its last ones, and the caller's run gets the whole curve."""
    if on_resume is not None:
        on_resume(state.epoch, cap)
    if on_epoch is not None:
        for m in state.history:
            on_epoch(m)


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    norm: Normalizer,
    cfg: TrainConfig,
    *,
    seed: int,
    mask: Mask | None = None,
    keep_epochs: Iterable[int] = (),
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    desc: str = "fit",
    checkpoint: Path | None = None,
    max_epochs: int | None = None,
    lr: float | None = None,
    on_resume: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Train until the validation loss has not improved for `cfg.patience` epochs (or the epoch cap).

    `keep_epochs`: also return the weights after those many epochs (0 = the initial weights), the
    late-resetting rewind points. Pruned weights (mask False) stay exactly zero throughout. `lr` replaces
    `cfg.lr` as the schedule's base rate. `on_resume(done, cap)`: called when a checkpoint is resumed.
    """
    cap = max_epochs if max_epochs is not None else cfg.max_epochs
    keep = tuple(sorted(set(int(e) for e in keep_epochs)))
    if keep and keep[-1] > cap:
        raise ValueError(f"cannot keep epoch {keep[-1]} of a run capped at {cap} epochs")
    schedule = LrSchedule.from_config(cfg, lr if lr is not None else cfg.lr, cap)
    state = start(model, cfg, mask=mask, lr=schedule.base, keep=keep)
    ckpt = Checkpoint(checkpoint, schedule.settings()) if checkpoint is not None else None
    if ckpt is not None and ckpt.restore(state):
        _announce(state, cap, on_resume, on_epoch)
    bar = tqdm(total=cap, initial=state.epoch, desc=desc, unit="ep", leave=False, dynamic_ncols=True, disable=None)
    while not state.done and state.epoch < cap:
        m = step(state, train, val, norm, cfg, seed=seed, lr=schedule.lr(state.epoch + 1))
        if ckpt is not None:
            ckpt.save(state)
        if on_epoch is not None:
            on_epoch(m)
        bar.update(1)
        bar.set_postfix(loss=f"{m.train_loss:.3f}", val_loss=f"{m.val_loss:.3f}", val_acc=f"{m.val_acc:.3f}")
    bar.close()
    return FitResult(best_state=state.best_state, best_epoch=state.stopping.best_epoch, history=state.history,
                     kept=state.kept, stopped_early=state.done and state.epoch < cap,
                     resumed_from=state.resumed_from, epochs_trained=state.epochs_trained)
