"""The report page in headless Chromium: it renders, shows its tables, and every figure loads without console errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from helpers import write_results

from lth.report.build import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")

# Appended to a copy of the page: every image that failed to load becomes a console error Chromium logs.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) console.error("broken image: " + img.getAttribute("src"));
  }
  console.log("images checked: " + document.images.length);
});
</script>"""


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on a local page, console messages logged to stderr."""
    cmd = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
        *args, page.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def console(stderr: str) -> list[str]:
    """The page's console messages (and uncaught JS errors) from Chromium's log."""
    return re.findall(r":CONSOLE[^\]]*\] (.*)", stderr)


def instrumented(index: Path, name: str, broken: bool = False) -> Path:
    """A copy of the page beside it with the image check appended (optionally with one image path broken)."""
    text = index.read_text().replace("</body>", IMAGE_CHECK + "</body>")
    if broken:
        text = text.replace('src="figures/', 'src="figures/missing-', 1)
    copy = index.with_name(name)
    copy.write_text(text)
    return copy


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    return build_report(write_results(tmp, seeds=(0, 1)))


def test_report_renders_to_a_non_blank_screenshot(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    run = chromium(report, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.is_file() and shot.stat().st_size > 0
    with Image.open(shot) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (1280, 2000)
        colours = rgb.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50  # text, tables and plots, not a blank page
    assert console(run.stderr) == []  # no JS errors on the page itself


def test_report_dom_has_both_tables_and_every_figure(report: Path, tmp_path: Path) -> None:
    dom = chromium(report, tmp_path / "profile", "--dump-dom").stdout
    for table_id in ("table2", "table3", "missing"):
        assert f'<table id="{table_id}">' in dom
    assert dom.count("<tr>") > 2 * 8  # 8 best models in Table 2 and again in Table 3
    srcs = re.findall(r'<img src="([^"]+)"', dom)
    assert len(srcs) == 5 and all((report.parent / s).is_file() for s in srcs)


def test_every_figure_loads_in_the_browser(report: Path, tmp_path: Path) -> None:
    good = chromium(instrumented(report, "check.html"), tmp_path / "p1", "--dump-dom")
    messages = console(good.stderr)
    assert len(messages) == 1 and messages[0].startswith('"images checked: 5"'), messages
    # the check itself works: a page with one broken path is caught
    bad = chromium(instrumented(report, "check-broken.html", broken=True), tmp_path / "p2", "--dump-dom")
    assert any("broken image: figures/missing-" in line for line in console(bad.stderr))
