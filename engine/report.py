"""The run report: `report.json` (the dict as given) and a self-contained `report.html`.

The HTML has no external assets: contact sheets are inline base64 PNGs, histograms inline SVG.
Every string from the report is escaped. Report dict sections with a dedicated rendering:
`totals` (key/value), `acceptance` (counts by reason, nested one level at most), `privacy_certificate`
(or `privacy`: `index_fingerprint`, `threshold`, `max_real_similarity`, `violations` and any extra
fields), `timing` (where the wall-clock time of a run went, `PhaseTimer.section`); all other top-level
keys are shown as generic tables, and the full JSON is embedded at the end.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from facegen.engine.dataset.codec import encode_image, to_jsonable
from facegen.engine.storage import Storage

CERTIFICATE_FIELDS = ("index_fingerprint", "threshold", "max_real_similarity", "violations")
CERTIFICATE_KEYS = ("privacy_certificate", "privacy")  # the report key holding the certificate
_SECTIONS = ("title", "totals", "acceptance", "timing", *CERTIFICATE_KEYS)
PHASES = ("start", "model_load", "selection", "shards", "finalise")  # a generation run's phases, in order
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}.cert{border:2px solid #2a7;padding:.5em 1em}
.cert.fail{border-color:#c33}.sheet{display:inline-block;margin:0 1em 1em 0}.sheet img{image-rendering:pixelated}
pre{background:#f6f6f6;padding:1em;overflow:auto}
"""
Sheet = tuple[np.ndarray, "np.ndarray | None"]


# -- where the time went -------------------------------------------------------------------------
class PhaseTimer:
    """Wall-clock seconds of a run's phases (`PHASES`), measured from the run's start.

    A phase may be entered more than once (its seconds add up) and inside another phase (its seconds
    are taken out of the enclosing one), so the phases never count a second twice and their sum is at
    most the total; the rest is time between phases (bookkeeping, writing the report itself).
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._open: list[str] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; phases are {', '.join(PHASES)}")
        begun = time.monotonic()
        self._open.append(name)
        try:
            yield
        finally:
            spent = time.monotonic() - begun
            self._open.pop()
            self.seconds[name] += spent
            if self._open:
                self.seconds[self._open[-1]] -= spent

    def mark_start(self) -> None:
        """Everything since the run began counts as `start` (output checks, models checked, Ray up)."""
        self.seconds["start"] = time.monotonic() - self.started - sum(self.seconds.values())

    def section(self, samples: int, candidates: int) -> dict[str, Any]:
        """report.json's `timing`: seconds per phase, the total so far, and the samples and candidates
        this run computed (a resume counts only what it wrote) per second of the total."""
        # Parts rounded down and the total up to the millisecond, so the parts still sum to at most it.
        total = math.ceil((time.monotonic() - self.started) * 1000) / 1000
        return {"seconds": {name: math.floor(max(0.0, value) * 1000) / 1000 for name, value in self.seconds.items()},
                "total_seconds": total, "samples": samples, "candidates": candidates,
                "samples_per_s": samples / total if total > 0 else None,
                "candidates_per_s": candidates / total if total > 0 else None}


# -- images ------------------------------------------------------------------------------------
def contact_sheet(images: np.ndarray, columns: int, *, gap: int = 0, fill: int = 255) -> np.ndarray:
    """Tile K images [K,H,W] or [K,H,W,C] into a grid of `columns`, `gap` pixels between tiles."""
    if images.ndim not in (3, 4) or len(images) == 0 or columns < 1:
        raise ValueError(f"contact_sheet: need [K,H,W(,C)] with K >= 1 and columns >= 1, got {images.shape}")
    squeeze = images.ndim == 3
    tiles = images[..., None] if squeeze else images
    count, height, width, channels = tiles.shape
    columns = min(columns, count)
    rows = -(-count // columns)
    # Pad the batch to a full grid and each tile by `gap` on its right/bottom, then one reshape.
    tiles = np.pad(tiles, ((0, rows * columns - count), (0, gap), (0, gap), (0, 0)), constant_values=fill)
    grid = tiles.reshape(rows, columns, height + gap, width + gap, channels).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * (height + gap), columns * (width + gap), channels)
    grid = grid[: grid.shape[0] - gap, : grid.shape[1] - gap]  # no gap after the last row/column
    return grid[..., 0] if squeeze else grid


def downscale(images: np.ndarray, factor: int) -> np.ndarray:
    """Box-average [K,H,W(,C)] images by an integer factor (crops the remainder)."""
    if factor <= 1:
        return images
    k, h, w = images.shape[:3]
    h, w = h // factor * factor, w // factor * factor
    blocks = images[:, :h, :w].reshape(k, h // factor, factor, w // factor, factor, *images.shape[3:])
    return blocks.mean(axis=(2, 4)).round().astype(np.uint8)


def png_data_uri(image: np.ndarray) -> str:
    png = encode_image(image, "png", png_compress_level=6)  # smaller than the shards' fast level 1
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def identity_sheet(vis: np.ndarray, nir: np.ndarray | None, *, columns: int = 8, tile_px: int = 128) -> np.ndarray:
    """One identity's VIS grid, with its NIR grid (grey as RGB) underneath."""
    factor = max(1, vis.shape[1] // tile_px)
    grids = [contact_sheet(downscale(vis, factor), columns, gap=2)]
    if nir is not None:
        grey = contact_sheet(downscale(nir, factor), columns, gap=2)
        grids += [np.full((4, grey.shape[1], 3), 255, np.uint8), np.repeat(grey[..., None], 3, axis=2)]
    return np.concatenate(grids, axis=0)


# -- small HTML builders -----------------------------------------------------------------------
def _text(value: Any) -> str:
    """Escaped display text; floats with 6 significant digits."""
    if value is None:
        return "&mdash;"
    if isinstance(value, float):
        return html.escape(f"{value:.6g}")
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value, sort_keys=True))
    return html.escape(str(value))


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for name, value in sorted(data.items()):
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{name} / ")
        else:
            rows.append((f"{prefix}{name}", value))
    return rows


