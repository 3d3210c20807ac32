"""Image files decoded on demand: a lazy sequence that prepare reads one chunk at a time."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from lth.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def decode_image(path: str | Path) -> np.ndarray:
    """uint8 [H, W, 3] pixels of an image file; a truncated or corrupt file is a UserError naming it."""
    from PIL import Image

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # Pillow decodes lazily: truncation only shows here
                return np.array(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path}: image file missing") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"{path}: truncated or corrupt image ({' '.join(str(exc).split())}); replace it") from None


class ImageFiles(Sequence[np.ndarray]):
    """Paths that read as uint8 [H, W, 3] arrays when indexed; an index array gives another ImageFiles."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice | np.ndarray | Sequence[int]) -> ImageFiles: ...

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        if isinstance(index, (int, np.integer)):
            return decode_image(self.paths[int(index)])
        if isinstance(index, slice):
            return ImageFiles(self.paths[index])
        return ImageFiles([self.paths[int(i)] for i in np.asarray(index).reshape(-1)])

    def __iter__(self) -> Iterator[np.ndarray]:
        return (decode_image(p) for p in self.paths)
