"""Fashion-MNIST: the real IDX files from a user's copy, Debian's package, or a torchvision download."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from lth.config import DatasetParams
from lth.data.downloads import torchvision_fetch
from lth.data.registry import RawDataset
from lth.data.splits import holdout
from lth.errors import UserError
from lth.fsutil import sha256_file

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # package dataset-fashion-mnist
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEFAULT_VAL = 5000  # not from the paper (it gives no source splits): a usual hold-out size
_UBYTE = 0x08


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read a gzip'd IDX file of unsigned bytes with `ndim` dimensions (1: labels, 3: images)."""
    path = Path(path)
    hint = "delete it and prepare again (it will be re-read or re-downloaded)"
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: not a readable gzip file ({exc}); {hint}") from None
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"{path}: truncated IDX header ({len(data)} bytes); {hint}")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _UBYTE or dims != ndim:
        magic = data[:4].hex()
        raise UserError(f"{path}: bad IDX magic number 0x{magic} (expected 0x00000{_UBYTE:x}0{ndim}); {hint}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(shape))
    if body.size != expected:
        raise UserError(f"{path}: truncated IDX data ({body.size} of {expected} bytes for shape {shape}); {hint}")
    return body.reshape(shape).copy()


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES.values())


def _download(raw_dir: Path) -> Path:
    """torchvision's download (checksums verified) into raw_dir; returns the folder with the gz files."""

    def fetch(root: Path) -> None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=str(root), train=True, download=True)

    hint = (
        f"not found in {DEBIAN_DIR} either; run `apt-get install dataset-fashion-mnist`, set "
        "prepare.datasets.fashion-mnist.path to a folder with the IDX .gz files, or connect to the network"
    )
    torchvision_fetch("fashion-mnist", fetch, raw_dir, hint)
    return raw_dir / "FashionMNIST" / "raw"


def find_files(dparams: DatasetParams, raw_dir: Path) -> Path:
    """Folder holding the four IDX .gz files: the user's path, Debian's copy, an earlier download, or a new one."""
    if dparams.path is not None:
        folder = Path(dparams.path).expanduser()
        if not _has_files(folder):
            raise UserError(
                f"dataset 'fashion-mnist': {folder} lacks {', '.join(FILES.values())}; "
                "fix prepare.datasets.fashion-mnist.path or remove it"
            )
        return folder
    for folder in (DEBIAN_DIR, raw_dir / "FashionMNIST" / "raw"):
        if _has_files(folder):
            return folder
    return _download(raw_dir)


def load(dparams: DatasetParams, seed: int, raw_dir: Path) -> RawDataset:
    """The 60k/10k Fashion-MNIST splits, with validation carved (stratified, seeded) out of training."""
    folder = find_files(dparams, raw_dir)
    arrays = {key: read_idx(folder / fname, 3 if key.endswith("images") else 1) for key, fname in FILES.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise UserError(f"{folder}: {split} has {n_img} images but {n_lab} labels; replace the files")
    train_x, train_y = arrays["train_images"], arrays["train_labels"].astype(np.int64)
    val_size = dparams.val if dparams.val is not None else DEFAULT_VAL
    train_idx, val_idx = holdout(train_y, val_size, seed, "fashion-mnist")
    return RawDataset(
        class_names=CLASS_NAMES,
        splits={
            "train": (train_x[train_idx], train_y[train_idx]),
            "val": (train_x[val_idx], train_y[val_idx]),
            "test": (arrays["test_images"], arrays["test_labels"].astype(np.int64)),
        },
        info={
            "source_dir": str(folder),
            "source_sha256": {fname: sha256_file(folder / fname) for fname in FILES.values()},
            "val_from": f"{val_size} images carved from the 60000 training images (stratified, seeded)",
        },
    )
