"""Headless Chromium for the report tests: the DOM after the page's script ran, and screenshots.

Without Chromium the tests fail and say how to install it (`.ci/run` installs it when it is missing)."""

from __future__ import annotations

import html.parser
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars")


def chromium() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        pytest.fail("the report tests need headless Chromium: install it with `apt-get install chromium` (Debian; "
                    "`bash .ci/run` installs it when it is missing)")
    return found


def chromium_dom(page: Path, fragment: str = "") -> str:
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    proc = subprocess.run([chromium(), *FLAGS, "--virtual-time-budget=3000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


def chromium_screenshot(page: Path, out: Path, *, width: int, height: int):
    """The page rendered at width x height, as an RGB float array in [0, 1]."""
    import matplotlib.image

    proc = subprocess.run([chromium(), *FLAGS, f"--window-size={width},{height}", f"--screenshot={out}",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]
    return matplotlib.image.imread(out)[:, :, :3]


class _HardEntries(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.entries: list[tuple[str, bool]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "hard" in (a.get("class") or "").split():
            self.entries.append((a.get("data-skills", ""), "hidden" in a))


def hard_entries(dom: str) -> list[tuple[str, bool]]:
    """(data-skills, hidden) of every hard-question entry in a dumped DOM."""
    parser = _HardEntries()
    parser.feed(dom)
    return parser.entries
