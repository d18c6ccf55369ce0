"""report.html as a reader sees it: headless Chromium renders the demo report (DOM and screenshot).

Skips, saying why, only where no Chromium can be had; ``.ci/run`` installs the Debian package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from markupsafe import escape
from PIL import Image

from eqaudit.gate import shown
from eqaudit.reports import write_report
from eqaudit.reports.html import FAIR_SCORE, GOOD_SCORE, render_html

from . import HOSTILE_CLASS, HOSTILE_LAYER, built_result, demo_result

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no headless browser: install the Debian package 'chromium' (.ci/run does) "
    "to check the HTML report as a reader sees it",
)
WINDOW = (1400, 3000)
#: The score's colour by level, as in report.css.
SCORE_COLOURS = {"good": (6, 118, 71), "fair": (181, 71, 8), "poor": (180, 35, 24)}


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def console_errors(stderr: str) -> list[str]:
    """Lines in which the page spoke to the console (it has no scripts, so any is a fault)."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("browser_demo")
    write_report(demo_result(), folder)
    return folder / "report.html"


@pytest.fixture(scope="module")
def dom(demo_page: Path, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    return chromium(demo_page, tmp_path_factory.mktemp("profile_dom"), "--dump-dom")


@pytest.fixture(scope="module")
def screenshot(
    demo_page: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess]:
    png = tmp_path_factory.mktemp("shots") / "report.png"
    done = chromium(
        demo_page,
        tmp_path_factory.mktemp("profile_shot"),
        f"--screenshot={png}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--hide-scrollbars",
    )
    return png, done


def test_rendered_dom_shows_score_table_and_curve(dom: subprocess.CompletedProcess) -> None:
    html = dom.stdout
    result = demo_result()
    score = re.search(r'id="robustness-score">([0-9.]+)<', html)
    assert score is not None and score.group(1) == shown(result.score)  # as the console prints it
    table = html[html.index('id="outputs-table"') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr") == 1 + len(result.outputs)  # header + one row per element
    curve = html[html.index('id="layer-curve"') :]
    curve = curve[: curve.index("</figure>")]
    assert "<svg" in curve and "<path" in curve and "relative error" in curve
    assert "<script" not in html.lower()


def test_no_console_errors(
    dom: subprocess.CompletedProcess, screenshot: tuple[Path, subprocess.CompletedProcess]
) -> None:
    assert console_errors(dom.stderr) == []
    assert console_errors(screenshot[1].stderr) == []


def test_screenshot_shows_the_score(screenshot: tuple[Path, subprocess.CompletedProcess]) -> None:
    png, _ = screenshot
    image = Image.open(png).convert("RGB")
    assert image.size == WINDOW
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, charts and thumbnails, not blank
    score = demo_result().score
    level = "good" if score >= GOOD_SCORE else "fair" if score >= FAIR_SCORE else "poor"
    top = image.crop((0, 0, WINDOW[0], 900))  # the headline card is above the fold
    assert top.getcolors(maxcolors=1 << 20) is not None
    assert any(c == SCORE_COLOURS[level] for _, c in top.getcolors(maxcolors=1 << 20))


def test_hostile_names_stay_text_in_the_browser(tmp_path: Path) -> None:
    page = tmp_path / "hostile.html"
    page.write_text(render_html(built_result(30, hostile=True)), encoding="utf-8")
    done = chromium(page, tmp_path / "profile", "--dump-dom")
    html = done.stdout
    assert console_errors(done.stderr) == []
    # An element would serialise its attribute quoted; the class name is only text.
    assert "<script" not in html.lower() and 'onerror="' not in html
    assert str(escape(HOSTILE_LAYER)) in html and str(escape(HOSTILE_CLASS)) in html
    assert re.search(r"<img[^>]*\bsrc=\"x\"", html) is None
