"""Shared fixtures (their building blocks are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mlflow import MlflowClient

from helpers import make_dataset, tiny_params, tiny_raw, write_toy
from lth.study.imp import make_job, run_imp
from lth.tracking.mlflow import get_tracker
from lth.config import Params, params_from_dict

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def study(tmp_path: Path) -> Params:
    """Tiny params with two prepared datasets (a 'source' of 4 classes, a 'target' of 3)."""
    params = params_from_dict(tiny_raw(tmp_path))
    make_dataset(Path(params.paths.data), "fashion-mnist", 4, seed=1)
    make_dataset(Path(params.paths.data), "digits", 3, seed=2)
    return params


@pytest.fixture
def trained_epochs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(seed, epoch) of every training pass this process runs from now on: what was trained, not replayed."""
    import lth.training.state as state

    calls: list[tuple[int, int]] = []
    real = state.train_pass

    def counting(*args, seed: int, epoch: int, **kwargs):
        calls.append((seed, epoch))
        return real(*args, seed=seed, epoch=epoch, **kwargs)

    monkeypatch.setattr(state, "train_pass", counting)
    return calls


@pytest.fixture(scope="module")
def tracked_imp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One IMP job (rounds 0..2) on the toy source, tracked into a fresh sqlite store."""
    root = tmp_path_factory.mktemp("study")
    write_toy(root / "data")
    params = tiny_params(root)
    dirs = run_imp(make_job("toy", 0, params), params, get_tracker(params))
    uri = params.tracking.uri
    return {"root": root, "params": params, "dirs": dirs, "uri": uri, "client": MlflowClient(uri, uri)}
