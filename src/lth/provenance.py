"""Versions recorded with every artifact and run: the code's and the data's."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

import lth
from lth.data.store import DATASET_JSON, prepared_dir


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The checkout's commit (with '+dirty' when it has uncommitted changes), or '' outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("+dirty" if dirty else "")


@functools.lru_cache(maxsize=1)
def git_branch() -> str:
    """The checkout's branch, or '' (detached HEAD, outside git)."""
    root = Path(__file__).resolve().parents[2]
    try:
        branch = subprocess.run(["git", "-C", str(root), "rev-parse", "--abbrev-ref", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return "" if branch == "HEAD" else branch


def code_version() -> str:
    """Package version plus the git commit when known."""
    commit = git_commit()
    return f"{lth.__version__}" + (f"@{commit[:12]}" if commit else "")


def data_version(data_root: str | Path, name: str) -> str:
    """sha256 of the prepared dataset's meta.json (which holds every array's checksum)."""
    path = prepared_dir(data_root, name) / DATASET_JSON
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
