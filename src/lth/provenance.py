"""Versions recorded with every artifact and run: the code's and the data's."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

import lth
from lth.data.store import DATASET_JSON, prepared_dir


def _git(*args: str) -> str:
    """`git ARGS` in the checkout lth runs from, its output stripped; raises when git fails or is absent."""
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The checkout's commit (with '+dirty' when it has uncommitted changes), or '' outside git."""
    try:
        sha = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("+dirty" if dirty else "")


@functools.lru_cache(maxsize=1)
def git_branch() -> str:
    """The checkout's branch, or '' (detached HEAD, outside git)."""
    try:
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
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
