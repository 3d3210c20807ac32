"""`lth ui`: MLflow's web UI over the study's runs, opened on the runs table (not MLflow's GenAI view)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import webbrowser
from pathlib import Path

import click

from lth.cli.options import PARAMS_OPTION
from lth.config import load_params


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (local only by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="Port to listen on.")
@click.option("--open/--no-open", "open_browser", default=False, show_default=True,
              help="Open the first experiment's runs in the default browser.")
@PARAMS_OPTION
def ui(host: str, port: int, open_browser: bool, params_path: str) -> None:
    """Start MLflow's UI over the study's store and print the URL of each experiment's runs table."""
    from lth.tracking.mlflow.store import Store, redact
    from lth.tracking.mlflow.ui import start_server, study_pages, wait_ready

    params = load_params(Path(params_path))
    store = Store(params.tracking)
    serve = store.uri.startswith(("sqlite:", "file:", "postgresql", "mysql"))  # a server URI is already a UI
    base = f"http://{host}:{port}" if serve else redact(store.uri).rstrip("/")
    proc = start_server(store.uri, host, port) if serve else None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the server too (the finally below)
    try:
        if proc is not None:
            wait_ready(proc, base)
        pages = study_pages(params, base, store)
        if not pages:
            click.echo(f"MLflow UI at {base} (no runs of this study yet: run `make demo` or `lth imp SOURCE`)")
        for page in pages:
            click.echo(f"{page.experiment:<24} {page.url}")
        if open_browser and pages:
            webbrowser.open(pages[0].url)
        if proc is not None:
            click.echo("Ctrl-C stops the UI.")
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc is not None:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and its workers (its own process group): politely, then for good after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # workers that outlive the server, or a server that hangs
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
