"""CIFAR-10 and CIFAR-100: the official python archives, downloaded and md5-checked by torchvision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lth.config import DatasetParams
from lth.data.downloads import torchvision_fetch
from lth.data.registry import RawDataset
from lth.data.splits import holdout
from lth.errors import UserError
from lth.fsutil import sha256_file

DEFAULT_VAL = 5000  # not from the paper (it gives no source splits): held out of the 50000 training images
CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}  # dataset name -> torchvision class


def dataset_class(name: str) -> Any:
    """torchvision's reader for `name` (looked up at call time, so tests can point it at a local mirror)."""
    import torchvision.datasets

    return getattr(torchvision.datasets, CLASSES[name])


def expected_files(cls: Any) -> list[tuple[str, str]]:
    """(file in the batches folder, md5) for every file torchvision checks."""
    return [*map(tuple, cls.train_list + cls.test_list), (cls.meta["filename"], cls.meta["md5"])]


def is_complete(cls: Any, root: Path) -> bool:
    """True when every batch file under root matches torchvision's md5."""
    from torchvision.datasets.utils import check_integrity

    return all(check_integrity(str(root / cls.base_folder / f), md5) for f, md5 in expected_files(cls))


def find_root(name: str, dparams: DatasetParams, raw_dir: Path) -> Path:
    """Folder holding the extracted batches: the user's path, an earlier download, or a new one."""
    cls = dataset_class(name)
    if dparams.path is not None:
        root = Path(dparams.path).expanduser()
        if not is_complete(cls, root):
            raise UserError(
                f"dataset {name!r}: {root / cls.base_folder} is missing or fails torchvision's md5 check; "
                f"fix prepare.datasets.{name}.path or remove it to download"
            )
        return root
    if not is_complete(cls, raw_dir):
        hint = f"connect to the network, or set prepare.datasets.{name}.path to a folder holding {cls.base_folder}/"
        torchvision_fetch(
            name, lambda tmp: cls(root=str(tmp), train=True, download=True), raw_dir, f"{cls.url}: {hint}"
        )
    return raw_dir


def load_cifar(name: str, dparams: DatasetParams, seed: int, raw_dir: Path) -> RawDataset:
    """Training images with a stratified, seeded validation hold-out, and the official test images."""
    cls = dataset_class(name)
    root = find_root(name, dparams, raw_dir)
    train, test = cls(root=str(root), train=True), cls(root=str(root), train=False)
    train_x, train_y = np.asarray(train.data, dtype=np.uint8), np.asarray(train.targets, dtype=np.int64)
    val_size = dparams.val if dparams.val is not None else DEFAULT_VAL
    train_idx, val_idx = holdout(train_y, val_size, seed, name)
    return RawDataset(
        class_names=tuple(train.classes),
        splits={
            "train": (train_x[train_idx], train_y[train_idx]),
            "val": (train_x[val_idx], train_y[val_idx]),
            "test": (np.asarray(test.data, dtype=np.uint8), np.asarray(test.targets, dtype=np.int64)),
        },
        info={
            "source_dir": str(root / cls.base_folder),
            "source_url": cls.url,
            "source_sha256": {f: sha256_file(root / cls.base_folder / f) for f, _ in expected_files(cls)},
            "val_from": f"{val_size} images held out of the {len(train_y)} training images (stratified, seeded)",
        },
    )


def load_cifar10(dparams: DatasetParams, seed: int, raw_dir: Path) -> RawDataset:
    """Origin 'cifar10'."""
    return load_cifar("cifar10", dparams, seed, raw_dir)


def load_cifar100(dparams: DatasetParams, seed: int, raw_dir: Path) -> RawDataset:
    """Origin 'cifar100' (the 100 fine labels)."""
    return load_cifar("cifar100", dparams, seed, raw_dir)
