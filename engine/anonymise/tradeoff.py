"""The privacy/utility trade-off over the knob n, and its plot.

For each n, the same source/target pairs are swapped twice: the top-n ranked units, and n random
units (averaged over a few random picks). Privacy is the identity similarity left between each
output and its source (lower = more private); utility is the appearance change (lower = more kept).
A useful ranking gives lower similarity than random units at the same or lower appearance change.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw

from facegen.engine.anonymise.rank import select
from facegen.engine.anonymise.swap import Swapper, random_units


def curve(swapper: Swapper, table: pa.Table, name: str, width: int, ns: list[int], source: torch.Tensor,
          target: torch.Tensor, seed: int = 0, random_draws: int = 3) -> list[dict]:
    """One row per n: mean source similarity and appearance change of top-n and of random-n swaps."""
    rows = select(table, name, width)
    ranked = np.stack([rows.column(c).to_numpy() for c in ("layer", "start", "width")], axis=1).astype(np.int64)
    layout = swapper.space.layout(name)
    reference = swapper.sources(name, source)
    points = []
    for n in ns:
        top = swapper.swap(name, source, target, layout.mask(ranked[:n]), reference)
        randoms = [swapper.swap(name, source, target, layout.mask(random_units(ranked, n, seed, draw)), reference)
                   for draw in range(random_draws)]
        points.append({
            "n": int(n),
            "top_similarity": float(top.source_similarity.mean()),
            "top_appearance": float(top.appearance_change.mean()),
            "random_similarity": float(np.mean([r.source_similarity.mean() for r in randoms])),
            "random_appearance": float(np.mean([r.appearance_change.mean() for r in randoms])),
        })
    return points


def default_ns(units: int, steps: int = 8) -> list[int]:
    """0, then roughly doubling up to every unit."""
    ns = {0, units}
    n = 1
    while n < units and len(ns) < steps + 1:
        ns.add(n)
        n *= 2
    return sorted(ns)


# -- the plot -------------------------------------------------------------------------------------
_TOP, _RANDOM = (200, 40, 40), (90, 90, 90)
_PANEL_W, _PANEL_H, _MARGIN = 360, 240, 44


def _panel(draw: ImageDraw.ImageDraw, left: int, title: str, ns: list[int], top: list[float],
           random: list[float]) -> None:
    x0, y0, x1, y1 = left + _MARGIN, 26, left + _PANEL_W - 12, _PANEL_H - 30
    values = top + random
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    span_n = max(ns[-1] - ns[0], 1)

    def xy(n: float, v: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * (n - ns[0]) / span_n, y1 - (y1 - y0) * (v - low) / (high - low)

    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text((x0, 6), title, fill=(0, 0, 0))
    for value in (low, (low + high) / 2, high):
        _, y = xy(ns[0], value)
        draw.text((left + 2, y - 5), f"{value:.3g}", fill=(0, 0, 0))
    for n in (ns[0], ns[len(ns) // 2], ns[-1]):
        x, _ = xy(n, low)
        draw.text((x - 6, y1 + 4), str(n), fill=(0, 0, 0))
    draw.text(((x0 + x1) // 2 - 40, y1 + 16), "n (swapped units)", fill=(0, 0, 0))
    for series, colour in ((random, _RANDOM), (top, _TOP)):
        points = [xy(n, v) for n, v in zip(ns, series)]
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)


def plot_png(points: list[dict]) -> bytes:
    """Two panels over n: identity similarity to the source, and appearance change (top-n red, random grey)."""
    ns = [p["n"] for p in points]
    image = Image.new("RGB", (2 * _PANEL_W, _PANEL_H + 14), "white")
    draw = ImageDraw.Draw(image)
    _panel(draw, 0, "identity similarity to source (privacy: lower)", ns,
           [p["top_similarity"] for p in points], [p["random_similarity"] for p in points])
    _panel(draw, _PANEL_W, "appearance change, grey levels (utility: lower)", ns,
           [p["top_appearance"] for p in points], [p["random_appearance"] for p in points])
    draw.text((8, _PANEL_H - 2), "red: top-n ranked units   grey: n random units", fill=(0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
