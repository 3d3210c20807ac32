"""Headless Chromium driven over the DevTools protocol (aiohttp's websocket client; no Selenium or Playwright).

For pages that render with JavaScript after the load event (MLflow's UI): open a URL, wait until a script
says the page is ready, read text from the page, take a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp

T = TypeVar("T")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One browser tab: evaluate scripts, wait for a condition, capture a screenshot."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._next = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are skipped)."""
        self._next += 1
        await self.ws.send_str(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=60)).data)
            if msg.get("id") == self._next:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, script: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = await self.send("Runtime.evaluate", expression=script, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, script: str, timeout: float) -> bool:
        """Poll `script` until it is truthy; False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.evaluate(f"!!({script})"):
                return True
            await asyncio.sleep(0.5)
        return False

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the viewport."""
        data = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))
        return path


async def _open(port: int, url: str) -> tuple[aiohttp.ClientSession, Page]:
    session = aiohttp.ClientSession()
    async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
        targets = await resp.json(content_type=None)
    ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
    page = Page(await session.ws_connect(ws_url, max_msg_size=0))
    await page.send("Page.enable")
    await page.send("Runtime.enable")
    await page.send("Page.navigate", url=url)
    return session, page


def launch(profile: Path, width: int = 1600, height: int = 1000) -> tuple[subprocess.Popen[str], int]:
    """Headless Chromium with a DevTools port (read from its stderr); returns (process, port)."""
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
           f"--window-size={width},{height}", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("chromium did not open its DevTools port")


def browse(url: str, profile: Path, steps: Callable[[Page], Awaitable[T]]) -> T:
    """Open `url` in a fresh headless Chromium and run `steps` on the page; returns what they return."""
    proc, port = launch(profile)

    async def go() -> T:
        session, page = await _open(port, url)
        try:
            return await steps(page)
        finally:
            await page.ws.close()
            await session.close()

    try:
        return asyncio.run(go())
    finally:
        proc.kill()
        proc.wait()
