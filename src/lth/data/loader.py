"""Batches straight from prepared uint8 tensors: seeded order, random crops done on tensors, no image decoding.

The order and the crops of epoch e depend only on (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from lth.data.store import Split


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The RNG of one epoch: a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + 17)


@dataclass(frozen=True)
class Normalizer:
    """uint8 images -> float, scaled to [0, 1] and standardised per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=images.device, dtype=dtype).view(1, -1, 1, 1)
        inv = 1.0 / torch.tensor(self.std, device=images.device, dtype=dtype).view(1, -1, 1, 1)
        return (images.to(dtype) / 255.0 - mean) * inv


def crop_batch(images: torch.Tensor, size: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Crop a `size` x `size` window at per-image offsets from a uint8 batch [B, C, H, W] with one gather."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    b, c = images.shape[:2]
    ar = torch.arange(size, device=images.device)
    rows = (top.to(images.device).view(b, 1) + ar).view(b, 1, size, 1)
    cols = (left.to(images.device).view(b, 1) + ar).view(b, 1, 1, size)
    bidx = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    cidx = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return images[bidx, cidx, rows, cols]


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central `size` x `size` window of a batch."""
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def train_batches(
    split: Split,
    batch_size: int,
    crop_size: int,
    seed: int,
    epoch: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled uint8 batches with a random crop per image; the last incomplete batch is kept."""
    gen = epoch_generator(seed, epoch)
    n = len(split)
    order = torch.randperm(n, generator=gen)
    h, w = split.images.shape[-2:]
    tops = torch.randint(0, h - crop_size + 1, (n,), generator=gen)
    lefts = torch.randint(0, w - crop_size + 1, (n,), generator=gen)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        images = split.images[idx].to(device, non_blocking=True)
        labels = split.labels[idx].to(device, non_blocking=True)
        yield crop_batch(images, crop_size, tops[idx], lefts[idx]), labels


def eval_batches(
    split: Split, batch_size: int, crop_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Centre-cropped batches in dataset order."""
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device, non_blocking=True)
        labels = split.labels[start : start + batch_size].to(device, non_blocking=True)
        yield center_crop(images, crop_size), labels
