"""Run report: report.json round trip, self-contained report.html, contact sheets."""

import base64
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from facegen.engine.report import contact_sheet, downscale, histogram_svg, identity_sheet, write_report
from facegen.engine.storage import Storage

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr"}


class StrictParser(HTMLParser):
    """Fails on any unbalanced or mis-nested tag; collects img sources and figure identities."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.identities, self.svgs = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "figure":
            self.identities.append(int(attrs["data-identity"]))
        self.svgs += tag == "svg"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def parse(text: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(text)
    parser.close()
    assert parser.stack == [], f"unclosed tags {parser.stack}"
    return parser


def decode_png(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_contact_sheet_layout_matches_a_loop_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 4, 6, 3), dtype=np.uint8)
    grid = contact_sheet(images, columns=3, gap=1, fill=255)
    assert grid.shape == (2 * 4 + 1, 3 * 6 + 2, 3)
    reference = np.full_like(grid, 255)
    for k in range(5):
        r, c = divmod(k, 3)
        reference[r * 5:r * 5 + 4, c * 7:c * 7 + 6] = images[k]
    np.testing.assert_array_equal(grid, reference)
    grey = contact_sheet(images[..., 0], columns=8)  # columns > K: one row, no gap
    np.testing.assert_array_equal(grey, np.concatenate(list(images[..., 0]), axis=1))
    with pytest.raises(ValueError, match="contact_sheet"):
        contact_sheet(images[:0], 2)


def test_downscale_is_a_box_average():
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    small = downscale(images, 2)
    assert small.shape == (2, 2, 2)
    assert small[1, 0, 1] == round(images[1, 0:2, 2:4].mean())


def test_histogram_svg_draws_the_threshold():
    svg = histogram_svg(np.array([0.1, 0.2, 0.2, 0.3, np.nan]), 0.5, bins=4, width=140, height=100)
    # Range [0.1, 0.5] -> 4 bars; plot spans x 40..130, so the threshold (the top of the range) sits at 130.
    assert svg.count("<rect") == 4
    assert '<line x1="130.0"' in svg and "threshold 0.5" in svg


def test_report_json_and_html(tmp_path):
    storage = Storage(str(tmp_path))
    rng = np.random.default_rng(1)
    report = {
        "title": "run <42> & co",
        "totals": {"identities": 3, "samples": np.int64(15), "images_per_s": 123.456789},
        "acceptance": {"accepted": 15, "rejected": {"privacy": 3, "<script>alert(1)</script>": 2}},
        "privacy": {"index_fingerprint": "sha256:9f86d081884c", "threshold": 0.622,
                    "max_real_similarity": np.float32(0.4123456), "violations": 0, "enrolled": 1200},
        "timing": {"wall_s": 12.5, "mean_ms": float("nan")},
    }
    sheets = {i: (rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
                  rng.integers(0, 256, (4, 16, 16), dtype=np.uint8) if i != 7 else None) for i in (2, 5, 7)}
    histograms = {"max real similarity": rng.uniform(0.0, 0.5, 200), "intra-identity": rng.uniform(0.6, 0.9, 50)}
    write_report(storage, report, sheets, histograms, histogram_thresholds={"max real similarity": 0.622,
                                                                            "intra-identity": 0.7})

    stored = storage.read_json("report.json")
    assert stored["totals"] == {"identities": 3, "samples": 15, "images_per_s": 123.456789}
    assert stored["privacy"]["max_real_similarity"] == pytest.approx(0.4123456, abs=1e-7)
    assert stored["timing"] == {"wall_s": 12.5, "mean_ms": None}
    assert stored["acceptance"] == report["acceptance"]
    text = storage.read_text("report.json")
    assert text == json.dumps(stored, indent=2, sort_keys=True) + "\n"  # sorted keys

    page = storage.read_text("report.html")
    parsed = parse(page)
    assert "CERTIFIED" in page and "NOT CERTIFIED" not in page
    for number in ("sha256:9f86d081884c", ">0.622<", ">0.412346<", ">1200<", "threshold 0.622", "threshold 0.7"):
        assert number in page, number
    assert re.search(r"<td>violations</td><td class=\"num\">0</td>", page)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "run &lt;42&gt; &amp; co" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no external assets
    assert parsed.svgs == 2
    assert parsed.identities == [2, 5, 7] and len(parsed.images) == 3
    for src, identity in zip(parsed.images, (2, 5, 7)):
        np.testing.assert_array_equal(decode_png(src), identity_sheet(*sheets[identity]))
    with_nir, without_nir = decode_png(parsed.images[0]), decode_png(parsed.images[2])
    assert with_nir.shape == (16 + 4 + 16, 4 * 16 + 3 * 2, 3) and without_nir.shape == (16, 4 * 16 + 3 * 2, 3)
    np.testing.assert_array_equal(with_nir[:16, :16], sheets[2][0][0])
    np.testing.assert_array_equal(with_nir[20:36, 18:34, 1], sheets[2][1][1])  # NIR row, 2nd tile


def test_violations_fail_the_certificate(tmp_path):
    storage = Storage(str(tmp_path))
    privacy = {"index_fingerprint": "abc", "threshold": 0.5, "max_real_similarity": 0.61,
               "violations": [{"key": "00000003_001", "similarity": 0.61}]}
    write_report(storage, {"privacy_certificate": privacy}, None, {"max real": np.array([0.2, 0.61])})
    page = storage.read_text("report.html")
    parse(page)
    assert "NOT CERTIFIED" in page and "00000003_001" in page and "threshold 0.5" in page
    assert page.count("<h2>Privacy certificate</h2>") == 1 and "<h2>privacy_certificate</h2>" not in page
    assert storage.read_json("report.json") == {"privacy_certificate": privacy}
