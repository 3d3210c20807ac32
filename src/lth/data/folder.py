"""Folder import: a `split/class/image` tree (e.g. `<split>/<dataset>_<term-id>/<image-id>_<annotation-id>.png`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from lth.config import DatasetParams
from lth.data.images import IMAGE_SUFFIXES, ImageFiles
from lth.data.registry import RawDataset
from lth.data.splits import SPLIT_NAMES
from lth.errors import UserError
from lth.fsutil import sha256_file

# folder names that mean each split, as the circulating copies spell them
SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


def _split_dir(root: Path, split: str) -> Path:
    for alias in SPLIT_ALIASES[split]:
        if (root / alias).is_dir():
            return root / alias
    raise UserError(
        f"{root}: no {split}/ folder (expected {'/, '.join(SPLIT_ALIASES[split])}/ with one folder per class)"
    )


def looks_like_tree(root: Path) -> bool:
    """True when `root` has a split folder (train/, val/, test/ or an alias)."""
    return any((root / alias).is_dir() for aliases in SPLIT_ALIASES.values() for alias in aliases)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan(root: Path) -> dict[str, dict[str, list[Path]]]:
    """split -> class folder name -> sorted image paths."""
    tree = {}
    for split in SPLIT_NAMES:
        folder = _split_dir(root, split)
        classes = {d.name: _images(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
        tree[split] = {name: files for name, files in classes.items() if files}
        if not tree[split]:
            raise UserError(f"{folder}: no class folders with images ({', '.join(IMAGE_SUFFIXES)})")
    return tree


def tree_sha256(root: Path, files: list[Path]) -> str:
    """One checksum over every file's relative path and content (provenance of the whole copy)."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(f"{file.relative_to(root).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def load_folder(root: str | Path, dataset: str) -> RawDataset:
    """Images under `root/{train,val,test}/<class>/`, class names sorted; decoding happens during prepare."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset {dataset!r}: folder {root} not found")
    tree = scan(root)
    class_names = tuple(sorted({name for per_class in tree.values() for name in per_class}))
    if len(class_names) < 2:
        raise UserError(f"dataset {dataset!r}: {root} has only one class ({class_names[0]!r}); need two or more")
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    every_file = []
    for split, per_class in tree.items():
        files = [f for name in sorted(per_class) for f in per_class[name]]
        labels = np.array([index[name] for name in sorted(per_class) for _ in per_class[name]], dtype=np.int64)
        splits[split] = (ImageFiles(files), labels)
        every_file += files
    return RawDataset(
        class_names=class_names,
        splits=splits,
        info={"source_dir": str(root), "source_tree_sha256": tree_sha256(root, every_file), "files": len(every_file)},
    )


def load(dparams: DatasetParams, seed: int, raw_dir: Path) -> RawDataset:
    """Origin 'folder': the tree at prepare.datasets.NAME.path."""
    del seed  # the tree's own split is kept
    if dparams.path is None:
        raise UserError(
            f"dataset {raw_dir.name!r}: set prepare.datasets.{raw_dir.name}.path to a split/class/image folder"
        )
    return load_folder(dparams.path, raw_dir.name)
