"""What a fit carries from one epoch to the next, how it starts, and the step that advances it by one epoch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lth.config import TrainConfig
from lth.data.loader import Normalizer
from lth.data.store import Split
from lth.pruning import Mask, MaskEnforcer
from lth.training.epoch import State, cpu_state, evaluate, resolve_device, train_pass
from lth.training.metrics import EpochMetrics
from lth.training.optim import MaskedSGD
from lth.training.stopping import EarlyStopping


@dataclass
class FitState:
    """The model and optimizer in training, the best and kept weights, the history and the counters."""

    model: nn.Module
    optimizer: MaskedSGD
    stopping: EarlyStopping
    best_state: State
    keep: tuple[int, ...]  # epochs whose weights the caller wants back (0 = the initial weights)
    kept: dict[int, State] = field(default_factory=dict)
    history: list[EpochMetrics] = field(default_factory=list)
    epoch: int = 0  # epochs finished (by this process or the ones before it)
    done: bool = False  # early stopping has ended the fit
    resumed_from: int = 0  # epochs a checkpoint had finished before this process took over
    epochs_trained: int = 0  # epochs this process trained

    @property
    def params(self) -> list[nn.Parameter]:
        """The model's parameters in a fixed order (the checkpoint numbers momentum buffers by it)."""
        return list(self.model.parameters())


def start(model: nn.Module, cfg: TrainConfig, *, mask: Mask | None, lr: float, keep: tuple[int, ...]) -> FitState:
    """Put the model on its device with pruned weights zeroed, and a fresh optimizer and stopping policy."""
    device = resolve_device(cfg.device)
    if cfg.threads is not None and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.train()
    MaskEnforcer(model, mask)()  # zero the pruned weights once; the masked update keeps them at zero
    named = dict(model.named_parameters())
    optimizer = MaskedSGD(
        model.parameters(),
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
        masks={named[name]: m for name, m in (mask or {}).items()},
    )
    # Early stopping waits for the last kept epoch: the caller needs those weights.
    stopping = EarlyStopping(cfg.patience, max(cfg.min_epochs, keep[-1] if keep else 0))
    initial = cpu_state(model)
    return FitState(model, optimizer, stopping, best_state=initial, keep=keep,
                    kept={0: cpu_state(model)} if 0 in keep else {})


def step(state: FitState, train: Split, val: Split, norm: Normalizer, cfg: TrainConfig, *, seed: int,
         lr: float) -> EpochMetrics:
    """Train and evaluate one more epoch at rate `lr`; update best, kept, history, counters and `done`."""
    epoch = state.epoch + 1
    t0 = time.perf_counter()
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    fit_res = train_pass(state.model, state.optimizer, train, norm, cfg, seed=seed, epoch=epoch)
    val_res = evaluate(state.model, val, norm, cfg)
    metrics = EpochMetrics(epoch=epoch, train_loss=fit_res.loss, train_acc=fit_res.acc, val_loss=val_res.loss,
                           val_acc=val_res.acc, seconds=time.perf_counter() - t0)
    state.history.append(metrics)
    if epoch in state.keep:
        state.kept[epoch] = cpu_state(state.model)
    if state.stopping.update(epoch, metrics.val_loss):
        state.best_state = cpu_state(state.model)
    state.epoch, state.epochs_trained = epoch, state.epochs_trained + 1
    state.done = state.stopping.should_stop(epoch)
    return metrics
