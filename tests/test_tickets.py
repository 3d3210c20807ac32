"""Ticket files: safetensors + JSON, checksums verified, no pickle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lth.errors import UserError
from lth.tickets import MASK, WEIGHTS, TicketMeta, load_ticket, save_ticket


def _ticket(tmp: Path) -> Path:
    meta = TicketMeta(source="s", arch="a", seed=0, round=1, sparsity=0.5, rewind_epoch=2, num_classes=3,
                      prunable=("w",), pruning_rate=0.2)
    weights = {"w": torch.tensor([1.0, 0.0, 0.0, 2.0]), "b": torch.ones(2)}
    mask = {"w": torch.tensor([True, False, False, True])}
    return save_ticket(tmp / "t", meta, weights, mask, trained=weights)


def test_roundtrip(tmp_path: Path) -> None:
    t = load_ticket(_ticket(tmp_path), with_trained=True)
    assert t.meta.sparsity == 0.5 and t.meta.prunable == ("w",)
    assert t.mask["w"].dtype == torch.bool and t.trained is not None
    assert set(t.meta.sha256) == {"weights.safetensors", "mask.safetensors", "trained.safetensors"}


def test_mask_comes_back_in_the_prunable_order(tmp_path: Path) -> None:
    names = ("layer3.w", "conv1.w", "layer1.w", "fc1.w", "layer2.w", "b.w", "a.w", "z.w")
    meta = TicketMeta(source="s", arch="a", seed=0, round=1, sparsity=0.0, rewind_epoch=0, num_classes=3,
                      prunable=names, pruning_rate=0.2)
    weights = {n: torch.ones(2) for n in names}
    ticket = load_ticket(save_ticket(tmp_path / "t", meta, weights, {n: torch.ones(2, dtype=torch.bool) for n in names}))
    assert tuple(ticket.mask) == names


def test_tampered_bytes_are_refused(tmp_path: Path) -> None:
    d = _ticket(tmp_path)
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-1] ^= 1
    (d / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        load_ticket(d)


def test_truncated_and_missing(tmp_path: Path) -> None:
    d = _ticket(tmp_path)
    (d / MASK).unlink()
    with pytest.raises(UserError, match="missing"):
        load_ticket(d)
    with pytest.raises(UserError, match="no ticket"):
        load_ticket(tmp_path / "elsewhere")


def test_overwrite_is_atomic(tmp_path: Path) -> None:
    d = _ticket(tmp_path)
    _ticket(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert load_ticket(d).meta.round == 1


def test_mask_loads_in_the_models_order(tmp_path: Path) -> None:
    """The next round's ticket.json lists the mask's names: in the model's order, whatever the file's."""
    names = ("layer2.w", "conv1.w", "layer1.w", "fc0.w", "b.w", "a.w")  # the model's order, not sorted
    meta = TicketMeta(source="s", arch="a", seed=0, round=1, sparsity=0.0, rewind_epoch=2, num_classes=3,
                      prunable=names, pruning_rate=0.2)
    tensors = {n: torch.ones(2) for n in names}
    path = save_ticket(tmp_path / "t", meta, tensors, {n: torch.ones(2, dtype=torch.bool) for n in names})
    assert tuple(load_ticket(path).mask) == names
