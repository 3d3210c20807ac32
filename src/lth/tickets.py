"""Ticket directories: weights.safetensors + mask.safetensors (+ trained.safetensors) + ticket.json.

Loading never unpickles, and verifies every file against the sha256 that ticket.json records.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lth.errors import UserError
from lth.fsutil import atomic_dir, sha256_file

WEIGHTS = "weights.safetensors"  # the rewound (late-reset) weights, zero where pruned
MASK = "mask.safetensors"  # one bool tensor per prunable weight
TRAINED = "trained.safetensors"  # the fully trained weights of this round, zero where pruned
TICKET_JSON = "ticket.json"
FORMAT = 1


@dataclass(frozen=True)
class TicketMeta:
    """Provenance of a ticket."""

    source: str
    arch: str
    seed: int
    round: int
    sparsity: float  # fraction of prunable weights pruned
    rewind_epoch: int
    num_classes: int  # of the source
    prunable: tuple[str, ...]
    pruning_rate: float
    code_version: str = ""
    data_version: str = ""  # sha256 of the source's prepared meta.json
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. test accuracy of the trained weights
    train_fraction: float = 1.0  # fraction of the source's training split the ticket was found on
    sha256: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT


@dataclass
class Ticket:
    """A loaded ticket: provenance, rewound weights, mask, and (when present) the fully trained weights."""

    meta: TicketMeta
    weights: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    trained: dict[str, torch.Tensor] | None = None


def ticket_dir(models_root: str | Path, source: str, seed: int, round_: int) -> Path:
    """models/tickets/<source>/seed<s>/round<kk>."""
    return Path(models_root) / "tickets" / source / f"seed{seed}" / f"round{round_:02d}"


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.write_bytes(st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def save_ticket(
    directory: str | Path,
    meta: TicketMeta,
    weights: dict[str, torch.Tensor],
    mask: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor] | None = None,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write a ticket directory atomically; `extra_json` files (name -> object) are written beside it."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        _save_tensors(tmp / WEIGHTS, weights)
        _save_tensors(tmp / MASK, {k: v.bool() for k, v in mask.items()})
        if trained is not None:
            _save_tensors(tmp / TRAINED, trained)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        files = [WEIGHTS, MASK] + ([TRAINED] if trained is not None else [])
        checks = {f: sha256_file(tmp / f) for f in files}
        full = asdict(meta) | {"sha256": checks, "prunable": list(meta.prunable)}
        (tmp / TICKET_JSON).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return directory


def read_ticket_meta(directory: str | Path) -> TicketMeta:
    """ticket.json of a ticket directory, or a UserError naming what is wrong."""
    path = Path(directory) / TICKET_JSON
    if not path.is_file():
        raise UserError(f"no ticket at {directory} ({TICKET_JSON} missing): run `lth imp` or `lth tickets fetch`")
    try:
        raw = json.loads(path.read_text())
        raw["prunable"] = tuple(raw["prunable"])
        if not isinstance(raw.get("sha256"), dict):
            raise TypeError("sha256 must map file names to checksums")
        return TicketMeta(**raw)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a valid ticket description ({exc})") from None


def _load_tensors(path: Path, expected_sha: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path} missing: the ticket is incomplete; fetch or recompute it")
    if expected_sha is None:
        raise UserError(f"{path}: no sha256 for it in {TICKET_JSON}; the ticket cannot be verified, fetch it again")
    if sha256_file(path) != expected_sha:
        raise UserError(f"{path}: sha256 does not match ticket.json (corrupt or tampered); fetch it again")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, Exception) as exc:  # safetensors raises several types on bad bytes
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None


def load_ticket(directory: str | Path, *, with_trained: bool = False) -> Ticket:
    """Load and verify a ticket directory (checksums, mask/weight names and shapes)."""
    directory = Path(directory)
    meta = read_ticket_meta(directory)
    weights = _load_tensors(directory / WEIGHTS, meta.sha256.get(WEIGHTS))
    mask = _load_tensors(directory / MASK, meta.sha256.get(MASK))
    trained = _load_tensors(directory / TRAINED, meta.sha256.get(TRAINED)) if with_trained else None
    if set(mask) != set(meta.prunable):
        raise UserError(f"{directory / MASK}: mask names do not match the prunable weights in {TICKET_JSON}")
    # The file's order is the loader's (it differs between processes); ticket.json's order is the model's.
    mask = {name: mask[name] for name in meta.prunable}
    for name, m in mask.items():
        if name not in weights or weights[name].shape != m.shape:
            raise UserError(f"{directory}: mask and weights disagree on {name!r} (shape or missing weight)")
        if m.dtype != torch.bool:
            raise UserError(f"{directory / MASK}: {name!r} is {m.dtype}, expected bool")
    return Ticket(meta=meta, weights=weights, mask=mask, trained=trained)
