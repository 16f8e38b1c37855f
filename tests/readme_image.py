"""The README's picture: a report.html in headless chromium (tests/browser.py), cut to what a reader
looks at first: the certificate, rejections by reason, where the time went and the contact sheets.

    python -m tests.readme_image facegen-quickstart/dataset/report.html docs/images/quickstart-report.png
"""

from __future__ import annotations

import io
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.browser import open_page

WIDTH = 800
KEEP = ("Privacy certificate", "Acceptance by reason", "Where the time went", "Contact sheets")


def shown_sections(html: str) -> str:
    """The page with only the `KEEP` sections (render_html writes one section per line)."""
    html = html[:html.index("<details>")] + "</body></html>\n"  # the embedded report.json spans many lines
    kept = [line for line in html.split("\n")
            if not re.search(r"<h2>", line) or any(f"<h2>{name}</h2>" in line for name in KEEP)]
    return "\n".join(kept)


def readme_image(report: Path) -> Image.Image:
    with tempfile.TemporaryDirectory() as folder:
        page_file = Path(folder) / "report.html"
        page_file.write_text(shown_sections(report.read_text()))
        page = open_page(page_file.as_uri())
    if page.errors:
        raise RuntimeError(f"{report}: the browser reported {page.errors}")
    shot = Image.open(io.BytesIO(page.screenshot)).convert("RGB")
    inked = np.nonzero((np.asarray(shot).min(axis=2) < 245).any(axis=1))[0]
    shot = shot.crop((0, 0, shot.width, int(inked.max()) + 24))
    return shot.resize((WIDTH, round(shot.height * WIDTH / shot.width)), Image.LANCZOS).quantize(256)


if __name__ == "__main__":
    readme_image(Path(sys.argv[1])).save(sys.argv[2], optimize=True)
