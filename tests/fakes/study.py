"""Running the real `lth` entry point in a throw-away study under tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lth.cli import main
from lth.data import store


def lth(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the real console entry point; (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lth", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def last_line(err: str) -> str:
    """The one error line (download progress bars may come before it), checked to be the only error."""
    assert err.count("lth: error:") == 1, err
    return err.strip().splitlines()[-1]


def prepared(tmp_path: Path, name: str) -> store.PreparedDataset:
    """The dataset prepared under tmp_path/data (checksums verified)."""
    return store.load_prepared(tmp_path / "data", name)
