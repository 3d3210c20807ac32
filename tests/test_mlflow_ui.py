"""MLflow's UI as a user sees it (end-to-end): `lth ui` prints URLs that open the runs table, not the GenAI view;
runs show their Dataset and Source; a registered ticket shows its description and signature.

A small study is run through the real CLI, `lth ui` serves its store on 127.0.0.1, and headless Chromium
(driven over the DevTools protocol, tests/cdp.py) renders the pages. Screenshots are saved under the test's
tmp dir; with LTH_SCREENSHOTS=DIR they are also copied there (docs/img for the README).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cdp import CHROMIUM, Page, browse
from helpers import make_dataset, tiny_raw

from lth.data.store import read_dataset_meta
from lth.tracking.inputs import split_digest

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")]

LTH = shutil.which("lth")
LOADED = "/matching run|No data available/.test(document.body.innerText)"  # runs table, or the GenAI overview
EXPAND = """(() => { const b = document.querySelectorAll('button[data-component-id*="runnamecellrenderer"]');
  b.forEach(x => x.click()); return b.length; })()"""
CLOSE_ASSISTANT = """(() => { const b = document.querySelector('button[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (b) b.click(); return !!b; })()"""
# Every rendered grid row as {column id: text}; ag-grid splits a row into pinned and scrolling parts.
CELLS = """(() => { const rows = {};
  document.querySelectorAll('[role=row][row-index]').forEach(r => {
    const i = r.getAttribute('row-index'); rows[i] = rows[i] || {};
    r.querySelectorAll('[role=gridcell]').forEach(c => { rows[i][c.getAttribute('col-id')] = c.innerText.trim(); });
  });
  return Object.values(rows); })()"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lth(root: Path, *args: str) -> None:
    subprocess.run([str(LTH), *args], cwd=root, check=True, capture_output=True, text=True, timeout=600,
                   env=os.environ | {"TQDM_DISABLE": "1"})


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A demo-sized study run by the CLI (IMP on fashion-mnist, two arms on digits), served by `lth ui`."""
    root = tmp_path_factory.mktemp("ui")
    raw = tiny_raw(root, tracking={"register": True, "system_metrics": False},
                   transfer={"arms": ["scratch", "transfer"], "seeds": [0]})
    raw["paths"] = {k: k for k in ("data", "models", "results", "reports")}  # relative, as in the project
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text('[core]\n    remote = store\n[\'remote "store"\']\n    url = s3://bucket/lth\n')
    make_dataset(root / "data", "fashion-mnist", 4, seed=1)
    make_dataset(root / "data", "digits", 3, seed=2)
    lth(root, "imp", "fashion-mnist", "--seed", "0")
    lth(root, "transfer", "digits")
    proc = subprocess.Popen([str(LTH), "ui", "--port", str(free_port())], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore
    urls: dict[str, str] = {}
    deadline = time.monotonic() + 240  # `mlflow ui` needs ~15 s alone, much more on a busy machine
    try:
        while "transfer/digits" not in urls and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if m := re.match(r"(\S+)\s+(http://\S+)$", line.strip()):
                urls[m.group(1)] = m.group(2)
        assert "imp/fashion-mnist" in urls and "transfer/digits" in urls, f"`lth ui` printed no study URLs: {urls}"
        yield {"root": root, "urls": urls, "base": urls["imp/fashion-mnist"].split("/#/")[0]}
    finally:
        proc.send_signal(signal.SIGTERM)  # `lth ui` stops its server on the way out
        proc.wait(timeout=60)


def save_shot(shot: Path) -> None:
    """Copy a screenshot to $LTH_SCREENSHOTS (docs/img when refreshing the README's pictures)."""
    if out := os.environ.get("LTH_SCREENSHOTS"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / shot.name)


def test_the_printed_url_opens_the_imp_runs_with_their_dataset_and_source(ui: Any, tmp_path: Path) -> None:
    shot = tmp_path / "mlflow-runs.png"

    async def steps(page: Page) -> dict[str, Any]:
        assert await page.wait_for(LOADED, 90), "the experiment page never finished loading"
        seen = {"href": await page.evaluate("location.href"), "text": await page.evaluate("document.body.innerText")}
        await page.wait_for("document.querySelector('button[data-component-id*=runnamecellrenderer]')", 20)
        await page.evaluate(EXPAND)  # the nested rounds under the job's parent run
        await page.wait_for("document.body.innerText.includes('imp fashion-mnist s0 r02')", 20)
        await page.evaluate(CLOSE_ASSISTANT)
        await page.wait_for("!document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')", 5)
        seen["rows"] = await page.evaluate(CELLS)
        await page.screenshot(shot)
        return seen

    seen = browse(ui["urls"]["imp/fashion-mnist"], tmp_path / "profile", steps)
    save_shot(shot)
    # the training view, not MLflow's GenAI overview of traces
    assert "workflowType=machine_learning" in seen["href"] and "/overview" not in seen["href"], seen["href"]
    assert "No data available" not in seen["text"] and "Detect Issues" not in seen["text"]
    rows = {re.sub(r"^#\w+\s*", "", r.get("attributes.`Run Name`", "")): r for r in seen["rows"]}
    names = ["imp fashion-mnist s0"] + [f"imp fashion-mnist s0 r{k:02d}" for k in range(3)]
    assert set(names) <= set(rows), sorted(rows)
    meta = read_dataset_meta(ui["root"] / "data", "fashion-mnist")
    for name in names:
        dataset, source = rows[name].get("attributes.`Dataset`", ""), rows[name].get("attributes.`Source`", "")
        assert dataset.startswith(f"fashion-mnist ({split_digest(meta, 'train')})\nTrain"), (name, dataset)
        assert source == "lth imp fashion-mnist --seed 0", (name, source)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_a_registered_ticket_shows_its_description_and_signature(ui: Any, tmp_path: Path) -> None:
    shot = tmp_path / "mlflow-ticket.png"
    url = f"{ui['base']}/#/models/ticket-fashion-mnist-resnet8w4/versions/3"

    async def steps(page: Page) -> str:
        assert await page.wait_for("document.body.innerText.includes('Ticket of')", 90), "no description shown"
        await page.evaluate(CLOSE_ASSISTANT)
        await page.wait_for("document.body.innerText.includes('Inputs (1)')", 20)  # the signature's schema
        await page.screenshot(shot)
        return str(await page.evaluate("document.body.innerText"))

    text = browse(url, tmp_path / "profile", steps)
    save_shot(shot)
    assert "seed 0, IMP round 2" in text and "lth tickets fetch --source fashion-mnist --seed 0" in text
    assert "load_ticket(" in text
    assert re.search(r"@\s*r02-s0", text), "alias not shown"
    assert "Inputs (1)" in text and "Outputs (1)" in text
