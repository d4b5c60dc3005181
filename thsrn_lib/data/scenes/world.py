"""The Scenes world: attributes, scene sampling and geometric relations.

A scene is a list of objects on a canvas. Each object has a shape, a colour, a size class
and a pattern, a slightly jittered RGB value, and a placement. Its *box* is the tight pixel
box of what is drawn (``x1, y1, x2, y2``, x2/y2 exclusive, so the box covers the pixels
``x1 <= x < x2``); boxes of different objects never touch (a gap of at least
:data:`OBJECT_GAP` pixels), so every pair is separated horizontally or vertically and a
region can contain one object without any pixel of its neighbour.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from thsrn_lib.data.scenes.config import ScenesConfig
from thsrn_lib.data.scenes.shapes import SHAPES, ShapeBank

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "PATTERNS",
    "RELATIONS",
    "OBJECT_GAP",
    "SceneObject",
    "Scene",
    "sample_scene",
    "compute_relations",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 205, 30),
    "purple": (128, 60, 175),
    "orange": (250, 130, 20),
    "pink": (240, 125, 190),
    "brown": (125, 75, 35),
}
SIZES: tuple[str, ...] = ("small", "large")
PATTERNS: tuple[str, ...] = ("plain", "striped")
# Ordered pairs (a, b) for which "a <relation> b" holds.
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below", "next_to")
OBJECT_GAP = 2  # minimum number of background pixels between two objects' boxes
_COLOUR_JITTER = 12  # per-channel uniform jitter of an object's RGB, so colours are classes, not constants


@dataclass
class SceneObject:
    """One drawn object. ``x, y`` is the top-left corner of its ``side x side`` template."""

    id: int
    shape: str
    colour: str
    size: str
    pattern: str
    rgb: tuple[int, int, int]
    side: int
    x: int
    y: int
    box: tuple[int, int, int, int]  # tight pixel box, x2/y2 exclusive
    stripe: tuple[int, int, int] = (0, 4, 0)  # (orientation 0..3, period px, phase px); unused if plain

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "pattern": self.pattern}


@dataclass
class Scene:
    """A full scene description: enough to re-render the image exactly."""

    width: int
    height: int
    background_seed: int
    objects: list[SceneObject]
    relations: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def boxes(self) -> np.ndarray:
        """Tight object boxes, float32 ``(n_objects, 4)``."""
        return np.asarray([o.box for o in self.objects], dtype=np.float32).reshape(-1, 4)

    def to_record(self) -> dict[str, Any]:
        """JSON-able dict (the per-image line of ``{split}_scenes.jsonl`` minus image/id/regions)."""
        return {
            "width": self.width,
            "height": self.height,
            "background_seed": self.background_seed,
            "objects": [
                {"id": o.id, "shape": o.shape, "colour": o.colour, "size": o.size, "pattern": o.pattern,
                 "rgb": list(o.rgb), "side": o.side, "x": o.x, "y": o.y, "box": list(o.box),
                 "stripe": list(o.stripe)}
                for o in self.objects
            ],
            "relations": {r: [list(p) for p in self.relations.get(r, [])] for r in RELATIONS},
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Scene:
        objs = [
            SceneObject(id=o["id"], shape=o["shape"], colour=o["colour"], size=o["size"], pattern=o["pattern"],
                        rgb=tuple(o["rgb"]), side=o["side"], x=o["x"], y=o["y"], box=tuple(o["box"]),
                        stripe=tuple(o["stripe"]))
            for o in rec["objects"]
        ]
        rels = {r: [tuple(p) for p in rec.get("relations", {}).get(r, [])] for r in RELATIONS}
        return cls(rec["width"], rec["height"], rec["background_seed"], objs, rels)


def compute_relations(boxes: np.ndarray, next_to_gap_px: float) -> dict[str, list[tuple[int, int]]]:
    """Geometric relations between objects from their boxes ``(n, 4)``.

    ``a left_of b``: a's box ends at or before b's box starts (x), i.e. wholly to its left;
    ``above`` likewise in y; ``right_of``/``below`` are the converses; ``next_to`` (symmetric):
    the gap between the two boxes is at most ``next_to_gap_px``.
    """
    b = [tuple(float(v) for v in row) for row in np.asarray(boxes).reshape(-1, 4)]
    out: dict[str, list[tuple[int, int]]] = {r: [] for r in RELATIONS}
    for i, (ax1, ay1, ax2, ay2) in enumerate(b):  # n <= 8 objects: plain loops beat array set-up
        for j, (bx1, by1, bx2, by2) in enumerate(b):
            if i == j:
                continue
            if ax2 <= bx1:
                out["left_of"].append((i, j))
            if bx2 <= ax1:
                out["right_of"].append((i, j))
            if ay2 <= by1:
                out["above"].append((i, j))
            if by2 <= ay1:
                out["below"].append((i, j))
            gx = max(0.0, bx1 - ax2, ax1 - bx2)
            gy = max(0.0, by1 - ay2, ay1 - by2)
            if math.hypot(gx, gy) <= next_to_gap_px:
                out["next_to"].append((i, j))
    return out


def sample_scene(rng: np.random.Generator, cfg: ScenesConfig, bank: ShapeBank) -> Scene:
    """Sample one scene with ``cfg.min_objects..cfg.max_objects`` non-touching objects.

    Objects that cannot be placed after a number of tries are dropped; if fewer than
    ``min_objects`` remain the whole scene is resampled. Shapes and colours of earlier
    objects are reused with probability ``attribute_reuse_prob`` so that scenes share
    attributes in different combinations (what binding tests need).
    """
    canvas = cfg.canvas
    colour_names = list(COLOURS)
    period = max(4, round(canvas / 20))
    n_tries = 60
    for _ in range(100):
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        # every random number of the scene in a few vectorised draws (scalar draws dominated the cost)
        u = rng.random((n, 6))  # reuse shape?, reuse colour?, striped?, side, shape source, colour source
        shape_idx = rng.integers(len(SHAPES), size=n)
        colour_idx = rng.integers(len(colour_names), size=n)
        size_idx = rng.integers(len(SIZES), size=n)
        jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, (n, 3))
        stripes = np.stack([rng.integers(4, size=n), rng.integers(period, size=n)], axis=1)
        positions = rng.random((n, n_tries, 2))
        objects: list[SceneObject] = []
        placed = np.zeros((0, 4), dtype=np.int64)
        for k in range(n):
            m = len(objects)
            shape = objects[int(u[k, 4] * m)].shape if m and u[k, 0] < cfg.attribute_reuse_prob else SHAPES[shape_idx[k]]
            colour = (objects[int(u[k, 5] * m)].colour if m and u[k, 1] < cfg.attribute_reuse_prob
                      else colour_names[colour_idx[k]])
            size = SIZES[size_idx[k]]
            pattern = "striped" if u[k, 2] < cfg.striped_prob else "plain"
            lo, hi = cfg.small_size if size == "small" else cfg.large_size
            side = max(6, int(round((lo + u[k, 3] * (hi - lo)) * canvas)))
            # candidate top-left corners in [1, canvas - side - 1]; keep the first whose box is
            # apart from every placed box
            xy = 1 + (positions[k] * (canvas - side - 1)).astype(np.int64)
            cand = np.concatenate([xy, xy], axis=1) + np.asarray(bank.tight_box(shape, side))
            apart = ((cand[:, None, 2] + OBJECT_GAP <= placed[None, :, 0])
                     | (placed[None, :, 2] + OBJECT_GAP <= cand[:, None, 0])
                     | (cand[:, None, 3] + OBJECT_GAP <= placed[None, :, 1])
                     | (placed[None, :, 3] + OBJECT_GAP <= cand[:, None, 1])).all(axis=1)
            free = np.flatnonzero(apart)
            if len(free) == 0:
                continue
            j = int(free[0])
            box = tuple(int(v) for v in cand[j])
            placed = np.concatenate([placed, cand[j:j + 1]])
            rgb = tuple(min(255, max(0, int(c) + int(d))) for c, d in zip(COLOURS[colour], jitter[k]))
            stripe = (int(stripes[k, 0]), period, int(stripes[k, 1]))
            objects.append(SceneObject(m, shape, colour, size, pattern, rgb, side, int(xy[j, 0]), int(xy[j, 1]),
                                       box, stripe))
        if len(objects) >= cfg.min_objects:
            scene = Scene(canvas, canvas, int(rng.integers(2**31 - 1)), objects)
            scene.relations = compute_relations(scene.boxes(), cfg.next_to_gap * canvas)
            return scene
    raise RuntimeError(
        f"could not place {cfg.min_objects} objects on a {canvas}x{canvas} canvas in 100 attempts; "
        "lower min_objects or the object sizes"
    )
