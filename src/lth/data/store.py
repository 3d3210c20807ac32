"""The prepared store: data/prepared/<name>/ holds uint8 image arrays per split, labels and meta.json.

Arrays are `.npy` files read with `allow_pickle=False` and memory-mapped, so a 224-px dataset is
decoded once at prepare time and training never touches an image file again. They are also written
through memory maps (`writing`), so preparing a large dataset never holds a whole split in memory.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from lth.errors import UserError
from lth.fsutil import atomic_dir, sha256_file

SPLITS = ("train", "val", "test")
DATASET_JSON = "meta.json"


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
    return (prepared_dir(data_root, name) / DATASET_JSON).is_file()


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of uint8 [N,3,H,W], two passes over chunks (bounded memory at 224 px)."""
    step = max(1, (1 << 27) // max(1, images[0].size * 8)) if len(images) else 1
    chunks = [slice(i, i + step) for i in range(0, len(images), step)]
    count = max(1, images.shape[0] * images.shape[2] * images.shape[3])
    total = sum((images[c].sum(axis=(0, 2, 3), dtype=np.float64) for c in chunks), np.zeros(3))
    mean = total / 255.0 / count
    squares = np.zeros(3)
    for c in chunks:
        x = images[c].astype(np.float64) / 255.0 - mean[None, :, None, None]
        squares += (x * x).sum(axis=(0, 2, 3))
    std = np.sqrt(squares / count)
    std = np.where(std < 1e-6, 1.0, std)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


class PreparedWriter:
    """Fills a prepared dataset's temporary folder split by split; `finish` checks it and writes meta.json."""

    def __init__(self, folder: Path, name: str, class_names: list[str] | tuple[str, ...]) -> None:
        self.folder, self.name, self.class_names = folder, name, list(class_names)
        self._images: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        self.finished = False

    def images(self, split: str, count: int, height: int, width: int | None = None) -> np.ndarray:
        """A writable uint8 [count, 3, H, W] array for the split's images, memory-mapped onto its .npy file."""
        shape = (count, 3, height, width or height)
        if count == 0:  # an empty file cannot be memory-mapped
            array = np.zeros(shape, dtype=np.uint8)
        else:
            path = self.folder / f"{split}_images.npy"
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        self._images[split] = array
        return array

    def labels(self, split: str, labels: np.ndarray) -> None:
        """The split's integer labels, one per image."""
        self._labels[split] = np.asarray(labels).astype(np.int64)

    def finish(self, info: Mapping[str, Any] | None = None) -> None:
        """Flush the arrays, checksum every file and write meta.json (the last file, so "exists" means "complete")."""
        name = self.name
        missing = [s for s in SPLITS if s not in self._images or s not in self._labels]
        if missing:
            raise ValueError(f"write_prepared({name}): missing splits {missing}")
        counts: dict[str, Any] = {}
        checksums = {}
        for split in SPLITS:
            images, labels = self._images[split], self._labels[split]
            if labels.shape != (images.shape[0],):
                raise ValueError(f"{name}/{split}: {labels.shape[0]} labels for {images.shape[0]} images")
            per_class = np.bincount(labels, minlength=len(self.class_names)).tolist()
            counts[split] = {"total": int(images.shape[0]), "per_class": per_class}
            if isinstance(images, np.memmap):
                images.flush()
            else:
                np.save(self.folder / f"{split}_images.npy", images, allow_pickle=False)
            np.save(self.folder / f"{split}_labels.npy", labels, allow_pickle=False)
            for kind in ("images", "labels"):
                fname = f"{split}_{kind}.npy"
                checksums[fname] = sha256_file(self.folder / fname)
        shapes = {a.shape[2:] for a in self._images.values()}
        if len(shapes) != 1:
            raise ValueError(f"{name}: splits have different image sizes {shapes}")
        (size_h, size_w) = shapes.pop()
        mean, std = _channel_stats(self._images["train"])
        self._images.clear()  # drop the maps before the folder is renamed into place
        meta = {
            "name": name,
            "class_names": self.class_names,
            "num_classes": len(self.class_names),
            "image_size": [int(size_h), int(size_w)],
            "channels": 3,
            "counts": counts,
            "mean": mean,
            "std": std,
            "sha256": checksums,
            **dict(info or {}),
        }
        (self.folder / DATASET_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        self.finished = True


@contextlib.contextmanager
def writing(data_root: str | Path, name: str, class_names: list[str] | tuple[str, ...]) -> Iterator[PreparedWriter]:
    """A PreparedWriter on a temporary folder that replaces data/prepared/<name> only once `finish` has run."""
    with atomic_dir(prepared_dir(data_root, name)) as tmp:
        writer = PreparedWriter(tmp, name, class_names)
        yield writer
        if not writer.finished:
            raise RuntimeError(f"prepared dataset {name}: finish() was not called")


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
    for split in SPLITS:
        images, labels = splits[split]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{name}/{split}: images must be uint8 [N,3,S,S], got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{name}/{split}: {labels.shape[0]} labels for {images.shape[0]} images")
    with writing(data_root, name, class_names) as writer:
        for split in SPLITS:
            images, labels = splits[split]
            writer.images(split, *images.shape[:1], *images.shape[2:])[...] = images
            writer.labels(split, labels)
        writer.finish(info)
    return prepared_dir(data_root, name)


def read_dataset_meta(data_root: str | Path, name: str) -> dict[str, Any]:
    """meta.json of a prepared dataset, or a UserError saying how to prepare it."""
    path = prepared_dir(data_root, name) / DATASET_JSON
    if not path.is_file():
        raise UserError(f"dataset {name!r} is not prepared ({path} missing): run `lth prepare {name}`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}); run `lth prepare {name}` again") from None


def _check_split(path: Path, images: np.ndarray, labels: np.ndarray, num_classes: int, name: str) -> None:
    """A UserError (not a crash mid-training) when a split's arrays are not uint8 [N,3,H,W] with N labels in range."""
    again = f"run `lth prepare {name}` again"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"{path}: expected uint8 images [N, 3, H, W], got {images.dtype} {list(images.shape)}; {again}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in "iu":
        raise UserError(f"{path}: {images.shape[0]} images but labels {labels.dtype} {list(labels.shape)}; {again}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"{path}: labels outside 0..{num_classes - 1} (meta.json class_names); {again}")


def load_prepared(data_root: str | Path, name: str, *, verify: bool = True) -> PreparedDataset:
    """Load a prepared dataset (memory-mapped, no pickle); `verify` checks every file's sha256."""
    meta = read_dataset_meta(data_root, name)
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
            arrays.append(arr)
        _check_split(root / f"{split}_images.npy", arrays[0], arrays[1], len(meta["class_names"]), name)
        splits[split] = Split(torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1]))
    return PreparedDataset(name=name, class_names=tuple(meta["class_names"]), splits=splits, meta=meta)
