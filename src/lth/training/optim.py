"""SGD with (Nesterov) momentum whose update is multiplied by the pruning mask, so pruned weights never move.

Folding the mask into the last multiply-add of the step costs one extra read of the mask per pruned layer,
instead of a full read-modify-write pass over the weights after every step. The step runs in place: tensor by
tensor on a CPU (cache locality), one foreach kernel per operation on a GPU.
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
            if params[0].is_cuda:
                self._step_foreach(group, params)
            else:
                for p in params:
                    self._step_one(group, p)
        return None

    def _step_one(self, group: dict, p: torch.Tensor) -> None:
        # On a CPU, finishing one tensor before the next keeps it in cache across the four passes.
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        g = p.grad
        if wd:
            g.add_(p, alpha=wd)
        if mu:
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = self.state[p]["momentum_buffer"] = g.clone()
            else:
                buf.mul_(mu).add_(g)
            if group["nesterov"]:
                g.add_(buf, alpha=mu)
            else:
                g = buf
        mask = self.masks.get(p)
        if mask is None:
            p.add_(g, alpha=-lr)
        else:
            p.addcmul_(g, mask, value=-lr)

    def _step_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        # On a GPU, one kernel per operation over all tensors (multi-tensor apply).
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
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
