"""scikit-learn's bundled handwritten digits (8x8, 10 classes, 1797 images): an offline demo target."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lth.config import DatasetParams
from lth.data.registry import RawDataset, array_sha256
from lth.data.splits import SPLIT_NAMES, resolve_sizes, stratified_split

FRACTIONS = (0.6, 0.2, 0.2)  # train/val/test when params give no sizes (the set has no official split)
_MAX_VALUE = 16  # load_digits counts ink in 4x4 blocks: 0..16


def load(dparams: DatasetParams, seed: int, raw_dir: Path) -> RawDataset:
    """All 1797 digits, split train/val/test stratified and seeded (60/20/20 unless sizes are given)."""
    from sklearn import __version__ as sklearn_version
    from sklearn.datasets import load_digits

    del raw_dir  # bundled with scikit-learn: nothing to download or cache
    bunch = load_digits()
    # 0..16 ink counts -> 0..255 grey, rounded (not truncated) so 16 maps exactly to 255
    images = np.rint(bunch.images * (255.0 / _MAX_VALUE)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    sizes = resolve_sizes("digits", len(labels), FRACTIONS, (dparams.train, dparams.val, dparams.test))
    parts = stratified_split(labels, sizes, seed)
    return RawDataset(
        class_names=tuple(str(d) for d in range(10)),
        splits={name: (images[idx], labels[idx]) for name, idx in zip(SPLIT_NAMES, parts)},
        info={
            "source": f"sklearn.datasets.load_digits (scikit-learn {sklearn_version})",
            "source_sha256": {
                "images": array_sha256(bunch.images),
                "labels": array_sha256(labels),
            },
            "split_sizes": dict(zip(SPLIT_NAMES, sizes)),
        },
    )
