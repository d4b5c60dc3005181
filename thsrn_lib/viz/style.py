"""One colour convention for every view, and the figure plumbing they share.

Conventions (so that a reader learns them once):

* **Weights** (attention, gates, edge weights: non-negative, usually summing to 1) use the
  sequential map :data:`WEIGHT_CMAP` (``"viridis"``; dark = little, yellow = much).
* **Signed values** (attributions, score differences) use the diverging map :data:`SIGNED_CMAP`
  (``"RdBu_r"``) centred at zero by :func:`signed_norm`: red raises the score, blue lowers it.
* **Ground truth** is drawn in :data:`GT_COLOR` (green, dashed outline on images, a frame in
  heat maps and galleries); a wrong top pick in :data:`MISS_COLOR` (red).
* **Streams** have fixed colours (:data:`STREAM_COLORS`): text-to-image blue, image-to-text
  orange, their fusion green; other partial scores take the next colours of the ``tab10`` cycle.
* **Node groups** of the reasoning graph: global node, context nodes, local nodes
  (:data:`NODE_COLORS`).

Figures are built as :class:`matplotlib.figure.Figure` objects, never through ``pyplot``: no
global figure registry is touched, nothing is shown implicitly, and figures are garbage
collected like any object. Notebooks display them with ``display(fig)`` (or as a cell's value).
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Colormap, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from ..utils.io import atomic_write

__all__ = [
    "WEIGHT_CMAP",
    "SIGNED_CMAP",
    "GT_COLOR",
    "MISS_COLOR",
    "NEUTRAL_COLOR",
    "STREAM_COLORS",
    "NODE_COLORS",
    "weight_cmap",
    "signed_cmap",
    "weight_norm",
    "signed_norm",
    "stream_color",
    "new_figure",
    "save_figure",
    "finish",
    "short_label",
    "colorbar",
]

WEIGHT_CMAP = "viridis"
SIGNED_CMAP = "RdBu_r"
GT_COLOR = "#2ca02c"
MISS_COLOR = "#d62728"
NEUTRAL_COLOR = "#7f7f7f"
STREAM_COLORS: dict[str, str] = {"t2i": "#1f77b4", "i2t": "#ff7f0e", "fused": "#2ca02c"}
NODE_COLORS: dict[str, str] = {"global": "#d62728", "context": "#9467bd", "local": "#1f77b4"}
LAYOUT = "constrained"  # every static view; the explorer's image panels are mosaics (viz.render)
_EXTRA_COLORS = ["#8c564b", "#e377c2", "#17becf", "#bcbd22", "#9467bd", "#7f7f7f"]


def weight_cmap() -> Colormap:
    """The sequential colour map of non-negative weights."""
    return colormaps[WEIGHT_CMAP]


def signed_cmap() -> Colormap:
    """The diverging colour map of signed values (attributions)."""
    return colormaps[SIGNED_CMAP]


def weight_norm(values: Any, vmax: float | None = None) -> Normalize:
    """``[0, vmax]`` normalisation (``vmax`` default: the largest value, at least a tiny positive)."""
    arr = np.asarray(values, dtype=np.float64)
    top = float(np.nanmax(arr)) if vmax is None and arr.size else (vmax or 1.0)
    return Normalize(vmin=0.0, vmax=max(top, 1e-12))


def signed_norm(values: Any) -> TwoSlopeNorm:
    """A norm centred at 0 and symmetric (``[-m, m]``, m = largest magnitude), so colours compare."""
    arr = np.asarray(values, dtype=np.float64)
    m = float(np.nanmax(np.abs(arr))) if arr.size else 1.0
    m = max(m, 1e-12)
    return TwoSlopeNorm(vcenter=0.0, vmin=-m, vmax=m)


def stream_color(name: str, index: int = 0) -> str:
    """Colour of a stream / partial score (fixed for t2i, i2t, fused; ``index`` picks the others)."""
    base = name.split(":")[-1]
    if base in STREAM_COLORS:
        return STREAM_COLORS[base]
    return _EXTRA_COLORS[index % len(_EXTRA_COLORS)]


def new_figure(n_panels: int = 1, ncols: int | None = None, panel_size: tuple[float, float] = (3.0, 3.0),
               squeeze: bool = False, **subplot_kw: Any) -> tuple[Figure, np.ndarray]:
    """A figure with a grid of ``n_panels`` axes (unused grid cells hidden); axes as a flat array."""
    n_panels = max(1, int(n_panels))
    ncols = max(1, min(ncols or n_panels, n_panels))
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout=LAYOUT)
    axes = fig.subplots(nrows, ncols, squeeze=False, subplot_kw=subplot_kw or None).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, (axes[0] if squeeze and n_panels == 1 else axes[:n_panels])


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically (temporary file + rename) and return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path.with_suffix(path.suffix + ".png") if path.suffix else path.with_suffix(".png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


def finish(fig: Figure, save_to: str | os.PathLike | None = None, title: str | None = None) -> Figure:
    """Common ending of every view: optional suptitle, optional atomic PNG save; returns ``fig``."""
    if title:
        fig.suptitle(title, fontsize=10)
    if save_to is not None:
        save_figure(fig, save_to)
    return fig


def short_label(text: str, width: int = 14) -> str:
    """``text`` cut to ``width`` characters with an ellipsis (tick labels stay readable)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def colorbar(fig: Figure, mappable: Any, axes: Iterable[Any] | Any, label: str) -> None:
    """A shared colour bar for ``axes`` labelled ``label``."""
    cb = fig.colorbar(mappable, ax=axes, shrink=0.8)
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
