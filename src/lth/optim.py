"""SGD with (Nesterov) momentum whose update is multiplied by the pruning mask, so pruned weights never move.

Folding the mask into the last multiply-add of the step costs one extra read of the mask per pruned layer,
instead of a full read-modify-write pass over the weights after every step; and the step runs in place
(torch.optim.SGD's foreach path allocates a fresh copy of every gradient per step, which dominates on CPU).
The arithmetic is torch.optim.SGD's (dampening 0): g = grad + wd*p; buf = mu*buf + g (buf = g at the first
step); d = g + mu*buf (Nesterov) or buf; p -= lr*d, here p -= lr*d*mask. Pruned weights must already be
zero: weight decay then adds nothing there, and the masked update keeps them exactly zero.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn


class MaskedSGD(torch.optim.Optimizer):
    """In-place SGD; parameters given a mask only ever move where the mask is True."""

    def __init__(self, params: Iterable[nn.Parameter], *, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, masks: Mapping[nn.Parameter, torch.Tensor] | None = None) -> None:
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))
        # Float masks on the parameter's device: a mixed-dtype multiply-add is slower than the extra bytes.
        self.masks = {p: m.to(device=p.device, dtype=p.dtype) for p, m in (masks or {}).items() if not bool(m.all())}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            if wd:
                torch._foreach_add_(grads, params, alpha=wd)
            if mu:
                old = [p for p in params if "momentum_buffer" in self.state[p]]
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = p.grad.clone()
                if old:
                    bufs = [self.state[p]["momentum_buffer"] for p in old]
                    torch._foreach_mul_(bufs, mu)
                    torch._foreach_add_(bufs, [p.grad for p in old])
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                if group["nesterov"]:
                    torch._foreach_add_(grads, bufs, alpha=mu)
                else:
                    grads = bufs
            masked = [i for i, p in enumerate(params) if p in self.masks]
            dense = [i for i, p in enumerate(params) if p not in self.masks]
            if dense:
                torch._foreach_add_([params[i] for i in dense], [grads[i] for i in dense], alpha=-lr)
            if masked:
                torch._foreach_addcmul_([params[i] for i in masked], [grads[i] for i in masked],
                                        [self.masks[params[i]] for i in masked], value=-lr)
        return None
