"""bio-textures: patches of real images bundled with scikit-image, one class per image, offline.

Each image is cut into horizontal bands (train on top, then val, then test, by area fraction) and a
patch is kept only if it lies fully inside one band, so no source pixel reaches two splits: a model
cannot score well on test by having memorised overlapping training patches.

Classes (all real acquisitions, none synthetic):
- immunohistochemistry: a stained human colon tissue section (brightfield microscopy);
- cell: a fluorescence micrograph of a cell (skimage.data.cell);
- retina: a human fundus photograph (vessels, optic disc);
- gravel: a photographed granular texture. Chosen as the fourth class because the only other bundled
  medical image, microaneurysms, is 102x102 px: too small for three disjoint bands of 48-px patches.
  Gravel's blob-like grains resemble densely packed cells, so it is not trivially separable by texture.
Everything is converted to grey (ITU-R 601 luma): two of the four sources are greyscale, so colour alone
would otherwise separate the classes and the demo target would be trivial. For the same reason each patch's
contrast is normalised (zero mean, fixed spread): the images differ in brightness and contrast, which
would otherwise give the class away without looking at texture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from lth.config import DatasetParams
from lth.data.registry import RawDataset, array_sha256
from lth.data.splits import SPLIT_NAMES, band_bounds, stratified_sample

PATCH = 48  # patch side in source pixels (resized to prepare.image_size afterwards)
STRIDE = 24  # half-overlapping patches inside a band: more patches, and overlap never crosses a band
FRACTIONS = (0.6, 0.2, 0.2)  # band heights of train/val/test, top to bottom
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class SourceImage:
    """One class: a skimage.data image and how to reject background patches."""

    class_name: str
    loader: str  # function name in skimage.data (bundled, no download)
    dark_level: int | None = None  # grey level under which a pixel counts as background
    max_dark_fraction: float = 1.0  # patches with more background pixels than this are skipped


SOURCES = (
    SourceImage("immunohistochemistry", "immunohistochemistry"),
    SourceImage("cell", "cell"),
    # the fundus photograph sits in a black disc: corner patches would be classified by blackness alone
    SourceImage("retina", "retina", dark_level=20, max_dark_fraction=0.1),
    SourceImage("gravel", "gravel"),
)


def normalise_contrast(patch: np.ndarray, spread: float = 48.0) -> np.ndarray:
    """uint8 patch with its grey levels standardised to mean 128 and std `spread` (clipped)."""
    x = patch.astype(np.float64)
    std = x.std()
    z = (x - x.mean()) / (std if std > 1e-6 else 1.0)
    return np.rint(128.0 + spread * z).clip(0, 255).astype(np.uint8)


def to_grey(image: np.ndarray) -> np.ndarray:
    """uint8 grey image from a grey or RGB(A) uint8 image (fixed luma weights: deterministic)."""
    if image.ndim == 2:
        return image.astype(np.uint8)
    return np.rint(image[..., :3].astype(np.float64) @ _LUMA).clip(0, 255).astype(np.uint8)


def source_images() -> dict[str, np.ndarray]:
    """The grey source image of every class, read from scikit-image's bundled data."""
    import skimage.data

    return {src.class_name: to_grey(getattr(skimage.data, src.loader)()) for src in SOURCES}


def band_patches(
    image: np.ndarray, band: tuple[int, int], src: SourceImage, patch: int, stride: int
) -> np.ndarray:
    """Top-left (y, x) of the patches lying fully inside rows [band) and passing the background test."""
    y0, y1 = band
    coords = [
        (y, x)
        for y in range(y0, y1 - patch + 1, stride)
        for x in range(0, image.shape[1] - patch + 1, stride)
    ]
    if src.dark_level is not None:
        coords = [
            (y, x)
            for y, x in coords
            if (image[y : y + patch, x : x + patch] < src.dark_level).mean() <= src.max_dark_fraction
        ]
    return np.array(coords, dtype=np.int64).reshape(-1, 2)


def plan(
    images: Mapping[str, np.ndarray], seed: int, patch: int = PATCH, stride: int = STRIDE
) -> dict[str, dict[str, np.ndarray]]:
    """Patch coordinates per class and split, balanced to the rarest class of each split (seeded)."""
    by_class = {}
    for src in SOURCES:
        image = images[src.class_name]
        bands = band_bounds(image.shape[0], FRACTIONS)
        by_class[src.class_name] = {s: band_patches(image, b, src, patch, stride) for s, b in zip(SPLIT_NAMES, bands)}
    rng = np.random.default_rng(seed)
    for split in SPLIT_NAMES:
        # balanced classes: otherwise the largest image (retina) would dominate and accuracy would reward the prior
        n = min(len(c[split]) for c in by_class.values())
        for coords in by_class.values():
            keep = stratified_sample(np.zeros(len(coords[split]), dtype=np.int64), n, rng)
            coords[split] = coords[split][keep]
    return by_class


def load(dparams: DatasetParams, seed: int, raw_dir: Path, patch: int = PATCH, stride: int = STRIDE) -> RawDataset:
    """Grey patches [N, patch, patch] per split, from spatially disjoint bands of each class image."""
    del dparams, raw_dir  # bundled with scikit-image; subset sizes are applied by prepare
    import skimage

    images = source_images()
    coords = plan(images, seed, patch, stride)
    splits = {}
    for split in SPLIT_NAMES:
        xs, ys = [], []
        for label, src in enumerate(SOURCES):
            image = images[src.class_name]
            xs += [normalise_contrast(image[y : y + patch, x : x + patch]) for y, x in coords[src.class_name][split]]
            ys += [label] * len(coords[src.class_name][split])
        splits[split] = (np.stack(xs), np.array(ys, dtype=np.int64))
    regions = {
        src.class_name: {
            "image": f"skimage.data.{src.loader}",
            "shape": list(images[src.class_name].shape),
            "rows": dict(zip(SPLIT_NAMES, map(list, band_bounds(images[src.class_name].shape[0], FRACTIONS)))),
            "patches": {s: len(coords[src.class_name][s]) for s in SPLIT_NAMES},
        }
        for src in SOURCES
    }
    return RawDataset(
        class_names=tuple(src.class_name for src in SOURCES),
        splits=splits,
        info={
            "source": f"skimage.data (scikit-image {skimage.__version__})",
            "source_sha256": {name: array_sha256(img) for name, img in images.items()},
            "patch": patch,
            "stride": stride,
            "contrast": "per-patch: mean 128, std 48",
            "regions": regions,
        },
    )
