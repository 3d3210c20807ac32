"""A tiny study on disk for tests that run the real `lth` executable: params file, prepared data, environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import make_dataset, tiny_raw

BIN = Path(sys.executable).parent


def write_study(root: Path, **overrides) -> Path:
    """tiny.yaml (tracking to root/mlflow.db) and the two tiny prepared datasets under root; returns the params path."""
    raw = tiny_raw(root, **{"tracking": {"register": False, "uri": f"sqlite:///{root / 'mlflow.db'}"}, **overrides})
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    if not (root / "data" / "prepared" / "fashion-mnist").is_dir():
        make_dataset(root / "data", "fashion-mnist", 4, seed=1)
        make_dataset(root / "data", "digits", 3, seed=2)
    return path


def lth_env(**extra: str) -> dict[str, str]:
    """The environment of a user with the venv on PATH and no tracking server configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", TQDM_DISABLE="1", PYTHONHASHSEED="0",
               GIT_PYTHON_REFRESH="quiet", OMP_NUM_THREADS="1", **extra)
    return env


def run_lth(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`lth ARGS` in `cwd`, output captured."""
    return subprocess.run([str(BIN / "lth"), *args], cwd=cwd, env=env or lth_env(), capture_output=True,
                          text=True, timeout=timeout)
