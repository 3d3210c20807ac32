"""WikiArt subsets: a reproducible manifest (path, label, split, sha256) built from a user's copy and its metadata.

Metadata may be a table with a header (a file-name column plus artist / genre / style / type columns) or
ArtGAN's per-task CSVs without one (`relative/path.jpg,label-index`, names from its `*_class.txt`).
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lth.config import DatasetParams
from lth.data.manifest import load_user_copy, read_manifest, relative_to_manifest, write_manifest
from lth.data.registry import RawDataset
from lth.data.splits import SPLIT_NAMES, stratified_split
from lth.errors import UserError
from lth.fsutil import sha256_file

PATH_COLUMNS = ("path", "filename", "file", "file_name", "image", "image_path", "relative_path")
HELD_OUT = 0.1  # val and test each take 10% of every class's images (paper: 80/10/10)


@dataclass(frozen=True)
class Entry:
    """One labelled image of the user's copy."""

    file: Path
    label: str


def is_unknown(label: str) -> bool:
    """Labels that name no class ("Unknown", "unknown artist", empty) never form one."""
    return not label.strip() or label.strip().lower().startswith("unknown")


def read_class_names(path: Path) -> dict[str, str]:
    """ArtGAN's `*_class.txt`: lines `index name` -> {index: name}."""
    names = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2:
            names[parts[0]] = parts[1].strip()
    return names


def _find_column(header: list[str], wanted: str, metadata: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    if wanted.lower() not in lowered:
        raise UserError(f"metadata {metadata}: no column {wanted!r} (columns: {', '.join(header)})")
    return lowered.index(wanted.lower())


def read_metadata(metadata: Path, root: Path, label: str, path_column: str | None, classes: Path | None) -> list[Entry]:
    """Labelled image paths from one metadata CSV; a row naming a file not under `root` is a UserError."""
    if not metadata.is_file():
        raise UserError(f"metadata {metadata} not found")
    with metadata.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if not rows:
        raise UserError(f"metadata {metadata} is empty")
    header = [h.strip().lower() for h in rows[0]]
    if label.lower() in header:
        found = [c for c in ([path_column] if path_column else PATH_COLUMNS) if c.lower() in header]
        if not found:
            raise UserError(f"metadata {metadata}: no file-name column ({', '.join(PATH_COLUMNS)}); pass --path-column")
        path_at, label_at, body, first_line = (
            header.index(found[0].lower()),
            _find_column(rows[0], label, metadata),
            rows[1:],
            2,
        )
    else:  # ArtGAN's layout: no header, (path, label index)
        path_at, label_at, body, first_line = 0, 1, rows, 1
    names = read_class_names(classes) if classes else {}
    entries = []
    for line, row in enumerate(body, start=first_line):
        if len(row) <= max(path_at, label_at):
            raise UserError(
                f"metadata {metadata} line {line}: {len(row)} column(s), expected at least {max(path_at, label_at) + 1}"
            )
        file = root / row[path_at].strip()
        if not file.is_file():
            raise UserError(f"metadata {metadata} line {line} names {row[path_at]}, which is not under {root}")
        entries.append(Entry(file, names.get(row[label_at].strip(), row[label_at].strip())))
    return entries


def top_classes(entries: Sequence[Entry], top: int) -> list[str]:
    """The `top` most frequent known labels, ties broken by name."""
    counts = Counter(e.label for e in entries if not is_unknown(e.label))
    if len(counts) < top:
        raise UserError(f"only {len(counts)} known classes in the metadata, --top asks for {top}")
    return sorted(counts, key=lambda name: (-counts[name], name))[:top]


def select(entries: Sequence[Entry], top: int, seed: int, exclude: set[Path]) -> list[tuple[Entry, str]]:
    """(entry, split) for the top classes' images, 80/10/10 stratified and seeded, in path order."""
    unique: dict[Path, Entry] = {}
    for e in entries:
        key = e.file.resolve()
        if key in unique and unique[key].label != e.label:
            raise UserError(f"{e.file} is labelled both {unique[key].label!r} and {e.label!r} in the metadata")
        if key not in exclude:
            unique[key] = e
    kept = top_classes(list(unique.values()), top)
    chosen = sorted((e for e in unique.values() if e.label in kept), key=lambda e: e.file.as_posix())
    labels = np.array([kept.index(e.label) for e in chosen])
    held = int(round(HELD_OUT * len(chosen)))
    val_idx, test_idx = stratified_split(labels, [held, held], seed)
    split = np.zeros(len(chosen), dtype=np.int64)
    split[val_idx], split[test_idx] = 1, 2
    return [(e, SPLIT_NAMES[k]) for e, k in zip(chosen, split.tolist(), strict=True)]


def excluded_files(manifest: Path | None) -> set[Path]:
    """Resolved files of another subset's manifest (kept out of this one)."""
    if manifest is None:
        return set()
    return {(manifest.parent / row["path"]).resolve() for row in read_manifest(manifest)}


def build(
    root: Path,
    metadata: Sequence[Path],
    label: str,
    top: int,
    seed: int,
    out: Path,
    exclude_manifest: Path | None = None,
    path_column: str | None = None,
    classes: Path | None = None,
) -> dict[str, Counter]:
    """Write the subset's manifest to `out`; returns per-split class counts."""
    if not root.is_dir():
        raise UserError(f"WikiArt root {root} is not a folder")
    if top < 2:
        raise UserError(f"--top must be at least 2 classes, got {top}")
    entries = [e for m in metadata for e in read_metadata(m, root, label, path_column, classes)]
    picked = select(entries, top, seed, excluded_files(exclude_manifest))
    rows = [
        {"path": relative_to_manifest(e.file, out), "label": e.label, "split": split, "sha256": sha256_file(e.file)}
        for e, split in tqdm(picked, desc="checksums", unit="file", leave=False, disable=None)
    ]
    write_manifest(out, rows)
    counts: dict[str, Counter] = {s: Counter() for s in SPLIT_NAMES}
    for row in rows:
        counts[row["split"]][row["label"]] += 1
    return counts


def load(dparams: DatasetParams, seed: int, raw_dir: Path) -> RawDataset:
    """Origin 'wikiart': the manifest at prepare.datasets.NAME.path or data/raw/NAME/manifest.csv, files verified."""
    del seed  # the manifest fixes the split
    return load_user_copy(dparams, raw_dir, "run `lth build wikiart --root DIR --metadata CSV --label COLUMN --top N "
                                            "--seed S -o {raw_dir}/manifest.csv` or set prepare.datasets.{name}.path "
                                            "to a manifest")
