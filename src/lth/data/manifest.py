"""Manifests: a CSV of (path, label, split, sha256) rows naming a dataset's image files, checked on every read.

Paths are relative to the manifest's own folder, so a manifest and its images move (and `dvc pull`) together.
WikiArt subsets and Cytomine pulls both end in one; preparing one verifies every file before decoding any.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lth.config import DatasetParams
from lth.data.folder import load_folder, looks_like_tree
from lth.data.images import ImageFiles
from lth.data.registry import RawDataset
from lth.data.splits import SPLIT_NAMES
from lth.errors import UserError
from lth.fsutil import atomic_write_text, sha256_file

COLUMNS = ("path", "label", "split", "sha256")
MANIFEST = "manifest.csv"  # name of the manifest inside data/raw/NAME/
_SHA256 = re.compile(r"[0-9a-f]{64}")


def relative_to_manifest(file: Path, manifest: Path) -> str:
    """`file` as written in `manifest`: relative to the manifest's folder, with forward slashes."""
    return Path(os.path.relpath(file.resolve(), manifest.resolve().parent)).as_posix()


def write_manifest(path: Path, rows: Sequence[Mapping[str, object]], extra: Sequence[str] = ()) -> None:
    """Write rows atomically (the manifest is the last thing written, so its presence means "complete")."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *extra], lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a manifest, checked for the required columns, known split names and well-formed checksums."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"manifest {path} not found")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"manifest {path}: missing column(s) {', '.join(missing)} (need {', '.join(COLUMNS)})")
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        if row["split"] not in SPLIT_NAMES:
            raise UserError(
                f"manifest {path} line {line}: split {row['split']!r} is not one of {', '.join(SPLIT_NAMES)}"
            )
        if not _SHA256.fullmatch(row["sha256"] or ""):
            raise UserError(f"manifest {path} line {line}: {row['sha256']!r} is not a sha256 hex digest")
        if not row["path"] or not row["label"]:
            raise UserError(f"manifest {path} line {line}: empty path or label")
    if not rows:
        raise UserError(f"manifest {path}: no rows")
    return rows


def verify_files(path: Path, rows: Sequence[Mapping[str, str]]) -> list[Path]:
    """Each row's file, after checking that it exists and that its sha256 matches the manifest."""
    root = path.parent
    files = []
    for row in tqdm(rows, desc=f"verify {path.name}", unit="file", leave=False, disable=None):
        file = root / row["path"]
        if not file.is_file():
            raise UserError(f"manifest {path} names {row['path']}, which is not there ({file})")
        if sha256_file(file) != row["sha256"]:
            raise UserError(f"{file}: checksum mismatch with manifest {path} (file changed or corrupt)")
        files.append(file)
    return files


def load_manifest(path: str | Path, dataset: str) -> RawDataset:
    """Images and labels of a manifest, every file's checksum verified; class names sorted."""
    path = Path(path).expanduser()
    rows = read_manifest(path)
    files = verify_files(path, rows)
    class_names = tuple(sorted({row["label"] for row in rows}))
    if len(class_names) < 2:
        raise UserError(
            f"dataset {dataset!r}: manifest {path} has only one class ({class_names[0]!r}); need two or more"
        )
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split in SPLIT_NAMES:
        members = [i for i, row in enumerate(rows) if row["split"] == split]
        if not members:
            raise UserError(f"dataset {dataset!r}: manifest {path} has no {split} rows")
        labels = np.array([index[rows[i]["label"]] for i in members], dtype=np.int64)
        splits[split] = (ImageFiles([files[i] for i in members]), labels)
    return RawDataset(
        class_names=class_names,
        splits=splits,
        info={"manifest": str(path), "manifest_sha256": sha256_file(path), "files_verified": len(rows)},
    )


def load_user_copy(dparams: DatasetParams, raw_dir: Path, how_to_get: str) -> RawDataset:
    """A user's copy at prepare.datasets.NAME.path (default data/raw/NAME): a manifest, or a split/class/image tree.

    `how_to_get` tells the user how to bring one in; {name} and {raw_dir} in it are filled in.
    """
    name = raw_dir.name
    how_to_get = how_to_get.format(name=name, raw_dir=raw_dir)
    where = Path(dparams.path).expanduser() if dparams.path is not None else raw_dir
    if where.is_file():
        return load_manifest(where, name)
    if (where / MANIFEST).is_file():
        return load_manifest(where / MANIFEST, name)
    if looks_like_tree(where):
        return load_folder(where, name)
    if where.is_dir() and any(where.iterdir()):
        raise UserError(f"dataset {name!r}: {where} has no {MANIFEST}, so its download is unfinished; {how_to_get}")
    raise UserError(f"dataset {name!r}: nothing at {where}; {how_to_get}")
