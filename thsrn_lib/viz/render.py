"""Fast raster drawing for image panels: region boxes composited into the pixels with numpy, and
many panels laid out as one mosaic image in a single axes.

Matplotlib patches and one axes per panel cost ~0.1 s per panel to build and render; the
explorer redraws galleries and word panels on every click, so image panels are rasterised
here instead: each box is alpha-blended into an upsampled copy of the image (weakest first, so
the strongest lies on top), outlines are drawn into the pixels, and the panels are tiled into one
array shown by one ``imshow``. Panel titles are text artists with ``gid="panel"`` (``"gt"`` for
ground-truth items of a gallery) so that tests can count them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure

from . import style

__all__ = ["render_regions", "outline_region", "blank_tile", "tile_figure", "TARGET_PIXELS"]

TARGET_PIXELS = 240  # panels are upsampled (nearest) to about this size so that 1-2 px outlines stay crisp


def _canvas(image: np.ndarray | None, boxes: np.ndarray | None, scale: int | None) -> tuple[np.ndarray, int]:
    if image is None:
        h = int(np.ceil(float(np.max(boxes[:, 3])))) if boxes is not None and len(boxes) else 64
        w = int(np.ceil(float(np.max(boxes[:, 2])))) if boxes is not None and len(boxes) else 64
        base = np.full((max(h, 1), max(w, 1), 3), 0.93, dtype=np.float32)
    else:
        img = np.asarray(image)
        base = img[..., :3].astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
        if base.ndim == 2:
            base = np.repeat(base[..., None], 3, axis=2)
    s = scale or max(1, int(round(TARGET_PIXELS / max(base.shape[:2]))))
    return np.repeat(np.repeat(base, s, axis=0), s, axis=1), s


def _box_px(box: Sequence[float], s: int, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    h, w = shape[:2]
    x1, y1, x2, y2 = (float(v) * s for v in box)
    x1, x2 = int(np.clip(round(x1), 0, w - 1)), int(np.clip(round(x2), 1, w))
    y1, y2 = int(np.clip(round(y1), 0, h - 1)), int(np.clip(round(y2), 1, h))
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def _outline(canvas: np.ndarray, box_px: tuple[int, int, int, int], colour: Any, width: int,
             dashed: bool = False) -> None:
    x1, y1, x2, y2 = box_px
    c = np.asarray(to_rgb(colour), dtype=np.float32)
    t = max(1, int(width))
    edges = [(slice(y1, min(y1 + t, y2)), slice(x1, x2), x2 - x1, 1),  # top
             (slice(max(y2 - t, y1), y2), slice(x1, x2), x2 - x1, 1),  # bottom
             (slice(y1, y2), slice(x1, min(x1 + t, x2)), y2 - y1, 0),  # left
             (slice(y1, y2), slice(max(x2 - t, x1), x2), y2 - y1, 0)]  # right
    for ys, xs, length, along_x in edges:
        if not dashed:
            canvas[ys, xs] = c
            continue
        dash = max(3, 3 * t)
        on = (np.arange(length) // dash) % 2 == 0
        region = canvas[ys, xs]
        if along_x:
            region[:, on] = c
        else:
            region[on, :] = c
        canvas[ys, xs] = region


def render_regions(image: np.ndarray | None, boxes: np.ndarray, weights: Any, signed: bool = False,
                   norm: Normalize | None = None, gt: Sequence[int] = (), highlight: int | None = None,
                   scale: int | None = None, max_boxes: int | None = None) -> np.ndarray:
    """``(H', W', 3)`` float RGB: ``image`` with every box tinted by its weight, as a raster.

    Fill opacity and outline width grow with ``|weight|``; colours follow the style convention
    (weights: viridis; ``signed``: RdBu_r centred at 0). The arg-max (or ``highlight``) gets a
    white-and-colour outline, ``gt`` regions a dashed green one. ``max_boxes`` keeps only the
    strongest boxes (plus the ground truth), for small thumbnails.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    canvas, s = _canvas(image, boxes, scale)
    cmap = style.signed_cmap() if signed else style.weight_cmap()
    norm = norm or (style.signed_norm(w) if signed else style.weight_norm(w))
    mag = np.abs(w) / max(float(np.max(np.abs(w))) if w.size else 1.0, 1e-12)
    order = np.argsort(mag, kind="stable")
    if max_boxes is not None:
        order = order[-max_boxes:]
    colours = cmap(norm(w))[:, :3].astype(np.float32)
    base_w = max(1, s // 2)
    for r in order:
        px = _box_px(boxes[r], s, canvas.shape)
        x1, y1, x2, y2 = px
        a = 0.06 + 0.42 * float(mag[r])
        canvas[y1:y2, x1:x2] = (1 - a) * canvas[y1:y2, x1:x2] + a * colours[r]
        if mag[r] >= 0.15:  # weak boxes only tint: their outlines would clutter the panel
            _outline(canvas, px, colours[r], base_w + int(round(1.5 * s * mag[r] / 2)))
    for r in gt:
        _outline(canvas, _box_px(boxes[int(r)], s, canvas.shape), style.GT_COLOR, base_w + 1, dashed=True)
    top = int(np.argmax(w)) if highlight is None else int(highlight)
    px = _box_px(boxes[top], s, canvas.shape)
    _outline(canvas, px, "white", base_w + 2)
    inner = (px[0] + 1, px[1] + 1, px[2] - 1, px[3] - 1) if px[2] - px[0] > 3 and px[3] - px[1] > 3 else px
    _outline(canvas, inner, colours[top], base_w)
    return np.clip(canvas, 0.0, 1.0)


def outline_region(image: np.ndarray | None, boxes: np.ndarray, r: int, gt: bool = False,
                   scale: int | None = None) -> np.ndarray:
    """The image with every box faintly outlined and box ``r`` boldly (dashed green if ground truth)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    canvas, s = _canvas(image, boxes, scale)
    for k in range(len(boxes)):
        if k != r:
            px = _box_px(boxes[k], s, canvas.shape)
            x1, y1, x2, y2 = px
            keep = canvas[y1:y2, x1:x2].copy()
            _outline(canvas, px, "white", 1)
            canvas[y1:y2, x1:x2] = 0.55 * canvas[y1:y2, x1:x2] + 0.45 * keep
    px = _box_px(boxes[r], s, canvas.shape)
    _outline(canvas, px, "white", max(2, s // 2 + 2))
    _outline(canvas, px, style.GT_COLOR if gt else style.STREAM_COLORS["i2t"], max(1, s // 2 + 1), dashed=gt)
    return canvas


def blank_tile(shape: tuple[int, int] = (TARGET_PIXELS, TARGET_PIXELS)) -> np.ndarray:
    return np.full((*shape, 3), 0.93, dtype=np.float32)


def tile_figure(tiles: Sequence[np.ndarray], titles: Sequence[str], ncols: int = 6, tile_inches: float = 1.9,
                title_colors: Sequence[str | None] | None = None, frames: Sequence[str | None] | None = None,
                gids: Sequence[str] | None = None, notes: Sequence[str | None] | None = None,
                title_lines: int = 1, colorbar: tuple[ScalarMappable, str] | None = None,
                suptitle: str | None = None) -> Figure:
    """One figure showing ``tiles`` (RGB arrays) in a grid with a title above each.

    ``frames``: a colour per tile for a thick frame (None: none); ``notes``: text drawn over
    the middle of a tile (e.g. "no image file"); ``gids``: the gid of each title text
    (default ``"panel"``). Titles may span ``title_lines`` lines.
    """
    n = len(tiles)
    if n == 0:
        raise ValueError("no panels to draw")
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    gap = max(4, int(0.05 * tw))
    head = int(0.11 * th * title_lines) + gap
    H = nrows * (th + head) + gap
    W = ncols * (tw + gap) + gap
    mosaic = np.ones((H, W, 3), dtype=np.float32)
    origins = []
    for k, t in enumerate(tiles):
        row, col = divmod(k, ncols)
        y0, x0 = row * (th + head) + head, col * (tw + gap) + gap
        mosaic[y0 : y0 + t.shape[0], x0 : x0 + t.shape[1]] = t[..., :3]
        origins.append((x0, y0, t.shape[1], t.shape[0]))
        frame = frames[k] if frames is not None else None
        if frame is not None:
            _outline(mosaic, (max(x0 - 3, 0), max(y0 - 3, 0), min(x0 + t.shape[1] + 3, W), min(y0 + t.shape[0] + 3, H)),
                     frame, 3)
    top_in = 0.5 if suptitle else 0.1
    cb_in = 0.9 if colorbar is not None else 0.0
    width_in = tile_inches * ncols * (W / (ncols * tw))
    height_in = width_in * H / W
    fig = Figure(figsize=(width_in + cb_in, height_in + top_in))
    fw, fh = width_in + cb_in, height_in + top_in
    ax = fig.add_axes((0.0, 0.0, width_in / fw, height_in / fh))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.axis("off")
    ax.set_label("mosaic")
    fontsize = max(6.0, min(9.0, 4.2 * tile_inches))
    for k, (x0, y0, w, h) in enumerate(origins):
        colour = (title_colors[k] if title_colors is not None else None) or "black"
        ax.text(x0 + w / 2, y0 - 3, titles[k], ha="center", va="bottom", fontsize=fontsize, color=colour,
                gid=gids[k] if gids is not None else "panel", clip_on=False)
        note = notes[k] if notes is not None else None
        if note:
            ax.text(x0 + w / 2, y0 + h / 2, note, ha="center", va="center", fontsize=fontsize, color="black")
    if colorbar is not None:
        mappable, label = colorbar
        cax = fig.add_axes(((width_in + 0.15) / fw, 0.12 * height_in / fh, 0.15 / fw, 0.76 * height_in / fh))
        cb = fig.colorbar(mappable, cax=cax)
        cb.set_label(label, fontsize=7)
        cb.ax.tick_params(labelsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9, y=1.0 - 0.06 / fh, va="top")
    return fig
