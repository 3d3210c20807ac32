"""Downloads through torchvision's own fetchers: checksums verified, nothing half-written in data/raw/."""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError

from lth.errors import UserError
from lth.fsutil import atomic_dir

# torchvision says this when a file's md5 differs from the one it expects (utils.download_url / check_integrity)
_CHECKSUM_SIGNS = ("corrupted", "md5")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def torchvision_fetch(dataset: str, fetch: Callable[[Path], object], raw_dir: Path, hint: str) -> None:
    """Run `fetch(folder)` (a torchvision download) in a temporary folder that becomes `raw_dir` only on success.

    A failed or interrupted download leaves `raw_dir` as it was; each failure is one UserError line.
    """
    try:
        with atomic_dir(raw_dir) as tmp:
            fetch(tmp)
            # the archive's members were checked by torchvision after extraction; keep one copy on disk
            for archive in tmp.glob("*.tar.gz"):
                archive.unlink()
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise UserError(f"dataset {dataset!r}: the downloaded archive is corrupt ({_one_line(exc)}); {hint}") from None
    except RuntimeError as exc:
        message = str(exc)
        if any(sign in message for sign in _CHECKSUM_SIGNS) and "urlopen error" not in message:
            raise UserError(
                f"dataset {dataset!r}: checksum mismatch, the downloaded file is not the published one "
                f"({_one_line(exc)}); {hint}"
            ) from None
        raise UserError(f"dataset {dataset!r}: download failed ({_one_line(exc)}); {hint}") from None
    except (URLError, OSError) as exc:
        raise UserError(f"dataset {dataset!r}: download failed ({_one_line(exc)}); {hint}") from None
