"""MaskedSGD: torch.optim.SGD's arithmetic in place, and pruned weights that never leave zero."""

from __future__ import annotations

import pytest
import torch

from lth.config import ModelConfig
from lth.models import build_model
from lth.training.optim import MaskedSGD
from lth.pruning import MaskEnforcer, full_mask, prunable_names, prune_global


class _ForeachSGD(MaskedSGD):
    """The GPU code path (one foreach kernel per operation), run on the CPU."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            self._step_foreach(group, [p for p in group["params"] if p.grad is not None])


def _train(model, opt, steps: int, after=lambda: None) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 8, 8, generator=g)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        after()


@pytest.mark.parametrize("cls", [MaskedSGD, _ForeachSGD])
@pytest.mark.parametrize("nesterov,momentum", [(True, 0.9), (False, 0.9), (False, 0.0)])
def test_dense_matches_torch_sgd(cls, nesterov: bool, momentum: float) -> None:
    ours, ref = (build_model(ModelConfig(depth=8, width=4), 3, seed=0) for _ in range(2))
    kw = dict(lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=1e-3)
    _train(ours, cls(ours.parameters(), **kw), 4)
    _train(ref, torch.optim.SGD(ref.parameters(), **kw), 4)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("cls", [MaskedSGD, _ForeachSGD])
def test_masked_update_equals_zeroing_after_each_step_and_keeps_exact_zeros(cls) -> None:
    ours, ref = (build_model(ModelConfig(depth=8, width=4), 3, seed=0) for _ in range(2))
    params = dict(ours.named_parameters())
    mask = prune_global({n: params[n] for n in prunable_names(ours)}, full_mask(ours), 0.7)
    kw = dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-3)
    MaskEnforcer(ours, mask)()
    _train(ours, cls(ours.parameters(), masks={params[n]: m for n, m in mask.items()}, **kw), 6)
    enforce = MaskEnforcer(ref, mask)
    enforce()
    _train(ref, torch.optim.SGD(ref.parameters(), **kw), 6, after=enforce)
    for n, m in mask.items():
        assert bool((params[n][~m] == 0).all()) and bool((params[n][m] != 0).any())
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
