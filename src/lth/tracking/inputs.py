"""A run's inputs as plain values: the prepared splits it trained and tested on (what MLflow shows as datasets).

No MLflow here: jobs build these values and hand them to `Run.log_inputs`; the adapter turns them into
MLflow dataset inputs. The digests come from the prepared dataset's meta.json, the source is the DVC-tracked
path `data/prepared/<name>` and, when the project has one, its default DVC remote.
"""

from __future__ import annotations

import configparser
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lth.data.store import DATASET_JSON, PreparedDataset, prepared_dir

CONTEXTS = {"train": "train", "val": "validation", "test": "test"}  # split -> MLflow's input context
DIGEST_LEN = 16  # hex digits of the digest shown in the UI (MLflow stores at most 36 characters)


@dataclass(frozen=True)
class DataInput:
    """One dataset a run used: a prepared split, named and versioned as DVC stores it."""

    name: str  # the dataset, e.g. fashion-mnist
    digest: str  # of the split's files, from the sha256s in meta.json
    source: str  # data/prepared/<name>
    context: str  # train, validation or test
    rows: int  # images in the split as the run used it
    remote: str = ""  # the DVC remote that holds the data ("" when the project has none)
    profile: Mapping[str, Any] = field(default_factory=dict)  # extra facts (checksums, fraction used)


def split_digest(meta: Mapping[str, Any], split: str) -> str:
    """The split's digest: sha256 over the checksums meta.json records for its image and label files."""
    sums = meta.get("sha256", {})
    blob = f"{sums.get(f'{split}_images.npy', '')}:{sums.get(f'{split}_labels.npy', '')}"
    return hashlib.sha256(blob.encode()).hexdigest()[:DIGEST_LEN]


def dataset_inputs(data_root: str | Path, data: PreparedDataset, *, train_fraction: float = 1.0) -> list[DataInput]:
    """The three splits of `data` as run inputs (the training split as reduced to `train_fraction`)."""
    folder = prepared_dir(data_root, data.name).resolve()
    root = project_root(folder)
    remote = dvc_remote(root) if root else ""
    source = folder.relative_to(root).as_posix() if root else folder.as_posix()  # data/prepared/<name>
    out = []
    for split, context in CONTEXTS.items():
        digest = split_digest(data.meta, split)
        profile: dict[str, Any] = {"num_rows": len(data.splits[split]), "num_classes": data.num_classes,
                                   "meta_json": f"{source}/{DATASET_JSON}"}
        if split == "train" and train_fraction < 1:  # a stratified subset: another dataset than the whole split
            profile["train_fraction"] = train_fraction
            digest = hashlib.sha256(f"{digest}@{train_fraction:g}".encode()).hexdigest()[:DIGEST_LEN]
        out.append(DataInput(name=data.name, digest=digest, source=source, context=context,
                             rows=len(data.splits[split]), remote=remote, profile=profile))
    return out


def project_root(path: Path) -> Path | None:
    """The DVC project (the nearest folder with .dvc/) holding `path`, or None."""
    return next((p for p in [path, *path.parents] if (p / ".dvc").is_dir()), None)


def dvc_remote(root: Path) -> str:
    """URL of the default DVC remote of the project at `root` (.dvc/config, then config.local), or ''."""
    sections: dict[str, dict[str, str]] = {}
    for name in ("config", "config.local"):  # config.local overrides, as in DVC
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(root / ".dvc" / name)
        except configparser.Error:
            return ""
        for section in parser.sections():
            # DVC writes ['remote "name"'] (quoted); a hand-written config may say [remote "name"]
            key = section.strip("'")
            sections.setdefault(key, {}).update(parser[section])
    default = sections.get("core", {}).get("remote")
    url = sections.get(f'remote "{default}"', {}).get("url", "") if default else ""
    if url and not re.match(r"^[a-z][a-z0-9+.-]*://", url) and not Path(url).is_absolute():
        url = str((root / ".dvc" / url).resolve())  # DVC resolves a relative remote path from .dvc/
    return url
