"""Global magnitude pruning: one threshold across layers, pruned stays pruned, head excluded."""

from __future__ import annotations

import torch

from lth.config import ModelConfig
from lth.models import build_model
from lth.pruning import (MaskEnforcer, apply_mask, expected_fraction_kept, full_mask, prunable_names,
                         prune_global, sparsity, sparsity_report)


def test_prunable_excludes_head_bias_and_bn() -> None:
    model = build_model(ModelConfig(depth=8, width=4), 10, seed=0)
    names = prunable_names(model)
    assert "fc.weight" not in names and "conv1.weight" in names
    assert all(n.endswith(".weight") and "bn" not in n for n in names)
    assert "layer2.0.downsample.0.weight" in names


def test_one_global_threshold_across_layers() -> None:
    weights = {"a": torch.tensor([1.0, -2.0, 3.0, 4.0]), "b": torch.tensor([[0.5, -5.0], [6.0, 0.1]])}
    mask = {k: torch.ones_like(v, dtype=torch.bool) for k, v in weights.items()}
    new = prune_global(weights, mask, 0.5)  # 8 weights -> prune the 4 smallest magnitudes
    assert new["a"].tolist() == [False, False, True, True]
    assert new["b"].tolist() == [[False, True], [True, False]]


def test_pruned_stays_pruned_and_rate_applies_to_remaining() -> None:
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(100, generator=g), "b": torch.randn(50, 2, generator=g)}
    mask = {k: torch.ones_like(v, dtype=torch.bool) for k, v in weights.items()}
    for k in range(1, 6):
        # a pruned weight that regrew a large magnitude must not come back
        grown = {n: torch.where(mask[n], w, torch.full_like(w, 100.0)) for n, w in weights.items()}
        new = prune_global(grown, mask, 0.2)
        for n in mask:
            assert not bool((new[n] & ~mask[n]).any())
        mask = new
        assert abs((1 - sparsity(mask)) - expected_fraction_kept(k, 0.2)) < 0.01


def test_sparsity_report_and_apply_mask() -> None:
    mask = {"a": torch.tensor([True, False, False, True]), "b": torch.tensor([True, True])}
    report = sparsity_report(mask)
    assert report["total"] == 6 and report["kept"] == 4
    assert report["layers"]["a"]["fraction_pruned"] == 0.5
    state = apply_mask({"a": torch.tensor([1.0, -2.0, 3.0, 4.0]), "b": torch.ones(2), "c": torch.ones(1)}, mask)
    assert state["a"].tolist() == [1.0, 0.0, 0.0, 4.0] and state["c"].tolist() == [1.0]


def test_enforcer_keeps_zeros_through_sgd() -> None:
    model = build_model(ModelConfig(depth=8, width=4), 3, seed=0)
    params = dict(model.named_parameters())
    mask = prune_global({n: params[n] for n in prunable_names(model)}, full_mask(model), 0.5)
    enforce = MaskEnforcer(model, mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    enforce()
    for _ in range(3):
        loss = model(torch.randn(4, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        enforce()
    for n, m in mask.items():
        assert bool((params[n][~m] == 0).all())
        assert bool((params[n][m] != 0).any())
