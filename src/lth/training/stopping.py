"""Early stopping on the validation loss: remember the best epoch, stop `patience` epochs without a better one."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EarlyStopping:
    """The policy and its counters (the counters travel in a fit's checkpoint)."""

    patience: int  # epochs without a lower validation loss before stopping
    min_epochs: int  # never stop before this many epochs (the caller folds in the last kept epoch)
    best_epoch: int = 0  # 0: no epoch beat the initial weights yet
    best_loss: float = math.inf
    since_best: int = 0

    def update(self, epoch: int, val_loss: float) -> bool:
        """Record an epoch's validation loss; True when it is the best so far (strictly lower)."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.since_best = val_loss, epoch, 0
            return True
        self.since_best += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        """True once `patience` epochs passed without improvement, and not before `min_epochs`."""
        return self.since_best >= self.patience and epoch >= self.min_epochs

    def counters(self) -> dict:
        """JSON form of the counters, for the checkpoint."""
        return {"best_epoch": self.best_epoch, "best_loss": self.best_loss, "since_best": self.since_best}

    def restore(self, info: dict) -> None:
        """Counters back from a checkpoint's JSON."""
        self.best_epoch, self.best_loss, self.since_best = info["best_epoch"], info["best_loss"], info["since_best"]
