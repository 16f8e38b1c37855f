"""Small PNG charts drawn with Pillow (no plotting library needed): a ROC curve on a log FAR axis and
genuine/impostor score histograms."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 440, 56
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def _canvas(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 12), title, fill="black")
    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN // 2, HEIGHT - MARGIN], outline="black")
    return image, draw


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def roc_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC", min_far: float = 1e-5) -> bytes:
    """TAR (y, linear 0..1) against FAR (x, log10 from `min_far` to 1), one line per curve."""
    image, draw = _canvas(title)
    left, right, top, bottom = MARGIN, WIDTH - MARGIN // 2, MARGIN, HEIGHT - MARGIN
    lo = math.log10(min_far)

    def point(far: float, tar: float) -> tuple[float, float]:
        x = (math.log10(max(far, min_far)) - lo) / -lo
        return left + x * (right - left), bottom - tar * (bottom - top)

    for exponent in range(int(lo), 1):
        x, _ = point(10.0**exponent, 0)
        draw.line([x, bottom, x, top], fill=(225, 225, 225))
        draw.text((x - 12, bottom + 6), f"1e{exponent}", fill="black")
    for tick in np.linspace(0, 1, 6):
        _, y = point(1, tick)
        draw.line([left, y, right, y], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick:.1f}", fill="black")
    draw.text(((left + right) // 2 - 10, HEIGHT - 22), "FAR", fill="black")
    draw.text((8, top - 20), "TAR", fill="black")
    for i, (name, (far, tar)) in enumerate(curves.items()):
        order = np.argsort(far, kind="stable")
        points = [point(f, t) for f, t in zip(np.asarray(far)[order], np.asarray(tar)[order])]
        colour = COLOURS[i % len(COLOURS)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((right - 180, top + 8 + 14 * i), name, fill=colour)
    return _png(image)


def histogram_png(series: dict[str, np.ndarray], title: str = "scores", bins: int = 50,
                  markers: dict[str, float] | None = None) -> bytes:
    """Normalised histograms (density) of each series on a shared axis; vertical lines at `markers`."""
    image, draw = _canvas(title)
    left, right, top, bottom = MARGIN, WIDTH - MARGIN // 2, MARGIN, HEIGHT - MARGIN
    values = [np.asarray(v, np.float64) for v in series.values() if len(v)]
    lo = min(float(v.min()) for v in values) if values else -1.0
    hi = max(float(v.max()) for v in values) if values else 1.0
    hi = hi if hi > lo else lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    densities = {name: np.histogram(v, edges, density=True)[0] if len(v) else np.zeros(bins)
                 for name, v in series.items()}
    peak = max((float(d.max()) for d in densities.values()), default=1.0) or 1.0

    def x_of(value: float) -> float:
        return left + (value - lo) / (hi - lo) * (right - left)

    for tick in np.linspace(lo, hi, 6):
        draw.text((x_of(tick) - 14, bottom + 6), f"{tick:.2f}", fill="black")
    for i, (name, density) in enumerate(densities.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = []
        for b in range(bins):
            y = bottom - density[b] / peak * (bottom - top)
            points += [(x_of(edges[b]), y), (x_of(edges[b + 1]), y)]
        draw.line(points, fill=colour, width=2)
        draw.text((right - 180, top + 8 + 14 * i), f"{name} (n={len(series[name])})", fill=colour)
    for name, value in (markers or {}).items():
        x = x_of(min(max(value, lo), hi))
        draw.line([x, top, x, bottom], fill=(90, 90, 90))
        draw.text((x + 3, top + 4), name, fill=(90, 90, 90))
    return _png(image)
