"""No load path unpickles, and tickets are verified against the sha256 in ticket.json before use."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch

from lth.errors import UserError
from lth.fsutil import sha256_file
from lth.tickets import TicketMeta, load_ticket, save_ticket

SRC = Path(__file__).resolve().parents[1] / "src" / "lth"
# torchvision's CIFAR reader unpickles the official batches; lth calls it only after torchvision's md5 check.
UNPICKLING_READERS = {"CIFAR10", "CIFAR100"}
ALLOWED = {"data/cifar.py"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def unsafe_uses(path: Path) -> list[str]:
    """Code (not comments or docstrings) in `path` that could unpickle."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib")]
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name.endswith(("torch.load", "read_pickle", "yaml.load", "unsafe_load", "load_model")):
                found.append(name)
            if name in ("np.load", "numpy.load") and not (
                    isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value is False):
                found.append(f"{name} without allow_pickle=False")
            allow = keywords.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                found.append(f"{name}(allow_pickle=True)")
        if isinstance(node, (ast.Name, ast.Attribute, ast.Constant)):
            value = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else node.value
            if value in UNPICKLING_READERS:
                found.append(f"torchvision {value} reader")
    return found


def test_no_load_path_unpickles_outside_the_cifar_allowlist() -> None:
    uses = {str(p.relative_to(SRC)): unsafe_uses(p) for p in sorted(SRC.rglob("*.py"))}
    offenders = {f: u for f, u in uses.items() if u and f not in ALLOWED}
    assert not offenders
    assert {f for f, u in uses.items() if u} == ALLOWED  # the allowlist is not stale
    assert all(u == "torchvision CIFAR10 reader" or u == "torchvision CIFAR100 reader" for u in uses["data/cifar.py"])
    assert "check_integrity" in (SRC / "data/cifar.py").read_text()  # md5 before the reader opens a batch


def test_scanner_sees_what_it_forbids(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport numpy as np\nimport torch\n"
                   "torch.load('x')\nnp.load('y')\nnp.load('z', allow_pickle=True)\n")
    assert unsafe_uses(bad) == ["import pickle", "torch.load", "np.load without allow_pickle=False",
                                "np.load without allow_pickle=False", "np.load(allow_pickle=True)"]


def _ticket(tmp_path: Path) -> Path:
    weights = {"conv.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(2, 4)}
    mask = {k: torch.rand_like(v) > 0.5 for k, v in weights.items()}
    meta = TicketMeta(source="s", arch="a", seed=0, round=1, sparsity=0.5, rewind_epoch=1, num_classes=2,
                      prunable=tuple(mask), pruning_rate=0.2)
    return save_ticket(tmp_path / "t", meta, weights, mask, trained=weights)


def test_ticket_json_records_checksums_and_loading_checks_them(tmp_path: Path) -> None:
    d = _ticket(tmp_path)
    meta = json.loads((d / "ticket.json").read_text())
    assert set(meta["sha256"]) == {"weights.safetensors", "mask.safetensors", "trained.safetensors"}
    assert all(meta["sha256"][f] == sha256_file(d / f) for f in meta["sha256"])
    load_ticket(d, with_trained=True)
    data = bytearray((d / "trained.safetensors").read_bytes())
    data[-1] ^= 0x01
    (d / "trained.safetensors").write_bytes(bytes(data))
    load_ticket(d)  # trained weights not asked for
    with pytest.raises(UserError, match="trained.safetensors: sha256 does not match"):
        load_ticket(d, with_trained=True)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_a_pickle_posing_as_a_ticket_is_refused_unexecuted(tmp_path: Path) -> None:
    d = _ticket(tmp_path)
    _Payload.marker = str(tmp_path / "executed")
    (d / "weights.safetensors").write_bytes(pickle.dumps({"conv.weight": _Payload()}))
    meta = json.loads((d / "ticket.json").read_text())
    meta["sha256"]["weights.safetensors"] = sha256_file(d / "weights.safetensors")  # even with a matching checksum
    (d / "ticket.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_ticket(d)
    assert not (tmp_path / "executed").exists()
