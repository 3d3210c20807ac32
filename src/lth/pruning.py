"""Masks and global magnitude pruning (Han et al. 2015): pure functions, no I/O, no logging."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from lth.models import HEAD

Mask = dict[str, torch.Tensor]  # prunable weight name -> bool tensor of the same shape (True = kept)


def prunable_names(model: nn.Module) -> list[str]:
    """Weights of every conv and linear layer except the classification head, in module order."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module_name != HEAD:
            names.append(f"{module_name}.weight")
    return names


def full_mask(model: nn.Module) -> Mask:
    """The dense mask: every prunable weight kept."""
    params = dict(model.named_parameters())
    return {name: torch.ones_like(params[name], dtype=torch.bool) for name in prunable_names(model)}


def prune_global(weights: Mapping[str, torch.Tensor], mask: Mask, rate: float) -> Mask:
    """Prune `rate` of the *remaining* weights with the smallest magnitudes, one threshold across layers.

    Already-pruned weights stay pruned; ties are broken by position (layers in name order, as a mask loaded
    from safetensors comes in no fixed order) so the result is deterministic.
    """
    if not 0 < rate < 1:
        raise ValueError(f"pruning rate must be in (0, 1), got {rate}")
    names = sorted(mask)
    # Score pruned positions -1 so they sort first and stay pruned.
    scores = torch.cat(
        [torch.where(mask[n], weights[n].detach().abs().float().cpu(), -1.0).flatten() for n in names]
    )
    kept_now = int(sum(int(mask[n].sum()) for n in names))
    to_prune = int(round(rate * kept_now))
    already = scores.numel() - kept_now
    order = torch.argsort(scores, stable=True)
    keep_flat = torch.ones(scores.numel(), dtype=torch.bool)
    keep_flat[order[: already + to_prune]] = False
    new_mask: Mask = {}
    offset = 0
    for n in names:
        size = mask[n].numel()
        new_mask[n] = keep_flat[offset : offset + size].view_as(mask[n]).clone()
        offset += size
    return {n: new_mask[n] for n in mask}  # the caller's (the model's) order


def apply_mask(state: Mapping[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    """A copy of `state` with the masked weights set to exactly zero."""
    out = {}
    for name, tensor in state.items():
        if name in mask:
            out[name] = torch.where(mask[name].to(tensor.device), tensor, torch.zeros((), dtype=tensor.dtype))
        else:
            out[name] = tensor.clone()
    return out


class MaskEnforcer:
    """Keeps pruned weights at zero after each optimiser step with one fused multiply over all layers."""

    def __init__(self, model: nn.Module, mask: Mask | None) -> None:
        self.params: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        if not mask:
            return
        params = dict(model.named_parameters())
        for name, m in mask.items():
            if bool(m.all()):
                continue  # a dense layer needs no work
            p = params[name]
            self.params.append(p)
            self.masks.append(m.to(device=p.device, dtype=p.dtype))

    def __call__(self) -> None:
        if self.params:
            with torch.no_grad():
                torch._foreach_mul_(self.params, self.masks)

    def __bool__(self) -> bool:
        return bool(self.params)


def sparsity(mask: Mask) -> float:
    """Fraction of prunable weights pruned."""
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    return 1.0 - kept / total if total else 0.0


def sparsity_report(mask: Mask) -> dict:
    """Per-layer and overall counts: {'layers': {name: {total, kept, fraction_pruned}}, 'total', 'kept', 'fraction_pruned'}."""
    layers = {}
    for name, m in mask.items():
        kept = int(m.sum())
        layers[name] = {"total": m.numel(), "kept": kept, "fraction_pruned": 1.0 - kept / m.numel()}
    total = sum(v["total"] for v in layers.values())
    kept = sum(v["kept"] for v in layers.values())
    return {"layers": layers, "total": total, "kept": kept, "fraction_pruned": 1.0 - kept / total if total else 0.0}


def expected_fraction_kept(round_: int, rate: float) -> float:
    """Round k keeps (1 - rate)^k of the prunable weights."""
    return (1.0 - rate) ** round_
