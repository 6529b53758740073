"""Screenshot a quantflow report.html in headless Chromium (docs/report.png in the README).

    python tools/report_screenshot.py OUT_DIR [-o docs/report.png] [--width 1280]
    python tools/report_screenshot.py --compile zoo:resnet_fmnist [-o docs/report.png]

With an OUT_DIR (written by `quantflow compile -o`), it renders OUT/report.html again from
report.json and screenshots it at a laptop width; with --compile it compiles the model first
into a temporary folder. The PNG is palette-quantized when Pillow is installed (a screenshot
of flat colours loses nothing visible and shrinks several times).

The helpers `chromium()`, `load()` and `screenshot()` are what tests/test_report_html.py
drives the browser with: one place that knows Chromium's headless flags.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: Chromium's flags for a headless run in a container: no sandbox (no user namespaces),
#: no GPU, and console messages on stderr (INFO:CONSOLE lines)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", "--disable-extensions", "--enable-logging=stderr", "--v=0")


def chromium() -> str | None:
    """The Chromium binary, or None where none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@dataclass(frozen=True)
class Loaded:
    """What the browser made of a page: the DOM after load, its console messages."""

    dom: str
    console: list[str]


def _run(args: list[str], profile: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def load(page: Path, *, timeout: float = 120) -> Loaded:
    """Open `page` and return the DOM it renders and every console message."""
    with tempfile.TemporaryDirectory(prefix="qf-chromium-") as profile:
        proc = _run(["--dump-dom", page.resolve().as_uri()], Path(profile), timeout)
    if proc.returncode != 0 or "<html" not in proc.stdout:
        raise RuntimeError(f"chromium could not load {page} (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln]
    return Loaded(proc.stdout, console)


def screenshot(page: Path, png: Path, *, width: int = 1280, height: int = 2000,
               timeout: float = 120) -> Path:
    """A PNG of the top `height` pixels of `page` at `width` CSS pixels."""
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qf-chromium-") as profile:
        proc = _run([f"--screenshot={png.resolve()}", f"--window-size={width},{height}",
                     page.resolve().as_uri()], Path(profile), timeout)
    if proc.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium could not screenshot {page} (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    return png


def shrink(png: Path, colors: int = 128) -> None:
    """Palette-quantize `png` in place (when Pillow is there; else leave it)."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="an output directory of `quantflow compile -o`")
    ap.add_argument("--compile", metavar="MODEL", help="compile MODEL first (e.g. "
                    "zoo:resnet_fmnist) into a temporary folder")
    ap.add_argument("-o", "--png", default="docs/report.png", help="where the PNG goes")
    ap.add_argument("--width", type=int, default=1280, help="window width (CSS px)")
    ap.add_argument("--height", type=int, default=1700, help="window height (CSS px)")
    args = ap.parse_args(argv)
    if not (args.out or args.compile):
        ap.error("pass an OUT_DIR or --compile MODEL")
    from quantflow.report_html import write_html

    with tempfile.TemporaryDirectory(prefix="qf-shot-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "out"
        if args.compile:
            from quantflow.cli import main as qf

            code = qf(["compile", args.compile, "-q", "-o", str(out)])
            if code:
                return code
        page = write_html(out)
        png = screenshot(page, Path(args.png), width=args.width, height=args.height)
        shrink(png)
        print(f"{png} ({png.stat().st_size / 1024:.0f} KB) from {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
