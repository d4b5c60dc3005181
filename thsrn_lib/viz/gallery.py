"""Retrieval galleries: top-k images for a caption, top-k captions for an image.

Ground truth is marked the same way everywhere: a green frame (images) or a green ✓ (captions).
Each thumbnail can carry an alignment overlay: per-region weights ``(R,)`` drawn as tinted boxes
(e.g. the query's attention pooled over its words, or one word's attention).
"""
from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..errors import ConfigError
from . import style
from .maps import VisualContext
from .render import TARGET_PIXELS, blank_tile, render_regions, tile_figure

__all__ = ["top_k", "image_gallery", "caption_gallery"]


def top_k(scores: Any, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first (stable for ties: lower index first)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ConfigError("no scores to rank")
    k = max(1, min(int(k), s.size))
    return np.argsort(-s, kind="stable")[:k]


def image_gallery(scores: Any, visual: VisualContext | None = None, k: int = 8, gt: Collection[int] = (),
                  query: str = "", overlays: Mapping[int, Any] | None = None, ncols: int = 4,
                  image_ids: Sequence[int] | None = None, note: str | None = None,
                  save_to: str | os.PathLike | None = None) -> Figure:
    """The ``k`` best images for a caption, with rank, score and ground truth marked.

    Args:
        scores: ``(n_images,)`` the caption's score against every image.
        visual: pixels/boxes source; images without a file are drawn as labelled tiles.
        gt: indices of the correct images (green frame, "GT" in the title).
        overlays: image index -> ``(R,)`` region weights drawn as tinted boxes (needs boxes).
        image_ids: the dataset image index of each score entry (default ``0 .. n-1``).
        note: an extra line under the title (e.g. how the ranking was computed).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = top_k(s, k)
    ids = np.arange(s.size) if image_ids is None else np.asarray(image_ids)
    gt = {int(g) for g in gt}
    tiles, titles, colours, frames, gids, notes = [], [], [], [], [], []
    missing = 0
    for rank, j in enumerate(order, start=1):
        i = int(ids[j])
        img = visual.image(i) if visual is not None else None
        boxes = visual.boxes_of(i) if visual is not None else None
        tile_note = None
        if overlays is not None and i in overlays and boxes is not None:
            tiles.append(render_regions(img, boxes, np.asarray(overlays[i], dtype=np.float64), max_boxes=6))
        elif img is not None:
            tiles.append(_plain(img))
        else:
            missing += 1
            tiles.append(blank_tile())
            tile_note = f"image {i}\n(no image file)"
        hit = i in gt
        titles.append(f"#{rank} img {i}  {s[j]:.3f}{'  GT' if hit else ''}")
        colours.append(style.GT_COLOR if hit else None)
        frames.append(style.GT_COLOR if hit else None)
        gids.append("gt" if hit else "panel")
        notes.append(tile_note)
    gt_ranks = [int(np.sum(s > s[np.flatnonzero(ids == g)[0]])) + 1 for g in gt if np.any(ids == g)]
    head = f"top-{len(order)} images for “{query}”" if query else f"top-{len(order)} images"
    if gt_ranks:
        head += f" (ground truth at rank {min(gt_ranks)})"
    if missing == len(order):
        head += "\n(no image files available: tiles show indices)"
    if note:
        head += f"\n({note})"
    fig = tile_figure(tiles, titles, ncols=ncols, tile_inches=2.0, title_colors=colours, frames=frames, gids=gids,
                      notes=notes, suptitle=head)
    return style.finish(fig, save_to)


def _plain(image: np.ndarray) -> np.ndarray:
    """An image upsampled like the rendered panels (so that all tiles share one size)."""
    img = np.asarray(image)
    base = img[..., :3].astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    s = max(1, int(round(TARGET_PIXELS / max(base.shape[:2]))))
    return np.repeat(np.repeat(base, s, axis=0), s, axis=1)


def caption_gallery(scores: Any, captions: Sequence[str], k: int = 10, gt: Collection[int] = (),
                    image: np.ndarray | None = None, boxes: np.ndarray | None = None, overlay: Any = None,
                    title: str | None = None, caption_ids: Sequence[int] | None = None,
                    save_to: str | os.PathLike | None = None) -> Figure:
    """The ``k`` best captions for an image: the image (if any) on the left, the ranked list on the right.

    ``scores`` ``(n_captions,)``; ``captions`` the texts of the split (indexed by caption id);
    ``gt`` the correct caption ids (green, ✓); ``caption_ids`` the caption id of each score entry.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = top_k(s, k)
    ids = np.arange(s.size) if caption_ids is None else np.asarray(caption_ids)
    gt = {int(g) for g in gt}
    height = max(2.6, 0.3 * len(order) + 0.8)
    fig = Figure(figsize=(10.5, height))
    ax_img = fig.add_axes((0.01, 0.04, 0.24, 0.86 - 0.3 / height))
    if boxes is not None and overlay is not None:
        ax_img.imshow(render_regions(image, boxes, np.asarray(overlay, dtype=np.float64), max_boxes=6),
                      interpolation="nearest")
    elif image is not None:
        ax_img.imshow(_plain(image), interpolation="nearest")
    else:
        ax_img.text(0.5, 0.5, "(no image file)", ha="center", va="center", fontsize=9, transform=ax_img.transAxes)
    ax_img.axis("off")
    ax = fig.add_axes((0.28, 0.02, 0.71, 0.9 - 0.3 / height))
    ax.axis("off")
    ax.set_label("captions")
    n = len(order)
    for rank, j in enumerate(order, start=1):
        c = int(ids[j])
        hit = c in gt
        y = 1.0 - (rank - 0.5) / max(n, 1)
        ax.text(0.0, y, f"#{rank:<2} {s[j]:.3f} {'✓' if hit else ' '} [{c}] {style.short_label(captions[c], 80)}",
                fontsize=8, va="center", family="monospace", color=style.GT_COLOR if hit else "black",
                fontweight="bold" if hit else "normal", transform=ax.transAxes, gid="gt" if hit else "caption")
        if hit:
            ax.add_patch(Rectangle((-0.01, y - 0.45 / max(n, 1)), 1.0, 0.9 / max(n, 1), transform=ax.transAxes,
                                   fill=False, edgecolor=style.GT_COLOR, linewidth=1.2))
    gt_ranks = [int(np.sum(s > s[np.flatnonzero(ids == g)[0]])) + 1 for g in gt if np.any(ids == g)]
    head = title or f"top-{n} captions"
    if gt_ranks:
        head += f" (first ground-truth caption at rank {min(gt_ranks)})"
    return style.finish(fig, save_to, head)
