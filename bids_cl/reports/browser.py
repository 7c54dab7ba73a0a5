"""Open a report in headless Chromium: render check (tests) and screenshots (docs).

Only the ``chromium`` command line is used (``--dump-dom``, ``--screenshot``), no DevTools client. The
pages carry a script that, on ``load``, writes image and table counts and any error into a hidden
``<div id="render-check">``; ``render_check`` reads it back from the dumped DOM and adds the console
lines Chromium printed (``--enable-logging=stderr``).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium is not installed")
    with tempfile.TemporaryDirectory(prefix="bids_cl-chromium-") as profile:
        return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)


def render_check(page: str | Path, *, timeout: float = 60.0) -> dict[str, Any]:
    """Load ``page`` and return ``{images, imagesOk, broken, errors, tables, console, dom}``.

    ``console`` holds every console message Chromium logged (the pages log none when healthy).
    Raises ``RuntimeError`` when the check element is absent (the page did not finish loading).
    """
    uri = Path(page).resolve().as_uri()
    proc = _run(["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
                 "--dump-dom", uri], timeout)
    match = re.search(r'<div id="render-check"[^>]*>(.*?)</div>', proc.stdout, re.S)
    if match is None:
        raise RuntimeError(f"no render-check element in {page} (exit {proc.returncode}); "
                           f"stderr tail: {proc.stderr[-2000:]}")
    result = json.loads(html.unescape(match.group(1)))
    result["console"] = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    result["dom"] = proc.stdout
    return result


def screenshot(page: str | Path, out_png: str | Path, *, width: int = 1280, height: int = 1600,
               timeout: float = 60.0) -> Path:
    """PNG screenshot of the top ``width`` x ``height`` pixels of ``page``."""
    out_png = Path(out_png).resolve()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    proc = _run([f"--window-size={width},{height}", "--virtual-time-budget=10000",
                 f"--screenshot={out_png}", Path(page).resolve().as_uri()], timeout)
    if not out_png.exists():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    return out_png
