"""The learning rate of each epoch: constant, step (annealed by a factor after given epochs) or cosine.

A pure function of the epoch, so a resumed fit sets the same rate a run that was never killed would; the
checkpoint records the schedule it was written under (`LrSchedule.settings`) and is not resumed under another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lth.config import TrainConfig


@dataclass(frozen=True)
class LrSchedule:
    """`train.lr_schedule` over one fit: its base rate (train.lr or an override) and epoch cap."""

    kind: str  # constant | step | cosine
    base: float  # the rate of epoch 1
    cap: int  # the fit's epoch cap (cosine reaches its low end there)
    anneal_epochs: tuple[int, ...] = ()  # step: after each of these epochs the rate is multiplied by `factor`
    factor: float = 1.0  # step: the multiplier

    @classmethod
    def from_config(cls, cfg: TrainConfig, base: float, cap: int) -> LrSchedule:
        """The configured schedule for a fit starting at `base` and capped at `cap` epochs."""
        return cls(cfg.lr_schedule, base, cap, tuple(cfg.lr_anneal_epochs), cfg.lr_anneal_factor)

    def lr(self, epoch: int) -> float:
        """The rate of epoch `epoch` (1 = the first pass over the training split)."""
        if self.kind == "step":
            return self.base * self.factor ** sum(1 for e in self.anneal_epochs if e < epoch)
        if self.kind == "cosine":
            return self.base * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / self.cap))
        return self.base  # constant: the very float given, so today's runs stay bit-identical

    def settings(self) -> dict:
        """JSON form, stored in a fit's checkpoint so it resumes only under the same schedule."""
        return {"lr_schedule": self.kind, "lr": self.base, "max_epochs": self.cap,
                "lr_anneal_epochs": list(self.anneal_epochs), "lr_anneal_factor": self.factor}
