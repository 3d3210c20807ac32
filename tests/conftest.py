"""Shared fixtures (their building blocks are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import make_dataset, tiny_raw
from lth.config import Params, params_from_dict

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def study(tmp_path: Path) -> Params:
    """Tiny params with two prepared datasets (a 'source' of 4 classes, a 'target' of 3)."""
    params = params_from_dict(tiny_raw(tmp_path))
    make_dataset(Path(params.paths.data), "fashion-mnist", 4, seed=1)
    make_dataset(Path(params.paths.data), "digits", 3, seed=2)
    return params
