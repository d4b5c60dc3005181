"""Shape masks: anti-aliased alpha templates for every shape at every pixel size.

A template is drawn once with PIL at ``supersample`` times the size and box-filtered down,
which gives soft edges; it is cached per ``(shape, side)``. Scene sampling uses the
template's tight box (the pixels it touches), and rendering composites the template.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "ShapeBank"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")


def _outline(shape: str) -> list[tuple[float, float]] | None:
    """Polygon vertices in the unit square [-1, 1]^2 (y down); ``None`` for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.82  # a full-box square would look much bigger than the circle next to it
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return [(0.0, -0.95), (0.95, 0.75), (-0.95, 0.75)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.08))  # +0.08 centres the star's mass
        return pts
    if shape == "diamond":
        return [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
    if shape == "cross":
        a, b = 0.3, 0.92
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                (-a, -a)]
    if shape == "hexagon":
        return [(0.92 * math.cos(math.pi / 3 * k), 0.92 * math.sin(math.pi / 3 * k)) for k in range(6)]
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


class ShapeBank:
    """Cache of alpha templates ``(side, side)`` float32 in [0, 1] and their tight boxes."""

    def __init__(self, supersample: int = 4) -> None:
        self.supersample = supersample
        self._alpha: dict[tuple[str, int], np.ndarray] = {}
        self._box: dict[tuple[str, int], tuple[int, int, int, int]] = {}

    def alpha(self, shape: str, side: int) -> np.ndarray:
        """Coverage of each pixel of a ``side x side`` patch by ``shape``, shape ``(side, side)``."""
        key = (shape, int(side))
        if key not in self._alpha:
            self._alpha[key] = self._draw(shape, int(side))
        return self._alpha[key]

    def tight_box(self, shape: str, side: int) -> tuple[int, int, int, int]:
        """``(x1, y1, x2, y2)`` of the template's non-zero pixels, x2/y2 exclusive."""
        key = (shape, int(side))
        if key not in self._box:
            a = self.alpha(shape, side) > 0
            ys, xs = np.nonzero(a.any(axis=1))[0], np.nonzero(a.any(axis=0))[0]
            self._box[key] = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
        return self._box[key]

    def _draw(self, shape: str, side: int) -> np.ndarray:
        if side < 4:
            raise ValueError(f"shape side must be >= 4 pixels, got {side}")
        ss = self.supersample
        n = side * ss
        img = Image.new("L", (n, n), 0)
        draw = ImageDraw.Draw(img)
        pts = _outline(shape)
        if pts is None:
            m = 0.04 * n
            draw.ellipse([m, m, n - 1 - m, n - 1 - m], fill=255)
        else:
            draw.polygon([((x + 1) / 2 * (n - 1), (y + 1) / 2 * (n - 1)) for x, y in pts], fill=255)
        hi = np.asarray(img, dtype=np.float32) / 255.0
        return hi.reshape(side, ss, side, ss).mean(axis=(1, 3)).astype(np.float32)
