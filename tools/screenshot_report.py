"""Screenshot an HTML report with headless Chromium, to check how it reads.

    python tools/screenshot_report.py runs/report-20261125-0130/report.html /tmp/report.png
    python tools/screenshot_report.py REPORT_HTML OUT_PNG --width 1200 --height 2600

Needs Chromium (Debian: ``apt-get install -y chromium``); looks for ``$CHROMIUM``, then
``chromium``, ``chromium-browser``, ``google-chrome`` on PATH. Nothing is fetched from the
network: the report is a local file and its PNGs sit next to it. Exit code 0 when OUT_PNG was
written, 2 when Chromium is missing or failed (with its last output lines).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def screenshot(
    html: Path, out: Path, width: int = 1200, height: int = 2000, timeout: float = 60
) -> Path:
    """Render ``html`` into ``out`` (PNG); RuntimeError when Chromium is missing or fails."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("no Chromium found (apt-get install -y chromium, or set $CHROMIUM)")
    html, out = Path(html).resolve(), Path(out).resolve()
    if not html.is_file():
        raise RuntimeError(f"{html}: no such file")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    with tempfile.TemporaryDirectory(prefix="lssfl-chromium-") as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={out}",
            f"--window-size={width},{height}",
            html.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not out.is_file() or out.stat().st_size == 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"chromium exited with {proc.returncode} and wrote no {out}:\n{tail}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Screenshot an HTML report with headless Chromium.")
    p.add_argument("html", type=Path, metavar="REPORT_HTML")
    p.add_argument("out", type=Path, metavar="OUT_PNG")
    p.add_argument("--width", type=int, default=1200, help="window width in px (default 1200)")
    p.add_argument("--height", type=int, default=2000, help="window height in px (default 2000)")
    args = p.parse_args(argv)
    try:
        path = screenshot(args.html, args.out, args.width, args.height)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"screenshot_report: {exc}", file=sys.stderr)
        return 2
    print(f"screenshot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
