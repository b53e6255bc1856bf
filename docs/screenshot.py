"""Screenshot five pages of the built site with headless Chromium and check them.

Usage::

    python docs/screenshot.py [BUILD_DIR] [--out DIR]

``BUILD_DIR`` defaults to ``docs/_build/html``; the screenshots go to ``--out``
(default ``docs/_build/screenshots``). For the home page, the user guide, one
gallery page, the API page and the estimator's page it checks that

- every ``<img>`` of the page points to an image file that exists, is not empty
  and decodes, and the home and gallery pages show at least one;
- the page has text, and the screenshot is not blank (enough non-background
  pixels).

It exits with status 1 and one line per problem when a check fails, and with
status 2 when Chromium (Debian's ``chromium``) is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

#: Pages to look at, relative to the build directory, with the least number
#: of images each must show (the gallery page: its figure).
PAGES = {
    "home": ("index.html", 1),
    "user_guide": ("user_guide.html", 0),
    "gallery": ("auto_examples/manufacturing_masking.html", 1),
    "api": ("api.html", 0),
    "estimator": ("generated/hiermask.MaskedHierarchicalRegressor.html", 0),
}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
WINDOW = (1280, 1600)
#: A screenshot with fewer non-background pixels than this share is blank.
MIN_INK = 0.01


class _Page(HTMLParser):
    """Image sources and visible text of an HTML page."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.text.append(data.strip())


def find_chromium() -> str | None:
    """Path of the Chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check_images(page: Path, sources: list[str]) -> list[str]:
    """Problems with the images a page refers to (local files only)."""
    from PIL import Image

    problems = []
    for src in sources:
        url = urlparse(src)
        if url.scheme in ("http", "https", "data"):
            continue
        path = (page.parent / unquote(url.path)).resolve()
        if not path.is_file() or path.stat().st_size == 0:
            problems.append(f"{page.name}: missing image {src}")
            continue
        if path.suffix.lower() == ".svg":
            continue
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as exc:
            problems.append(f"{page.name}: image {src} does not decode ({exc})")
    return problems


def ink(png: Path) -> float:
    """Share of pixels that differ from the most common (background) colour."""
    from PIL import Image

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        counts = rgb.getcolors(maxcolors=rgb.width * rgb.height)
    return 1.0 - max(count for count, _ in counts) / sum(c for c, _ in counts)


def screenshot(chromium: str, page: Path, png: Path) -> None:
    """Screenshot ``page`` into ``png`` with headless Chromium."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}",
                f"--screenshot={png}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main(argv=None) -> int:
    """Screenshot and check the pages; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", nargs="?", type=Path, default=Path("docs/_build/html"))
    parser.add_argument("--out", type=Path, default=Path("docs/_build/screenshots"))
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("screenshot: chromium not found (apt-get install chromium)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    problems = []
    for name, (relative, min_images) in PAGES.items():
        page = (args.build / relative).resolve()
        if not page.is_file():
            problems.append(f"{relative}: no such page")
            continue
        parsed = _Page()
        parsed.feed(page.read_text(encoding="utf-8"))
        if len(" ".join(parsed.text)) < 200:
            problems.append(f"{relative}: almost no text")
        problems += check_images(page, parsed.images)
        if len(parsed.images) < min_images:
            problems.append(
                f"{relative}: {len(parsed.images)} image(s), expected {min_images}+"
            )
        png = args.out / f"{name}.png"
        screenshot(chromium, page, png)
        share = ink(png) if png.is_file() else 0.0
        if share < MIN_INK:
            problems.append(f"{relative}: blank screenshot ({share:.3%} ink)")
        print(f"{name}: {png} ({len(parsed.images)} images, {share:.1%} ink)")
    for problem in problems:
        print(f"screenshot: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
