"""A project's files as bytes, and scratch projects built from them: how work moves to a host without our filesystem.

A remote worker gets its inputs as "<root>/<path under it>" -> bytes, writes them into a scratch project of its
own (the same layout under a temporary directory) and runs the same code a local run runs there.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from lth.config import Params, PathsConfig

ROOTS = ("data", "models", "results")  # the project roots a unit reads from or writes to
Files = dict[str, bytes]  # "<root>/<path under it>" -> content


def file_key(path: Path, params: Params) -> str:
    """The root-relative name of a project file, e.g. models/tickets/x/seed0/round00/mask.safetensors."""
    for root in ROOTS:
        base = Path(getattr(params.paths, root))
        if path.is_relative_to(base):
            return f"{root}/{path.relative_to(base).as_posix()}"
    raise ValueError(f"{path} is under none of the project roots {ROOTS}")


def key_path(key: str, params: Params) -> Path:
    """The path of a root-relative name in the project `params` describes."""
    root, _, rest = key.partition("/")
    return Path(getattr(params.paths, root)) / rest


def read_files(path: Path, params: Params) -> Files:
    """A file, or every file under a directory, as root-relative name -> bytes."""
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {file_key(p, params): p.read_bytes() for p in paths}


def scratch_params(params: Params, root: Path) -> Params:
    """The same study with every path under `root` (a worker's own scratch project)."""
    return replace(params, paths=PathsConfig(**{name: str(root / name) for name in (*ROOTS, "reports")}))


@contextlib.contextmanager
def scratch_project(params: Params, inputs: Files) -> Iterator[Params]:
    """A temporary project holding `inputs`; yields its params, removes it on leaving."""
    root = Path(tempfile.mkdtemp(prefix="lth-unit-"))
    try:
        scratch = scratch_params(params, root)
        for key, content in inputs.items():
            dest = key_path(key, scratch)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
        yield scratch
    finally:
        shutil.rmtree(root, ignore_errors=True)
