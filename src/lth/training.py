"""fit(): SGD with Nesterov momentum, random crops, early stopping on validation loss, masks enforced.

Pure core: returns weights and per-epoch metrics; the caller decides what to log and save. An optional
checkpoint file makes a killed fit resume at the last finished epoch with identical results.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from tqdm.auto import tqdm

from lth.config import TrainConfig
from lth.data.loader import Normalizer, eval_batches, train_batches
from lth.data.store import Split
from lth.fsutil import atomic_write_bytes, atomic_write_json
from lth.optim import MaskedSGD
from lth.pruning import Mask, MaskEnforcer

State = dict[str, torch.Tensor]


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


@dataclass
class FitResult:
    """Best-validation weights, the epoch they come from, the history and any kept early checkpoints."""

    best_state: State
    best_epoch: int
    history: list[EpochMetrics]
    kept: dict[int, State] = field(default_factory=dict)
    stopped_early: bool = False

    @property
    def best(self) -> EpochMetrics | None:
        """Metrics of the best epoch (None when the best weights are the initial ones)."""
        return next((m for m in self.history if m.epoch == self.best_epoch), None)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_state(model: nn.Module) -> State:
    """A detached CPU copy of the model's state dict (parameters and batch-norm buffers)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _autocast(device: torch.device, cfg: TrainConfig):
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _prepare_input(x: torch.Tensor, norm: Normalizer, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    x = norm(x)
    if cfg.channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def evaluate(model: nn.Module, split: Split, norm: Normalizer, cfg: TrainConfig) -> EvalResult:
    """Mean cross-entropy and accuracy on a split (centre crops, inference mode, large batches)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode(), _autocast(device, cfg):
        for x, y in eval_batches(split, cfg.eval_batch_size, cfg.crop_size, device):
            logits = model(_prepare_input(x, norm, cfg, device)).float()
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    n = len(split)
    return EvalResult(loss=loss_sum / max(n, 1), acc=correct / max(n, 1), n=n)


class _Checkpoint:
    """Every-epoch checkpoint of a fit: tensors in one safetensors file, counters in a JSON beside it."""

    def __init__(self, path: Path) -> None:
        self.tensors = path
        self.info = path.with_suffix(".json")

    def save(self, tensors: State, info: dict) -> None:
        # Tensors first, info last: the info file names the epoch its tensors belong to.
        atomic_write_bytes(self.tensors, st_save({k: v.contiguous() for k, v in tensors.items()}))
        atomic_write_json(self.info, info)

    def load(self) -> tuple[State, dict] | None:
        if not (self.info.is_file() and self.tensors.is_file()):
            return None
        info = json.loads(self.info.read_text())
        tensors = st_load(self.tensors.read_bytes())
        if info.get("epoch") != tensors.get("__epoch__", torch.tensor([-1])).tolist()[0]:
            return None  # killed between the two writes: the older epoch is gone, start this fit over
        return tensors, info

    def remove(self) -> None:
        for p in (self.tensors, self.info):
            p.unlink(missing_ok=True)


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
) -> FitResult:
    """Train until the validation loss has not improved for `cfg.patience` epochs (or the epoch cap).

    `keep_epochs`: also return the weights after those many epochs (0 = the initial weights), the
    late-resetting rewind points. Pruned weights (mask False) stay exactly zero throughout.
    """
    device = resolve_device(cfg.device)
    if cfg.threads is not None and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    cap = max_epochs if max_epochs is not None else cfg.max_epochs
    keep = sorted(set(int(e) for e in keep_epochs))
    if keep and keep[-1] > cap:
        raise ValueError(f"cannot keep epoch {keep[-1]} of a run capped at {cap} epochs")
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.train()
    MaskEnforcer(model, mask)()  # zero the pruned weights once; the masked update keeps them at zero
    named = dict(model.named_parameters())
    optimizer = MaskedSGD(
        model.parameters(),
        lr=lr if lr is not None else cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
        masks={named[name]: m for name, m in (mask or {}).items()},
    )
    params = list(model.parameters())
    best_state, best_epoch, best_loss, since_best = cpu_state(model), 0, math.inf, 0
    history: list[EpochMetrics] = []
    kept: dict[int, State] = {0: cpu_state(model)} if 0 in keep else {}
    start, stopped_early = 1, False
    ckpt = _Checkpoint(checkpoint) if checkpoint is not None else None
    if ckpt is not None and (loaded := ckpt.load()) is not None:
        tensors, info = loaded
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
        for i, p in enumerate(params):
            if f"opt/{i}" in tensors:
                optimizer.state[p]["momentum_buffer"] = tensors[f"opt/{i}"].to(device)
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
        for e in info["kept"]:
            kept[e] = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"keep{e}/")}
        history = [EpochMetrics(**m) for m in info["history"]]
        best_epoch, best_loss, since_best = info["best_epoch"], info["best_loss"], info["since_best"]
        start = info["epoch"] + 1
        if info.get("done"):
            start = cap + 1
            stopped_early = info["epoch"] < cap
        if on_epoch is not None:
            # The killed try may not have logged its last epochs; the caller's run gets the whole curve.
            for m in history:
                on_epoch(m)
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(total=cap, initial=start - 1, desc=desc, unit="ep", leave=False, dynamic_ncols=True,
               disable=None)
    for epoch in range(start, cap + 1):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for x, y in train_batches(train, cfg.batch_size, cfg.crop_size, seed, epoch, device):
            with _autocast(device, cfg):
                logits = model(_prepare_input(x, norm, cfg, device))
                loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()
        val_res = evaluate(model, val, norm, cfg)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=float(loss_sum) / len(train),
            train_acc=int(correct) / len(train),
            val_loss=val_res.loss,
            val_acc=val_res.acc,
            seconds=time.perf_counter() - t0,
        )
        history.append(metrics)
        if epoch in keep:
            kept[epoch] = cpu_state(model)
        if metrics.val_loss < best_loss:
            best_loss, best_epoch, since_best = metrics.val_loss, epoch, 0
            best_state = cpu_state(model)
        else:
            since_best += 1
        done = since_best >= cfg.patience and epoch >= cfg.min_epochs and epoch >= (keep[-1] if keep else 0)
        if ckpt is not None:
            tensors = {f"model/{k}": v for k, v in cpu_state(model).items()}
            for i, p in enumerate(params):
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    tensors[f"opt/{i}"] = buf.detach().cpu()
            tensors.update({f"best/{k}": v for k, v in best_state.items()})
            for e, st in kept.items():
                tensors.update({f"keep{e}/{k}": v for k, v in st.items()})
            tensors["__epoch__"] = torch.tensor([epoch])
            ckpt.save(
                tensors,
                {
                    "epoch": epoch,
                    "best_epoch": best_epoch,
                    "best_loss": best_loss,
                    "since_best": since_best,
                    "kept": sorted(kept),
                    "history": [asdict(m) for m in history],
                    "done": done,
                },
            )
        if on_epoch is not None:
            on_epoch(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.train_loss:.3f}", val_loss=f"{metrics.val_loss:.3f}", val_acc=f"{metrics.val_acc:.3f}")
        if done:
            stopped_early = epoch < cap
            break
    bar.close()
    return FitResult(best_state=best_state, best_epoch=best_epoch, history=history, kept=kept, stopped_early=stopped_early)
