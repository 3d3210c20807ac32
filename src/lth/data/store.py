"""The prepared store: data/prepared/<name>/ holds uint8 image arrays per split, labels and meta.json.

Arrays are `.npy` files read with `allow_pickle=False` and memory-mapped, so a 224-px dataset is
decoded once at prepare time and training never touches an image file again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from lth.errors import UserError
from lth.fsutil import atomic_dir, sha256_file

SPLITS = ("train", "val", "test")
META = "meta.json"


@dataclass(frozen=True)
class Split:
    """One split: uint8 images [N, 3, S, S] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor | np.ndarray) -> "Split":
        """The split restricted to `indices` (copied, so the result owns its memory)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return Split(self.images[idx].clone(), self.labels[idx].clone())


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset: class names, the three splits, and its meta.json."""

    name: str
    class_names: tuple[str, ...]
    splits: Mapping[str, Split]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def val(self) -> Split:
        return self.splits["val"]

    @property
    def test(self) -> Split:
        return self.splits["test"]

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel mean of the training images, in [0, 1]."""
        return tuple(self.meta["mean"])  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel std of the training images, in [0, 1]."""
        return tuple(self.meta["std"])  # type: ignore[return-value]


def prepared_dir(data_root: str | Path, name: str) -> Path:
    """data/prepared/<name>."""
    return Path(data_root) / "prepared" / name


def is_prepared(data_root: str | Path, name: str) -> bool:
    """True when the dataset's meta.json exists (written last, so the directory is complete)."""
    return (prepared_dir(data_root, name) / META).is_file()


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    x = images.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    std = np.where(std < 1e-6, 1.0, std)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def write_prepared(
    data_root: str | Path,
    name: str,
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    class_names: list[str] | tuple[str, ...],
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write a prepared dataset atomically; `splits[s] = (uint8 [N,3,S,S], int labels [N])`."""
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise ValueError(f"write_prepared({name}): missing splits {missing}")
    counts: dict[str, Any] = {}
    shapes = set()
    for split in SPLITS:
        images, labels = splits[split]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{name}/{split}: images must be uint8 [N,3,S,S], got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{name}/{split}: {labels.shape[0]} labels for {images.shape[0]} images")
        shapes.add(images.shape[2:])
        per_class = np.bincount(labels.astype(np.int64), minlength=len(class_names)).tolist()
        counts[split] = {"total": int(images.shape[0]), "per_class": per_class}
    if len(shapes) != 1:
        raise ValueError(f"{name}: splits have different image sizes {shapes}")
    (size_h, size_w) = shapes.pop()
    mean, std = _channel_stats(splits["train"][0])
    target = prepared_dir(data_root, name)
    with atomic_dir(target) as tmp:
        checksums = {}
        for split in SPLITS:
            images, labels = splits[split]
            for kind, arr in (("images", np.ascontiguousarray(images)), ("labels", labels.astype(np.int64))):
                fname = f"{split}_{kind}.npy"
                np.save(tmp / fname, arr, allow_pickle=False)
                checksums[fname] = sha256_file(tmp / fname)
        meta = {
            "name": name,
            "class_names": list(class_names),
            "num_classes": len(class_names),
            "image_size": [int(size_h), int(size_w)],
            "channels": 3,
            "counts": counts,
            "mean": mean,
            "std": std,
            "sha256": checksums,
            **dict(info or {}),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return target


def read_meta(data_root: str | Path, name: str) -> dict[str, Any]:
    """meta.json of a prepared dataset, or a UserError saying how to prepare it."""
    path = prepared_dir(data_root, name) / META
    if not path.is_file():
        raise UserError(f"dataset {name!r} is not prepared ({path} missing): run `lth prepare {name}`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}); run `lth prepare {name}` again") from None


def load_prepared(data_root: str | Path, name: str, *, verify: bool = True) -> PreparedDataset:
    """Load a prepared dataset (memory-mapped, no pickle); `verify` checks every file's sha256."""
    meta = read_meta(data_root, name)
    root = prepared_dir(data_root, name)
    splits = {}
    for split in SPLITS:
        arrays = []
        for kind in ("images", "labels"):
            fname = f"{split}_{kind}.npy"
            path = root / fname
            if not path.is_file():
                raise UserError(f"{path} missing: run `lth prepare {name}` again")
            if verify and sha256_file(path) != meta.get("sha256", {}).get(fname):
                raise UserError(
                    f"{path}: checksum does not match meta.json (corrupt or edited); "
                    f"run `lth prepare {name}` again or `dvc pull`"
                )
            try:
                # copy-on-write map: pages load lazily, torch gets a writable view without a copy
                arr = np.load(path, mmap_mode="c", allow_pickle=False)
            except ValueError as exc:
                raise UserError(f"{path}: unreadable array ({exc}); run `lth prepare {name}` again") from None
            arrays.append(torch.from_numpy(arr))
        splits[split] = Split(arrays[0], arrays[1])
    return PreparedDataset(name=name, class_names=tuple(meta["class_names"]), splits=splits, meta=meta)
