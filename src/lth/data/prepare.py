"""`lth prepare NAME`: origin -> seeded stratified subsets held to the configured sizes -> square 3-channel uint8
-> data/prepared/NAME."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lth.config import DatasetParams, Params, to_dict
from lth.data import store
from lth.data.registry import RawDataset, get_origin, get_spec, paper_mismatches
from lth.data.splits import SPLIT_NAMES, subset
from lth.errors import UserError

RESIZE = "bilinear, antialiased (torch.nn.functional.interpolate on CPU)"
GEOMETRY = {  # prepare.geometry -> what meta.json says was done to a non-square image before the resize
    "stretch": "stretched to a square (aspect ratio not kept)",
    "pad": "padded to a square with black borders, centred (aspect ratio kept, nothing cut)",
    "center-crop": "central square cropped out (aspect ratio kept, the long side's ends cut)",
}
_CHUNK_BYTES = 1 << 28  # float32 bytes resized at once: bounds memory at 224 px while keeping torch's kernels busy
_PULL_ONLY = ("crop_zoom", "crop_max_size")  # DatasetParams that only `lth pull` reads


def _chunk(size: int) -> int:
    return max(1, min(4096, _CHUNK_BYTES // (4 * 3 * size * size)))


def make_square(images: np.ndarray, geometry: str) -> np.ndarray:
    """uint8 [B,H,W,C] -> [B,S,S,C] by `geometry` (stretch: unchanged, the resize does it)."""
    height, width = images.shape[1:3]
    if geometry == "stretch" or height == width:
        return images
    side = min(height, width) if geometry == "center-crop" else max(height, width)
    top, left = abs(height - side) // 2, abs(width - side) // 2
    if geometry == "center-crop":
        return images[:, top:top + side, left:left + side]
    out = np.zeros((len(images), side, side, images.shape[3]), dtype=images.dtype)
    out[:, top:top + height, left:left + width] = images
    return out


def _resize_batch(images: np.ndarray, size: int, geometry: str = "stretch") -> np.ndarray:
    """uint8 [B,H,W,C] (C in 1, 3, 4) -> uint8 [B,3,size,size], made square by `geometry` first."""
    images = make_square(images, geometry)
    batch = torch.from_numpy(np.ascontiguousarray(images[..., :3])).permute(0, 3, 1, 2).float()  # drop alpha
    if batch.shape[-2:] != (size, size):
        # antialias makes downscaling average the source pixels (like area) instead of aliasing;
        # CPU interpolation computes each output pixel independently, so results are bit-reproducible
        with torch.no_grad():
            batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    batch = batch.round_().clamp_(0, 255).to(torch.uint8)
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)  # grey sources feed the same 3-channel networks as RGB ones
    return batch.numpy()


def _with_channels(images: np.ndarray) -> np.ndarray:
    images = images[..., None] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected [N,H,W] or [N,H,W,C] images, got shape {images.shape}")
    return images


def resize_into(out: np.ndarray, images: np.ndarray | Sequence[np.ndarray], desc: str = "resize",
                geometry: str = "stretch") -> None:
    """Fill uint8 out[N,3,S,S] from an image array, or from a sequence of images of any sizes, chunk by chunk."""
    size = out.shape[-1]
    if isinstance(images, np.ndarray):
        images = _with_channels(images)
    step = _chunk(size)
    chunks = range(0, len(images), step)
    for start in tqdm(chunks, desc=desc, unit="chunk", leave=False, disable=None if len(chunks) > 1 else True):
        stop = min(start + step, len(images))
        if isinstance(images, np.ndarray):
            out[start:stop] = _resize_batch(images[start:stop], size, geometry)
        else:  # files decoded one by one: sizes differ, so each is resized on its own
            for i in range(start, stop):
                out[i] = _resize_batch(_with_channels(np.asarray(images[i])[None]), size, geometry)[0]


def to_square_rgb(images: np.ndarray | Sequence[np.ndarray], size: int, desc: str = "resize",
                  geometry: str = "stretch") -> np.ndarray:
    """uint8 [N,H,W] or [N,H,W,C] (or a sequence of images) -> uint8 [N,3,size,size]; grey becomes 3 channels."""
    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    resize_into(out, images, desc, geometry)
    return out


def short_splits(name: str, dparams: DatasetParams, available: dict[str, int]) -> dict[str, list[int]]:
    """{split: [available, asked]} for splits smaller than configured; a UserError unless allow_fewer says keep them."""
    short = {s: [available[s], getattr(dparams, s)] for s in SPLIT_NAMES
             if getattr(dparams, s) is not None and available[s] < getattr(dparams, s)}
    if short and not dparams.allow_fewer:
        split, (have, asked) = next(iter(short.items()))
        raise UserError(
            f"dataset {name!r}: the {split} split has {have} images, prepare.datasets.{name}.{split} asks for {asked}; "
            f"get a larger copy, lower it, or set prepare.datasets.{name}.allow_fewer: true to keep the {have}")
    return short


def apply_subsets(raw: RawDataset, dparams: DatasetParams, seed: int) -> dict[str, tuple[Any, np.ndarray]]:
    """Each split cut to its requested size (stratified, seeded); a split smaller than asked (allow_fewer) stays whole."""
    out = {}
    for offset, split in enumerate(SPLIT_NAMES):
        images, labels = raw.splits[split]
        # a distinct seed per split, so equal-sized splits do not draw the same positions
        idx = subset(labels, getattr(dparams, split), seed + offset)
        out[split] = (images[idx], np.asarray(labels)[idx].astype(np.int64))
    return out


def _source_size(images: np.ndarray | Sequence[np.ndarray]) -> list[int] | str:
    return list(images.shape[1:3]) if isinstance(images, np.ndarray) else "per file (decoded at prepare time)"


def prepare_dataset(name: str, params: Params) -> Path:
    """Read dataset `name` from its origin, subset, resize and write data/prepared/NAME; returns that folder."""
    spec = get_spec(name)
    dparams = params.prepare.datasets.get(name, DatasetParams())
    seed, size, geometry = params.prepare.seed, params.prepare.image_size, params.prepare.geometry
    raw_dir = Path(params.paths.data) / "raw" / name
    raw = get_origin(spec)(dparams, seed, raw_dir)
    available = {s: int(len(raw.splits[s][1])) for s in SPLIT_NAMES}
    short = short_splits(name, dparams, available)  # before any writing: a set too small leaves nothing behind
    chosen = apply_subsets(raw, dparams, seed)
    sizes = {s: int(len(chosen[s][1])) for s in SPLIT_NAMES}
    mismatches = paper_mismatches(spec, len(raw.class_names), [sizes[s] for s in SPLIT_NAMES])
    requested = {k: v for k, v in to_dict(dparams).items() if k not in _PULL_ONLY or v is not None}
    info: dict[str, Any] = {
        "origin": spec.origin,
        "role": spec.role,
        "seed": seed,
        "requested": requested,
        "available": available,
        "sizes": sizes,
        "fewer_than_requested": short,
        "paper_mismatches": mismatches,
        "source_image_size": _source_size(raw.splits["train"][0]),
        "geometry": geometry,
        "geometry_detail": GEOMETRY[geometry],
        "resize": RESIZE,
        **dict(raw.info),
    }
    with store.writing(params.paths.data, name, raw.class_names) as writer:
        for split, (images, labels) in chosen.items():
            resize_into(writer.images(split, len(labels), size), images, desc=f"{name}/{split}", geometry=geometry)
            writer.labels(split, labels)
        writer.finish(info)
    warnings = mismatches + [f"{name}: kept {have} {split} images, fewer than the {asked} asked (allow_fewer)"
                             for split, (have, asked) in short.items()]
    for line in warnings:  # after the work, so that a failed prepare prints only its one error line
        click.echo(f"lth: warning: {line}", err=True)
    return store.prepared_dir(params.paths.data, name)
