"""What a fit measures: per-epoch metrics, one split's evaluation, and a run's end-of-training names."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured; epoch 1 is the first full pass over the training split."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float

    def as_dict(self) -> dict[str, float]:
        """Metric name -> value, without the epoch (it is the step)."""
        return {k: v for k, v in asdict(self).items() if k != "epoch"}


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy on one split."""

    loss: float
    acc: float
    n: int
