"""A fit's every-epoch checkpoint: tensors in one safetensors file, counters and history in a JSON beside it.

A killed fit started again with the same checkpoint path resumes after the last finished epoch and ends
with the same bytes as a fit never killed. A checkpoint written under other settings (`settings`: the
learning-rate schedule, base rate and epoch cap) is not resumed: that fit starts over.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lth.fsutil import atomic_write_bytes, atomic_write_json
from lth.training.epoch import State, cpu_state
from lth.training.metrics import EpochMetrics
from lth.training.state import FitState


class Checkpoint:
    """The checkpoint files of one fit at `path` (and `path` with a .json suffix)."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.tensors = path
        self.info = path.with_suffix(".json")
        self.settings = settings

    def save(self, state: FitState) -> None:
        """Write the state after its last finished epoch (tensors first, then the JSON naming that epoch)."""
        tensors = {f"model/{k}": v for k, v in cpu_state(state.model).items()}
        for i, p in enumerate(state.params):
            buf = state.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"opt/{i}"] = buf.detach().cpu()
        tensors.update({f"best/{k}": v for k, v in state.best_state.items()})
        for e, st in state.kept.items():
            tensors.update({f"keep{e}/{k}": v for k, v in st.items()})
        tensors["__epoch__"] = torch.tensor([state.epoch])
        # Tensors first, info last: the info file names the epoch its tensors belong to.
        atomic_write_bytes(self.tensors, st_save({k: v.contiguous() for k, v in tensors.items()}))
        atomic_write_json(self.info, {
            "epoch": state.epoch, **state.stopping.counters(), "kept": sorted(state.kept),
            "history": [asdict(m) for m in state.history], "done": state.done, "settings": self.settings,
        })

    def load(self) -> tuple[State, dict] | None:
        """(tensors, info) of a complete checkpoint written under these settings, else None."""
        if not (self.info.is_file() and self.tensors.is_file()):
            return None
        info = json.loads(self.info.read_text())
        if info.get("settings") != self.settings:
            return None  # written under another schedule, rate or cap: resuming would mix two runs
        tensors = st_load(self.tensors.read_bytes())
        if info.get("epoch") != tensors.get("__epoch__", torch.tensor([-1])).tolist()[0]:
            return None  # killed between the two writes: the older epoch is gone, start this fit over
        return tensors, info

    def restore(self, state: FitState) -> bool:
        """Load the checkpoint into `state` (on the model's device); False when there is none to resume."""
        loaded = self.load()
        if loaded is None:
            return False
        tensors, info = loaded
        state.model.load_state_dict(_under(tensors, "model/"))
        device = next(state.model.parameters()).device
        for i, p in enumerate(state.params):
            if f"opt/{i}" in tensors:
                state.optimizer.state[p]["momentum_buffer"] = tensors[f"opt/{i}"].to(device)
        state.best_state = _under(tensors, "best/")
        state.kept.update({e: _under(tensors, f"keep{e}/") for e in info["kept"]})
        state.history = [EpochMetrics(**m) for m in info["history"]]
        state.stopping.restore(info)
        state.epoch = state.resumed_from = info["epoch"]
        state.done = info["done"]
        return True

    def remove(self) -> None:
        """Delete both files (the caller does, once the fit's outputs are safely written)."""
        for p in (self.tensors, self.info):
            p.unlink(missing_ok=True)


def _under(tensors: State, prefix: str) -> State:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
