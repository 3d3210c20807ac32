"""Tiny datasets in the real published formats: CIFAR's python tar.gz of pickled batches, Fashion-MNIST's IDX .gz."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def md5(data: bytes) -> str:
    """Hex md5, the checksum torchvision checks."""
    return hashlib.md5(data).hexdigest()


def class_images(labels: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint8 images whose mean brightness encodes the label (learnable, deterministic)."""
    rng = np.random.default_rng(seed)
    base = (np.asarray(labels, dtype=np.float64) * 37 % 200 + 20).reshape(-1, *[1] * len(shape))
    return np.clip(base + rng.normal(0, 12, (len(labels), *shape)), 0, 255).astype(np.uint8)


def _balanced(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def cifar_archive(kind: str, train_per_class: int, test_per_class: int) -> tuple[bytes, dict[str, str]]:
    """(tar.gz bytes, {member file: md5}) laid out exactly like cifar-10-python / cifar-100-python."""
    ten = kind == "cifar10"
    classes = 10 if ten else 100
    folder = "cifar-10-batches-py" if ten else "cifar-100-python"
    label_key = "labels" if ten else "fine_labels"
    members: dict[str, bytes] = {}

    def batch(name: str, labels: np.ndarray, seed: int) -> None:
        data = class_images(labels, (3072,), seed)
        entry = {
            "batch_label": name,
            label_key: labels.tolist(),
            "data": data,
            "filenames": [f"{i}.png" for i in range(len(labels))],
        }
        if not ten:
            entry["coarse_labels"] = (labels // 5).tolist()
        members[name] = pickle.dumps(entry, protocol=2)

    train = _balanced(classes, train_per_class, 1)
    if ten:
        for i, part in enumerate(np.array_split(train, 5), start=1):
            batch(f"data_batch_{i}", part, i)
        batch("test_batch", _balanced(classes, test_per_class, 9), 9)
        members["batches.meta"] = pickle.dumps({"label_names": [f"class{c}" for c in range(10)]}, protocol=2)
    else:
        batch("train", train, 1)
        batch("test", _balanced(classes, test_per_class, 9), 9)
        meta = {
            "fine_label_names": [f"fine{c:02d}" for c in range(100)],
            "coarse_label_names": [f"c{c}" for c in range(20)],
        }
        members["meta"] = pickle.dumps(meta, protocol=2)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), {name: md5(data) for name, data in members.items()}


def idx_gz(array: np.ndarray) -> bytes:
    """A gzip'd IDX file of unsigned bytes."""
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), mtime=0)


def fashion_mnist_files(train_per_class: int, test_per_class: int) -> dict[str, bytes]:
    """The four Fashion-MNIST .gz files, tiny."""
    train, test = _balanced(10, train_per_class, 3), _balanced(10, test_per_class, 4)
    return {
        "train-images-idx3-ubyte.gz": idx_gz(class_images(train, (28, 28), 3)),
        "train-labels-idx1-ubyte.gz": idx_gz(train),
        "t10k-images-idx3-ubyte.gz": idx_gz(class_images(test, (28, 28), 4)),
        "t10k-labels-idx1-ubyte.gz": idx_gz(test),
    }


def png(label: int, size: tuple[int, int], seed: int) -> bytes:
    """PNG bytes of an RGB image whose colour encodes `label`."""
    from PIL import Image

    pixels = class_images(np.array([label]), (*size, 3), seed)[0]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def make_tree(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """`<split>/human-lba_<term>/<image>_<annotation>.png`, the layout the pathology sets circulate in."""
    for split in ("train", "val", "test"):
        for c in range(classes):
            folder = root / split / f"human-lba_{101 + c}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                (folder / f"{500 + k}_{9000 + 10 * c + k}.png").write_bytes(png(c, (18 + k, 22), seed=k))
    return root


ARTISTS = {"monet": 12, "renoir": 10, "degas": 10, "sisley": 10, "manet": 4, "Unknown Artist": 20}


def make_wikiart(root: Path) -> Path:
    """Images under root/<style>/ and a metadata table (filename, artist, genre); returns the CSV."""
    rows = []
    for a, (artist, count) in enumerate(ARTISTS.items()):
        for k in range(count):
            rel = f"{'Impressionism' if k % 2 else 'Realism'}/{artist.replace(' ', '-')}_{k}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(png(a, (30, 20 + k % 3), seed=k))
            rows.append({"filename": rel, "artist": artist, "genre": "portrait" if k % 3 else "landscape"})
    meta = root / "classes.csv"
    with meta.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["filename", "artist", "genre"])
        writer.writeheader()
        writer.writerows(rows)
    return meta
