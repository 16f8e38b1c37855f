"""report.html in a real headless browser: it renders, every embedded image decodes, no console errors."""

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facegen.jobs.cli import main
from tests.browser import find_chromium, open_page
from tests.engine.tiny import write_tiny_job

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="no chromium here (Debian: apt-get install chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    job = write_tiny_job(folder, str(folder / "dataset"), identities=3)
    assert main(["generate", job]) == 0
    return folder / "dataset" / "report.html"


def data_uris(html: str) -> list[str]:
    return re.findall(r'<img[^>]* src="(data:image/png;base64,[^"]+)"', html)


def test_report_renders_with_every_image_decoded_and_no_errors(report, tmp_path):
    html = report.read_text()
    uris = data_uris(html)
    assert len(uris) == html.count("<img") >= 3  # one contact sheet per identity
    page = open_page(report.as_uri())
    assert page.errors == []
    assert page.title == "facegen dataset report"
    # The browser decoded every image, at the size the PNG itself declares.
    assert len(page.images) == len(uris) and all(i["complete"] and i["data"] for i in page.images)
    for uri, seen in zip(uris, page.images):
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
            image.load()
            assert (seen["width"], seen["height"]) == image.size
    shot = Image.open(io.BytesIO(page.screenshot))
    shot.load()
    (tmp_path / "report.png").write_bytes(page.screenshot)
    assert shot.size[0] == 1280 and shot.size[1] >= 800
    pixels = np.asarray(shot.convert("L"), np.float32)
    assert pixels.std() > 20  # text, tables and pictures, not a blank page


def test_the_check_catches_a_broken_image_and_a_console_error(tmp_path):
    page_file = tmp_path / "broken.html"
    page_file.write_text('<!DOCTYPE html><html><head><title>broken</title></head><body>'
                         '<img src="data:image/png;base64,iVBORw0KGgoAAAAN"><script>console.error("boom")</script>'
                         "</body></html>")
    page = open_page(page_file.as_uri())
    assert page.images[0]["width"] == 0
    assert any("boom" in error for error in page.errors)


def test_a_missing_browser_is_reported():
    with pytest.raises(FileNotFoundError):
        open_page("about:blank", binary=str(Path("/nonexistent/chromium")))
