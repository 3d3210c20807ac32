"""`lth prepare NAME`: origin -> seeded stratified subsets -> square 3-channel uint8 -> data/prepared/NAME."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lth.config import DatasetParams, Params, to_dict
from lth.data import store
from lth.data.registry import RawDataset, get_origin, get_spec
from lth.data.splits import SPLIT_NAMES, subset

RESIZE = "bilinear, antialiased (torch.nn.functional.interpolate on CPU)"
_CHUNK = 4096  # images resized at once: bounds memory at 224 px while keeping torch's kernels busy


def to_square_rgb(images: np.ndarray, size: int, desc: str = "resize") -> np.ndarray:
    """uint8 [N,H,W] or [N,H,W,C] -> uint8 [N,3,size,size]; grey is repeated to 3 channels."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected [N,H,W] or [N,H,W,C] images, got shape {images.shape}")
    images = images[..., :3]  # drop alpha
    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    chunks = range(0, len(images), _CHUNK)
    for start in tqdm(chunks, desc=desc, unit="chunk", leave=False, disable=None if len(chunks) > 1 else True):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + _CHUNK])).permute(0, 3, 1, 2).float()
        if batch.shape[-2:] != (size, size):
            # antialias makes downscaling average the source pixels (like area) instead of aliasing;
            # CPU interpolation computes each output pixel independently, so results are bit-reproducible
            with torch.no_grad():
                batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        batch = batch.round_().clamp_(0, 255).to(torch.uint8)
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)  # grey sources feed the same 3-channel networks as RGB ones
        out[start : start + len(batch)] = batch.numpy()
    return out


def apply_subsets(raw: RawDataset, dparams: DatasetParams, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split cut to its requested size (stratified, seeded); a split smaller than asked stays whole."""
    out = {}
    for offset, split in enumerate(SPLIT_NAMES):
        images, labels = raw.splits[split]
        # a distinct seed per split, so equal-sized splits do not draw the same positions
        idx = subset(labels, getattr(dparams, split), seed + offset)
        out[split] = (images[idx], np.asarray(labels)[idx].astype(np.int64))
    return out


def prepare_dataset(name: str, params: Params) -> Path:
    """Read dataset `name` from its origin, subset, resize and write data/prepared/NAME; returns that folder."""
    spec = get_spec(name)
    dparams = params.prepare.datasets.get(name, DatasetParams())
    seed, size = params.prepare.seed, params.prepare.image_size
    raw_dir = Path(params.paths.data) / "raw" / name
    raw = get_origin(spec)(dparams, seed, raw_dir)
    if len(raw.class_names) != spec.num_classes:
        raise RuntimeError(f"{name}: origin gave {len(raw.class_names)} classes, registry says {spec.num_classes}")
    chosen = apply_subsets(raw, dparams, seed)
    splits = {s: (to_square_rgb(x, size, desc=f"{name}/{s}"), y) for s, (x, y) in chosen.items()}
    info: dict[str, Any] = {
        "origin": spec.origin,
        "role": spec.role,
        "seed": seed,
        "requested": to_dict(dparams),
        "available": {s: int(len(raw.splits[s][1])) for s in SPLIT_NAMES},
        "source_image_size": list(raw.splits["train"][0].shape[1:3]),
        "resize": RESIZE,
        **dict(raw.info),
    }
    return store.write_prepared(params.paths.data, name, splits, list(raw.class_names), info=info)
