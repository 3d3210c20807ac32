"""One epoch: a training pass over the split (seeded crops and order) and an evaluation pass."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lth.config import TrainConfig
from lth.data.loader import Normalizer, eval_batches, train_batches
from lth.data.store import Split
from lth.training.metrics import EvalResult

State = dict[str, torch.Tensor]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cap_gpu_memory(share: float) -> bool:
    """Hold this process to `share` of its GPU's memory (a unit given 0.25 of a GPU shares it with three others).

    PyTorch's caching allocator would otherwise grow into memory its neighbours on the same GPU need. Returns
    whether a cap was set (no CUDA device, or a whole GPU or more: nothing to cap).
    """
    if not 0 < share < 1 or not torch.cuda.is_available():
        return False
    torch.cuda.set_per_process_memory_fraction(share, torch.cuda.current_device())
    return True


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


def train_pass(model: nn.Module, optimizer: torch.optim.Optimizer, split: Split, norm: Normalizer,
               cfg: TrainConfig, *, seed: int, epoch: int) -> EvalResult:
    """One pass of SGD over the training split; returns its mean loss and accuracy (as seen while training)."""
    device = next(model.parameters()).device
    loss_fn = nn.CrossEntropyLoss()
    # Sums stay on the device: one synchronisation per epoch, not one per batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in train_batches(split, cfg.batch_size, cfg.crop_size, seed, epoch, device):
        with _autocast(device, cfg):
            logits = model(_prepare_input(x, norm, cfg, device))
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
    return EvalResult(loss=float(loss_sum) / len(split), acc=int(correct) / len(split), n=len(split))