def _table(rows: list[tuple[str, Any]], header: tuple[str, ...] = ("name", "value"), share: bool = False) -> str:
    """Key/value table; with `share`, a column with each numeric value's fraction of their sum."""
    total = sum(v for _, v in rows if isinstance(v, (int, float)) and not isinstance(v, bool))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header + (("share",) if share else ()))
    body = []
    for name, value in rows:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        cells = f"<td>{_text(name)}</td><td class=\"{'num' if numeric else ''}\">{_text(value)}</td>"
        if share:
            cells += f"<td class=\"num\">{100 * value / total:.1f}%</td>" if numeric and total else "<td></td>"
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def histogram_svg(values: np.ndarray, threshold: float | None, *, bins: int = 40, width: int = 520,
                  height: int = 200) -> str:
    """Inline SVG histogram of similarities with the threshold as a vertical red line."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    marks = [finite.min(), finite.max()] if finite.size else [0.0, 1.0]
    if threshold is not None:
        marks.append(threshold)
    lo, hi = np.floor(min(marks) * 10) / 10, np.ceil(max(marks) * 10) / 10
    hi = hi if hi > lo else lo + 0.1
    counts, edges = np.histogram(finite, bins=bins, range=(lo, hi))
    left, bottom, plot_w, plot_h = 40, height - 25, width - 50, height - 40

    def x_of(value: float) -> float:
        return left + (value - lo) / (hi - lo) * plot_w

    bar_h = counts / max(1, counts.max()) * plot_h
    bars = "".join(
        f'<rect x="{x_of(a):.1f}" y="{bottom - h:.1f}" width="{max(0.5, x_of(b) - x_of(a) - 1):.1f}" '
        f'height="{h:.1f}" fill="#4a7ab5"/>'
        for a, b, h in zip(edges[:-1], edges[1:], bar_h)
    )
    axis = (f'<line x1="{left}" y1="{bottom}" x2="{left + plot_w}" y2="{bottom}" stroke="#333"/>'
            + "".join(f'<text x="{x_of(v):.1f}" y="{height - 8}" font-size="11" text-anchor="middle">{v:.2f}</text>'
                      for v in np.linspace(lo, hi, 5))
            + f'<text x="{left - 4}" y="{bottom - plot_h + 4}" font-size="11" text-anchor="end">{counts.max()}</text>')
    line = ""
    if threshold is not None:
        x = x_of(threshold)
        line = (f'<line x1="{x:.1f}" y1="{bottom - plot_h - 5}" x2="{x:.1f}" y2="{bottom}" stroke="#c33" '
                f'stroke-width="2"/><text x="{x + 3:.1f}" y="{bottom - plot_h + 6}" font-size="11" '
                f'fill="#c33">threshold {threshold:.4g}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
            f"{bars}{axis}{line}</svg>")


def _histogram_block(name: str, values: np.ndarray, threshold: float | None) -> str:
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    rows = [("count", int(values.size)), ("non-finite", int(values.size - finite.size))]
    if finite.size:
        rows += [("mean", float(finite.mean())), ("max", float(finite.max()))]
        if threshold is not None:
            rows.append(("at or above threshold", int((finite >= threshold).sum())))
    return f"<h3>{_text(name)}</h3>{histogram_svg(values, threshold)}{_table(rows)}"


def certificate_headline(privacy: dict[str, Any]) -> tuple[bool, str]:
    """(passed, the one line a reader sees first). It names what was certified: a dataset whose NIR
    images were written but not checked is never plainly CERTIFIED."""
    violations = privacy.get("violations")
    count = len(violations) if isinstance(violations, list) else violations
    threshold, max_sim = privacy.get("threshold"), privacy.get("max_real_similarity")
    passed = count == 0 and threshold is not None and max_sim is not None and max_sim <= threshold
    if not passed:
        return False, "NOT CERTIFIED"
    operating = f"max cosine similarity to every enrolled real image <= {threshold:.6g}"
    if privacy.get("threshold_source"):
        operating += f" ({privacy['threshold_source']})"
    certified = privacy.get("certified")
    if certified is None:
        return True, f"CERTIFIED: {operating}"
    if privacy.get("nir_written") and "NIR" not in certified:
        return True, f"VIS certified, NIR not checked: {operating}"
    return True, f"CERTIFIED ({' and '.join(certified)}): {operating}"


def _certificate(privacy: dict[str, Any]) -> str:
    passed, verdict = certificate_headline(privacy)
    rows = [(name, privacy.get(name)) for name in CERTIFICATE_FIELDS]
    rows += [(n, v) for n, v in _flatten({k: v for k, v in privacy.items() if k not in CERTIFICATE_FIELDS})]
    return (f'<div class="cert{"" if passed else " fail"}"><h2>Privacy certificate</h2>'
            f"<p><strong>{verdict}</strong></p>{_table(rows)}</div>")


def _timing(timing: dict[str, Any]) -> str:
    """Phases with their share of the total, then the rates; any other timing dict as a plain table."""
    if not isinstance(timing.get("seconds"), dict):
        return "<h2>Timing</h2>" + _table(_flatten(timing))
    phases = list(timing["seconds"].items())
    rest = [(name, value) for name, value in timing.items() if name != "seconds"]
    return ("<h2>Where the time went</h2>" + _table(phases, ("phase", "seconds"), share=True)
            + _table(rest))


# -- the page ----------------------------------------------------------------------------------
def render_html(report: dict[str, Any], contact_sheets: dict[int, Sheet] | None = None,
                histograms: dict[str, np.ndarray] | None = None,
                histogram_thresholds: dict[str, float] | None = None) -> str:
    """The report page as one HTML string (see the module docstring for the sections)."""
    title = str(report.get("title", "facegen dataset report"))
    privacy = next((report[k] for k in CERTIFICATE_KEYS if report.get(k)), {})
    parts = [f"<h1>{_text(title)}</h1>"]
    if privacy:
        parts.append(_certificate(privacy))
    if report.get("totals"):
        parts.append("<h2>Totals</h2>" + _table(_flatten(report["totals"])))
    if report.get("acceptance"):
        parts.append("<h2>Acceptance by reason</h2>"
                     + _table(_flatten(report["acceptance"]), ("reason", "count"), share=True))
    if report.get("timing"):
        parts.append(_timing(report["timing"]))
    if histograms:
        # Without explicit thresholds every histogram shows the privacy threshold.
        thresholds = histogram_thresholds if histogram_thresholds is not None else {
            name: privacy.get("threshold") for name in histograms}
        parts.append("<h2>Similarity histograms</h2>" + "".join(
            _histogram_block(name, values, thresholds.get(name)) for name, values in histograms.items()))
    if contact_sheets:
        figures = []
        for identity, (vis, nir) in sorted(contact_sheets.items()):
            caption = f"identity {int(identity)}: VIS" + (" (top), NIR (bottom)" if nir is not None else "")
            figures.append(f'<figure class="sheet" data-identity="{int(identity)}"><img alt="{_text(caption)}" '
                           f'src="{png_data_uri(identity_sheet(vis, nir))}"><figcaption>{_text(caption)}'
                           "</figcaption></figure>")
        parts.append("<h2>Contact sheets</h2>" + "".join(figures))
    for name, value in sorted(report.items()):
        if name not in _SECTIONS:
            rows = _flatten(value) if isinstance(value, dict) else [(name, value)]
            parts.append(f"<h2>{_text(name)}</h2>{_table(rows)}")
    raw = html.escape(json.dumps(report, indent=2, sort_keys=True))
    parts.append(f"<details><summary>report.json</summary><pre>{raw}</pre></details>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_text(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(storage: Storage, report: dict[str, Any], contact_sheets: dict[int, Sheet] | None = None,
                 histograms: dict[str, np.ndarray] | None = None, *,
                 histogram_thresholds: dict[str, float] | None = None) -> None:
    """Write `report.json` (sorted keys; NaN/inf become null) and `report.html`, each atomically."""
    report = to_jsonable(report, nonfinite="null", where="report")
    storage.write_text("report.html", render_html(report, contact_sheets, histograms, histogram_thresholds))
    storage.write_text("report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
