"""Dataset registry: each name maps to a spec, and each spec's origin to the module that reads it.

Adding a dataset = one `DatasetSpec` in `REGISTRY`; adding a new kind of source = one module with a
`load(dparams, seed, raw_dir) -> RawDataset` function and one line in `ORIGINS`. Origin modules are
imported lazily so `lth datasets` stays fast and does not need scikit-image or network access.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import numpy as np

from lth.data import store
from lth.errors import UserError

if TYPE_CHECKING:
    from lth.config import DatasetParams, Params


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is and where it comes from (the preparation itself lives in its origin module)."""

    name: str
    role: Literal["source", "target"]  # source: tickets are found on it; target: tickets transfer to it
    origin: str  # key of ORIGINS: which module reads it
    num_classes: int
    paper_splits: tuple[int, int, int] | None  # (train, val, test) sizes in the paper, None if not given
    description: str
    where: str  # one line for `lth datasets`: where the images come from


@dataclass(frozen=True)
class RawDataset:
    """What an origin returns: uint8 images and int labels per split, before resizing.

    Images are an array [N,H,W] or [N,H,W,C], or a sequence of [H,W,C] arrays of any sizes (decoded lazily,
    e.g. `lth.data.images.ImageFiles`) that supports indexing with an index array.
    """

    class_names: tuple[str, ...]
    splits: Mapping[str, tuple[np.ndarray | Sequence[np.ndarray], np.ndarray]]
    info: Mapping[str, Any] = field(default_factory=dict)  # provenance for meta.json (files, checksums, regions)


def array_sha256(array: np.ndarray) -> str:
    """Checksum of an in-memory source array (for origins bundled in a library rather than a file)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


Origin = Callable[["DatasetParams", int, Path], RawDataset]

# origin name -> "module:function"; the function is the only thing prepare.py calls
ORIGINS: dict[str, str] = {
    "fashion-mnist": "lth.data.fashion_mnist:load",
    "sklearn-digits": "lth.data.digits:load",
    "skimage": "lth.data.bio_textures:load",
    "cifar10": "lth.data.cifar:load_cifar10",
    "cifar100": "lth.data.cifar:load_cifar100",
    "cytomine": "lth.data.cytomine:load",
    "wikiart": "lth.data.wikiart:load",
    "folder": "lth.data.folder:load",
}

_PULL = "`lth pull cytomine --project {project}` from a Cytomine server you can read, or a split/class/image folder"
_BUILD = "`lth build wikiart` manifest over your WikiArt copy{extra}"


def _cytomine(name: str, project: str, splits: tuple[int, int, int], classes: int, what: str) -> DatasetSpec:
    return DatasetSpec(name, "target", "cytomine", classes, splits, f"{what} (Cytomine {project}, Mormont et al. 2018)",
                       _PULL.format(project=project))


def _wikiart(name: str, splits: tuple[int, int, int], classes: int, what: str, extra: str = "") -> DatasetSpec:
    return DatasetSpec(name, "target", "wikiart", classes, splits, what, _BUILD.format(extra=extra))

REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="fashion-mnist",
            role="source",
            origin="fashion-mnist",
            num_classes=10,
            paper_splits=None,  # the paper does not give its source splits
            description="Zalando article photos, 28x28 greyscale, 10 clothing classes",
            where="Debian dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), else torchvision download",
        ),
        DatasetSpec(
            name="digits",
            role="target",
            origin="sklearn-digits",
            num_classes=10,
            paper_splits=None,
            description="UCI handwritten digits, 8x8 greyscale, 1797 images (demo target)",
            where="bundled with scikit-learn (sklearn.datasets.load_digits), offline",
        ),
        DatasetSpec(
            name="bio-textures",
            role="target",
            origin="skimage",
            num_classes=4,
            paper_splits=None,
            description="patches of real microscopy/medical/texture images, one class per image (demo target)",
            where="bundled with scikit-image (skimage.data), offline; spatially disjoint train/val/test regions",
        ),
        *(
            DatasetSpec(name, "source", name, classes, None, f"{title} natural images, 32x32 RGB, {classes} classes",
                        "torchvision download of the official python archive (md5-checked)")
            for name, title, classes in (("cifar10", "CIFAR-10", 10), ("cifar100", "CIFAR-100", 100))
        ),
        _cytomine("human-lba", "ulb_anapath_lba", (4051, 346, 1023), 9, "Human-LBA: human lung cytology cells"),
        _cytomine("lung-tissues", "ulg_lbtd_tissus", (4881, 562, 888), 10, "Lung-Tissues: mouse lung tissue types"),
        _cytomine("mouse-lba", "ulg_lbtd_lba", (1722, 716, 1846), 8, "Mouse-LBA: mouse lung cytology cells"),
        _cytomine("bone-marrow", "ulg_bonemarrow", (522, 130, 639), 8, "Bone-Marrow: human bone-marrow cells"),
        _wikiart("artist-1", (3103, 389, 389), 20, "Artist-Classification-1: 20 WikiArt artists"),
        _wikiart("type", (2868, 360, 360), 20, "Type-Classification: 20 artwork types", " with a 'type' column"),
        _wikiart("artist-2", (2827, 353, 353), 19, "Artist-Classification-2: 19 other artists, images not in Artist-1",
                 " (--exclude-manifest artist-1's)"),
    )
}


def get_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset, or a UserError listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


def get_origin(spec: DatasetSpec) -> Origin:
    """The `load` function of a spec's origin module."""
    try:
        target = ORIGINS[spec.origin]
    except KeyError:
        raise UserError(f"dataset {spec.name!r}: unknown origin {spec.origin!r} (known: {', '.join(ORIGINS)})") from None
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def paper_mismatches(spec: DatasetSpec, num_classes: int, split_sizes: Sequence[int]) -> list[str]:
    """One line per way a user's copy differs from the paper's dataset (class count, split sizes)."""
    problems = []
    if num_classes != spec.num_classes:
        problems.append(f"{spec.name}: your copy has {num_classes} classes, the paper's has {spec.num_classes}")
    if spec.paper_splits is not None and tuple(split_sizes) != spec.paper_splits:
        ours, paper = "/".join(map(str, split_sizes)), "/".join(map(str, spec.paper_splits))
        problems.append(f"{spec.name}: your copy's train/val/test sizes are {ours}, the paper's are {paper}")
    return problems


def dataset_rows(params: "Params") -> list[dict[str, Any]]:
    """One row per registered dataset for `lth datasets`: name, role, classes, paper splits, origin, where, prepared."""
    return [
        {
            "name": spec.name,
            "role": spec.role,
            "classes": spec.num_classes,
            "paper_splits": "/".join(map(str, spec.paper_splits)) if spec.paper_splits else "-",
            "origin": spec.origin,
            "where": spec.where,
            "in_study": spec.name in params.prepare.datasets,
            "prepared": "yes" if store.is_prepared(params.paths.data, spec.name) else "no",
        }
        for spec in REGISTRY.values()
    ]
