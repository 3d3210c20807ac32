"""Shared fixtures: tiny, learnable prepared datasets and a tiny study config in a temp directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lth.config import Params, params_from_dict
from lth.data.store import write_prepared

os.environ.setdefault("TQDM_DISABLE", "1")


def tiny_raw(tmp: Path, **overrides) -> dict:
    """A tiny study: width-4 ResNet-8 on 12-px images, 2 epochs, 2 rounds."""
    raw = {
        "paths": {k: str(tmp / k) for k in ("data", "models", "results", "reports")},
        "prepare": {"image_size": 12, "seed": 0, "datasets": {"fashion-mnist": {}, "digits": {}}},
        "model": {"arch": "resnet", "depth": 8, "width": 4},
        "train": {"batch_size": 16, "lr": 0.05, "max_epochs": 3, "patience": 2, "crop_size": 10,
                  "eval_batch_size": 64, "device": "cpu"},
        "imp": {"sources": ["fashion-mnist"], "seeds": [0], "rounds": 2, "pruning_rate": 0.2,
                "rewind_epoch": 1, "keep_epochs": 2},
        "transfer": {"targets": ["digits"], "sources": ["fashion-mnist"], "seeds": [0],
                     "related": [], "size_fractions": [0.5]},
        "tune": {"rewind_epochs": [0, 2]},
        "tracking": {"register": False, "system_metrics": False},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def make_dataset(data_root: Path, name: str, num_classes: int, sizes=(96, 32, 32), size: int = 12,
                 seed: int = 0) -> None:
    """A learnable random dataset: each class has its own mean brightness pattern."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 200, (num_classes, 3, size, size))
    splits = {}
    for split, n in zip(("train", "val", "test"), sizes):
        y = np.arange(n) % num_classes
        x = np.clip(protos[y] + rng.integers(0, 56, (n, 3, size, size)), 0, 255).astype(np.uint8)
        splits[split] = (x, y.astype(np.int64))
    write_prepared(data_root, name, splits, [f"c{i}" for i in range(num_classes)], {"origin": "test"})


@pytest.fixture
def study(tmp_path: Path) -> Params:
    """Tiny params with two prepared datasets (a 'source' of 4 classes, a 'target' of 3)."""
    params = params_from_dict(tiny_raw(tmp_path))
    make_dataset(Path(params.paths.data), "fashion-mnist", 4, seed=1)
    make_dataset(Path(params.paths.data), "digits", 3, seed=2)
    return params
