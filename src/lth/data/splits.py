"""Seeded, stratified splits and subsets: pure numpy, shared by every origin.

Every function returns sorted index arrays, so the stored order depends only on the origin's order
and the seed, never on hash or dict order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lth.errors import UserError

SPLIT_NAMES = ("train", "val", "test")


def _allocate(class_counts: np.ndarray, size: int) -> np.ndarray:
    """Per-class quotas summing to `size`, proportional to `class_counts` (largest remainder)."""
    total = int(class_counts.sum())
    exact = class_counts * (size / total)
    quota = np.floor(exact).astype(np.int64)
    remainder = size - int(quota.sum())
    if remainder > 0:
        # a stable sort breaks ties by class index, so the allocation never depends on the seed
        order = np.argsort(-(exact - quota), kind="stable")
        quota[order[:remainder]] += 1
    return quota


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a class-proportional random subset of `size` items (all of them if size >= N)."""
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    if size < 0:
        raise ValueError(f"subset size must be >= 0, got {size}")
    classes, inverse = np.unique(labels, return_inverse=True)
    quota = _allocate(np.bincount(inverse, minlength=len(classes)), size)
    chosen = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        chosen.append(rng.permutation(members)[: quota[c]])
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def stratified_split(labels: np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint class-proportional parts of the given sizes (sum <= N), carved one after another."""
    labels = np.asarray(labels)
    if sum(sizes) > len(labels):
        raise ValueError(f"split sizes {list(sizes)} exceed the {len(labels)} items available")
    rng = np.random.default_rng(seed)
    remaining = np.arange(len(labels))
    parts = []
    for size in sizes:
        picked = remaining[stratified_sample(labels[remaining], size, rng)]
        parts.append(picked)
        remaining = np.setdiff1d(remaining, picked, assume_unique=True)
    return parts


def subset(labels: np.ndarray, max_size: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded stratified subset of at most `max_size` items (None: everything)."""
    labels = np.asarray(labels)
    if max_size is None or max_size >= len(labels):
        return np.arange(len(labels))
    return stratified_sample(labels, max_size, np.random.default_rng(seed))


def resolve_sizes(
    dataset: str,
    n: int,
    fractions: Sequence[float],
    requested: Sequence[int | None],
) -> list[int]:
    """Split sizes for carving `n` items: a requested size wins, else floor(fraction * n).

    With nothing requested the last split takes the rounding leftovers, so no item is dropped.
    """
    sizes = [r if r is not None else int(np.floor(f * n)) for f, r in zip(fractions, requested)]
    if all(r is None for r in requested):
        sizes[-1] = n - sum(sizes[:-1])
    if sum(sizes) > n:
        raise UserError(
            f"dataset {dataset!r}: requested split sizes {sizes} need {sum(sizes)} images but only {n} exist; "
            f"lower prepare.datasets.{dataset}.train/val/test"
        )
    return sizes


def class_proportions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of items in each class (for checking that a split kept the proportions)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return counts / max(1, counts.sum())


def band_bounds(length: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering `length` in the given proportions (for spatial splits)."""
    edges = np.round(np.cumsum([0.0, *fractions]) / sum(fractions) * length).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def holdout(labels: np.ndarray, size: int, seed: int, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: a seeded stratified hold-out of `size` items, e.g. validation from training."""
    labels = np.asarray(labels)
    if size >= len(labels):
        raise UserError(f"dataset {dataset!r}: val={size} leaves no training images out of {len(labels)}; lower it")
    (held,) = stratified_split(labels, [size], seed)
    return np.setdiff1d(np.arange(len(labels)), held, assume_unique=True), held


def group_split(groups: Sequence[str], fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split index (0, 1, 2, ...) per item such that items of one group (e.g. one slide) share a split.

    Groups go, largest first (ties in seeded random order), to the split furthest below its share of items.
    """
    names, inverse, counts = np.unique(np.asarray(groups, dtype=str), return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.argsort(-counts[order], kind="stable")]
    targets = np.asarray(fractions, dtype=np.float64) / sum(fractions) * len(inverse)
    filled = np.zeros(len(fractions))
    owner = np.empty(len(names), dtype=np.int64)
    for g in order:
        # an empty split always wins first, so every split gets a group when there are enough groups
        deficit = np.where(filled == 0, np.inf, targets - filled)
        k = int(np.argmax(deficit))
        owner[g] = k
        filled[k] += counts[g]
    return owner[inverse]
