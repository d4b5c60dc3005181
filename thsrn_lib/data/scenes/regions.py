"""Region proposals, as a bottom-up detector would give them, plus IoU.

Per image, ``R`` integer pixel boxes ``x1, y1, x2, y2`` (x2/y2 exclusive) of four kinds:

- ``object``: one per object, its tight box with jittered corners (IoU >= 0.5 with it);
- ``part``: the left/right/top/bottom half of an object's box, lightly jittered;
- ``pair``: the union box of two objects (a region that spans several objects);
- ``background``: a random box, preferably one that overlaps no object much.

The list is shuffled, so a region's index says nothing about its kind.
"""
from __future__ import annotations

import numpy as np

__all__ = ["REGION_KINDS", "box_iou", "sample_regions"]

REGION_KINDS: tuple[str, ...] = ("object", "part", "pair", "background")
_MIN_SIDE = 2  # every region box is at least 2 x 2 pixels


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` ``(N, 4)`` with every box in ``b`` ``(M, 4)``: ``(N, M)``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _pair_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise IoU of broadcastable box arrays ``(..., 4)``."""
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _jitter(rng: np.random.Generator, boxes: np.ndarray, scale: float, canvas: int) -> np.ndarray:
    """Jittered copies of ``boxes`` ``(..., 4)``: corners moved by N(0, scale * side), rounded, clipped."""
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    side = np.stack([w, h, w, h], axis=-1)
    return _clip_boxes(boxes + rng.normal(0.0, scale, boxes.shape) * side, canvas)


def _clip_boxes(boxes: np.ndarray, canvas: int) -> np.ndarray:
    """Round boxes ``(..., 4)`` to pixels and keep them inside the canvas, at least 2 x 2."""
    b = np.rint(boxes)
    x1 = np.clip(b[..., 0], 0, canvas - _MIN_SIDE)
    y1 = np.clip(b[..., 1], 0, canvas - _MIN_SIDE)
    x2 = np.clip(b[..., 2], x1 + _MIN_SIDE, canvas)
    y2 = np.clip(b[..., 3], y1 + _MIN_SIDE, canvas)
    return np.stack([x1, y1, x2, y2], axis=-1)


def sample_regions(
    rng: np.random.Generator,
    object_boxes: np.ndarray,
    canvas: int,
    n_regions: int,
    jitter: float,
    part_fraction: float,
    pair_fraction: float,
) -> tuple[np.ndarray, list[str], list[list[int]]]:
    """Sample ``n_regions`` boxes for one image.

    Args:
        object_boxes: ``(n_objects, 4)`` tight object boxes.

    Returns:
        ``boxes`` float32 ``(n_regions, 4)`` (integer-valued), ``kinds`` (one of
        :data:`REGION_KINDS` per region) and ``sources`` (the object ids each region was
        made from; empty for background boxes).
    """
    objs = np.asarray(object_boxes, dtype=np.float64).reshape(-1, 4)
    n_obj = len(objs)
    if n_obj == 0 or n_obj > n_regions:
        raise ValueError(f"need 1..{n_regions} objects for {n_regions} regions, got {n_obj}")
    rest = n_regions - n_obj
    pairs = np.array([(i, j) for i in range(n_obj) for j in range(i + 1, n_obj)], dtype=np.int64).reshape(-1, 2)
    n_pair = min(int(round(pair_fraction * rest)), len(pairs))
    n_part = min(int(round(part_fraction * rest)), rest - n_pair)
    n_bg = rest - n_pair - n_part

    # Object regions must stay matches of their object (IoU >= 0.5): the first of 8 jittered
    # candidates that is one, or the exact box if none is.
    cands = _jitter(rng, np.repeat(objs[:, None, :], 8, axis=1), jitter, canvas)  # (O, 8, 4)
    ok = _pair_iou(cands, objs[:, None, :]) >= 0.5
    first = np.argmax(ok, axis=1)
    obj_boxes = np.where(ok.any(axis=1)[:, None], cands[np.arange(n_obj), first], objs)

    chosen = pairs[rng.permutation(len(pairs))[:n_pair]]
    a, b = objs[chosen[:, 0]], objs[chosen[:, 1]]
    unions = np.concatenate([np.minimum(a[:, :2], b[:, :2]), np.maximum(a[:, 2:], b[:, 2:])], axis=1)
    pair_boxes = _jitter(rng, unions, jitter / 2, canvas)

    part_obj = rng.integers(n_obj, size=n_part)
    side = rng.integers(4, size=n_part)  # left, right, top, bottom half
    ob = objs[part_obj]
    mx, my = (ob[:, 0] + ob[:, 2]) / 2, (ob[:, 1] + ob[:, 3]) / 2
    halves = ob.copy()
    halves[side == 0, 2] = mx[side == 0]
    halves[side == 1, 0] = mx[side == 1]
    halves[side == 2, 3] = my[side == 2]
    halves[side == 3, 1] = my[side == 3]
    part_boxes = _jitter(rng, halves, jitter / 2, canvas)

    # Background regions look like a detector's low-score proposals: the first of 8 random
    # candidates whose IoU with every object is < 0.3, else the least overlapping one.
    wh = rng.uniform(0.15, 0.5, (n_bg, 8, 2)) * canvas
    xy = rng.uniform(0.0, 1.0, (n_bg, 8, 2)) * (canvas - wh)
    bg = _clip_boxes(np.concatenate([xy, xy + wh], axis=-1), canvas)  # (n_bg, 8, 4)
    worst = _pair_iou(bg[:, :, None, :], objs[None, None]).max(axis=-1)  # (n_bg, 8)
    good = worst < 0.3
    pick = np.where(good.any(axis=1), np.argmax(good, axis=1), np.argmin(worst, axis=1))
    bg_boxes = bg[np.arange(n_bg), pick]

    boxes = np.concatenate([obj_boxes, pair_boxes, part_boxes, bg_boxes]).reshape(n_regions, 4)
    kinds = ["object"] * n_obj + ["pair"] * n_pair + ["part"] * n_part + ["background"] * n_bg
    sources = ([[i] for i in range(n_obj)] + chosen.tolist() + [[i] for i in part_obj.tolist()]
               + [[] for _ in range(n_bg)])
    order = rng.permutation(n_regions)
    return boxes[order].astype(np.float32), [kinds[k] for k in order.tolist()], [sources[k] for k in order.tolist()]
