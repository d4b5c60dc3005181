"""Word-region alignment views: attention over the image with its boxes, or a heat map.

* :func:`word_to_region`: one panel per word; each panel is the image with every region box
  tinted by that word's weight on it (the top region outlined thick, ground-truth regions dashed
  green). Without an image or boxes (real features usually have neither), a compact
  words x regions heat map, and the figure says so.
* :func:`region_to_word`: one panel per region; the region's box on the image and its weights
  over the caption's words as bars. Fallback: a regions x words heat map.
* :func:`word_region_heatmap`: the compact heat map itself (GT cells framed green).
* :func:`pair_attention`: the right one of the above for a :class:`~thsrn_lib.viz.maps.PairMaps`
  and a stream.
* :func:`attention_vs_attribution`: attention and attribution of the same pair side by side.

All functions return a :class:`~matplotlib.figure.Figure` and save it (atomic PNG) when
``save_to`` is given.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..errors import ConfigError
from . import style
from .maps import PairMaps, VisualContext
from .render import outline_region, render_regions, tile_figure

__all__ = [
    "FALLBACK_NOTE",
    "word_to_region",
    "region_to_word",
    "word_region_heatmap",
    "pair_attention",
    "attention_vs_attribution",
]

FALLBACK_NOTE = "no image/boxes available: word x region heat map"
_MAX_PANELS = 24


def _check_map(weights: Any, rows: int, what: str) -> np.ndarray:
    arr = np.asarray(weights, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise ConfigError(f"{what} must be a 2-D array with {rows} rows (one per label), got shape {arr.shape}")
    return arr


def word_region_heatmap(weights: Any, labels: Sequence[str], gt_regions: Mapping[int, Sequence[int]] | None = None,
                        title: str | None = None, note: str | None = None, signed: bool = False,
                        region_labels: Sequence[str] | None = None, row_axis: str = "word",
                        save_to: str | os.PathLike | None = None, ax: Any = None) -> Figure:
    """Compact heat map ``(rows, R)``: rows are words (or regions, ``row_axis="region"``).

    ``gt_regions`` maps a row index to its ground-truth columns, which are framed green;
    the arg-max of each row gets a dot. ``note`` is written under the title (e.g. why there is
    no image). With ``ax`` the map is drawn there and its figure returned (no save/title).
    """
    import seaborn as sns

    arr = _check_map(weights, len(labels), "weights")
    own = ax is None
    if own:
        fig = Figure(figsize=(1.2 + 0.32 * arr.shape[1], 1.0 + 0.3 * arr.shape[0]), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    cmap = style.signed_cmap() if signed else style.weight_cmap()
    norm = style.signed_norm(arr) if signed else style.weight_norm(arr)
    cols = list(region_labels) if region_labels is not None else [f"r{r}" for r in range(arr.shape[1])]
    sns.heatmap(arr, ax=ax, cmap=cmap, norm=norm, cbar=own, xticklabels=cols,
                yticklabels=[style.short_label(t) for t in labels], linewidths=0.3, linecolor="white",
                cbar_kws={"label": "attribution" if signed else "weight", "shrink": 0.8} if own else None)
    ax.set_label("heatmap")
    for row, regs in (gt_regions or {}).items():
        for r in regs:
            ax.add_patch(Rectangle((r, row), 1, 1, fill=False, edgecolor=style.GT_COLOR, linewidth=2.0))
    if arr.size and np.isfinite(arr).all():
        tops = np.argmax(arr, axis=1)
        ax.scatter(tops + 0.5, np.arange(arr.shape[0]) + 0.5, s=9, c="white", edgecolors="black", linewidths=0.5)
    ax.set_xlabel("region" if row_axis == "word" else "word", fontsize=8)
    ax.set_ylabel(row_axis, fontsize=8)
    ax.tick_params(labelsize=7)
    if own:
        head = title or ""
        if note:
            head = f"{head}\n({note})" if head else f"({note})"
        return style.finish(fig, save_to, head or None)
    return fig


def _gt_note(gt: Sequence[int], top: int) -> str:
    if not gt:
        return ""
    return " ✓" if top in gt else " ✗"


def word_to_region(weights: Any, tokens: Sequence[str], image: np.ndarray | None = None,
                   boxes: np.ndarray | None = None, gt_regions: Mapping[int, Sequence[int]] | None = None,
                   positions: Sequence[int] | None = None, title: str | None = None, note: str | None = None,
                   signed: bool = False, ncols: int = 6, save_to: str | os.PathLike | None = None) -> Figure:
    """Each word's weights over the regions ``weights (n, R)``, drawn over the image, one panel per word.

    Args:
        tokens: the ``n`` words (model positions, ``<start>`` first).
        image: ``(H, W, 3)`` pixels; boxes: ``(R, 4)`` pixel boxes. Boxes without an image are
            drawn on a grey canvas; without boxes the view falls back to
            :func:`word_region_heatmap` and the title says so.
        gt_regions: position -> ground-truth regions (dashed green; the panel title gets ✓/✗).
        positions: which word positions get a panel (default: every valid position, at most 24).
        signed: values are attributions (diverging colours) rather than weights.
    """
    arr = _check_map(weights, len(tokens), "weights")
    gt_regions = dict(gt_regions or {})
    if boxes is None:
        why = note or FALLBACK_NOTE
        if "heat map" not in why:
            why = f"{why}: word x region heat map"
        return word_region_heatmap(arr, tokens, gt_regions, title=title, note=why, signed=signed, save_to=save_to)
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape != (arr.shape[1], 4):
        raise ConfigError(f"boxes must be (R, 4) = ({arr.shape[1]}, 4) for these weights, got {boxes.shape}")
    pos = list(range(len(tokens))) if positions is None else [int(p) for p in positions]
    if not pos:
        raise ConfigError("no word positions to draw")
    pos = pos[:_MAX_PANELS]
    cmap = style.signed_cmap() if signed else style.weight_cmap()
    norm = style.signed_norm(arr[pos]) if signed else style.weight_norm(arr[pos])
    tiles, titles, colours = [], [], []
    for p in pos:
        gt = list(gt_regions.get(p, ()))
        tiles.append(render_regions(image, boxes, arr[p], signed=signed, norm=norm, gt=gt))
        top = int(np.argmax(arr[p]))
        titles.append(f"{style.short_label(tokens[p])} → r{top}{_gt_note(gt, top)}")
        colours.append((style.GT_COLOR if top in gt else style.MISS_COLOR) if gt else None)
    head = title or ""
    if note:
        head = f"{head}\n({note})" if head else f"({note})"
    if image is None:
        head = f"{head}\n(no image file: boxes on a blank canvas)" if head else "(no image file: boxes on a blank canvas)"
    fig = tile_figure(tiles, titles, ncols=ncols, title_colors=colours, suptitle=head or None,
                      colorbar=(ScalarMappable(norm=norm, cmap=cmap), "attribution" if signed else "weight"))
    return style.finish(fig, save_to)


def region_to_word(weights: Any, tokens: Sequence[str], image: np.ndarray | None = None,
                   boxes: np.ndarray | None = None, regions: Sequence[int] | None = None,
                   gt_regions: Mapping[int, Sequence[int]] | None = None, title: str | None = None,
                   note: str | None = None, ncols: int = 4, save_to: str | os.PathLike | None = None) -> Figure:
    """Each region's weights over the words ``weights (R, n)`` (image-to-text attention), one panel per region.

    A panel shows the region's box on the image and, in its title, the three words the region
    attends to most with their weights. ``regions`` picks the panels (default: all, at most 24).
    Regions that are a ground-truth region of some word are outlined dashed green. Without boxes:
    the full regions x words heat map, and the title says so.
    """
    arr = np.asarray(weights, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(tokens):
        raise ConfigError(f"weights must be (R, n) with n = {len(tokens)} words, got shape {arr.shape}")
    gt_regions = dict(gt_regions or {})
    gt_rows: dict[int, list[int]] = {}
    for p, regs in gt_regions.items():  # transpose: region -> words it grounds
        for r in regs:
            gt_rows.setdefault(int(r), []).append(int(p))
    if boxes is None:
        why = note or "no image/boxes available: region x word heat map"
        if "heat map" not in why:
            why = f"{why}: region x word heat map"
        return word_region_heatmap(arr, [f"r{r}" for r in range(arr.shape[0])], gt_rows, title=title, note=why,
                                   region_labels=[style.short_label(t, 10) for t in tokens], row_axis="region",
                                   save_to=save_to)
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape != (arr.shape[0], 4):
        raise ConfigError(f"boxes must be (R, 4) = ({arr.shape[0]}, 4) for these weights, got {boxes.shape}")
    regs = list(range(arr.shape[0])) if regions is None else [int(r) for r in regions]
    regs = regs[:_MAX_PANELS]
    tiles, titles = [], []
    for r in regs:
        tiles.append(outline_region(image, boxes, r, gt=r in gt_rows))
        best = np.argsort(-arr[r], kind="stable")[:3]
        words = " · ".join(f"{style.short_label(tokens[j], 9)} {arr[r, j]:.2f}" for j in best)
        titles.append(f"r{r}{' (GT)' if r in gt_rows else ''}\n{words}")
    head = title or ""
    if note:
        head = f"{head}\n({note})" if head else f"({note})"
    head = f"{head}\n(each region's top-3 words)" if head else "(each region's top-3 words)"
    fig = tile_figure(tiles, titles, ncols=ncols, title_lines=2, suptitle=head)
    return style.finish(fig, save_to)


def _visual(pair: PairMaps, visual: VisualContext | None) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    if visual is None or pair.image_index is None:
        return None, None, "no image/boxes given" if visual is None else "free pair without an image index"
    i = pair.image_index
    return visual.image(i), visual.boxes_of(i), visual.missing(i)


def pair_attention(pair: PairMaps, stream: str | None = None, visual: VisualContext | None = None,
                   positions: Sequence[int] | None = None, regions: Sequence[int] | None = None,
                   save_to: str | os.PathLike | None = None) -> Figure:
    """The alignment view of a pair for ``stream`` (default: the first the model has).

    Text-to-image streams (and HJE's affinity) -> :func:`word_to_region`; image-to-text streams ->
    :func:`region_to_word` (regions default to those ranked first by some word). Falls back to
    heat maps when ``visual`` has no boxes for the image, and says so.
    """
    if not pair.word_region:
        raise ConfigError("this pair has no word-region maps (the model exposes no attention)")
    stream = stream or pair.streams[0]
    if stream not in pair.word_region:
        raise ConfigError(f"stream {stream!r} not available for this model; available: {pair.streams}")
    image, boxes, missing = _visual(pair, visual)
    kind = "affinity in HJE's local space" if pair.sources.get(stream) == "hje_local_affinity" else "attention"
    title = f"{stream} {kind} — “{pair.caption}” (score {pair.score:.3f})" if pair.caption else f"{stream} {kind}"
    note = f"{missing}: heat map" if boxes is None and missing else None
    if stream.split(":")[-1] == "i2t" and stream in pair.region_word:
        rw = pair.region_word[stream]
        if regions is None:
            regions = sorted({int(np.argmax(rw[:, p])) for p in pair.content_positions()}) or list(range(rw.shape[0]))
        return region_to_word(rw, pair.tokens, image=image, boxes=boxes, regions=regions,
                              gt_regions=pair.gt_regions, title=title, note=note, save_to=save_to)
    return word_to_region(pair.display[stream], pair.tokens, image=image, boxes=boxes, gt_regions=pair.gt_regions,
                          positions=positions, title=title, note=note, save_to=save_to)


def attention_vs_attribution(tokens: Sequence[str], attention: Any, token_attr: Any, region_attr: Any,
                             image: np.ndarray | None = None, boxes: np.ndarray | None = None,
                             positions: Sequence[int] | None = None,
                             gt_regions: Mapping[int, Sequence[int]] | None = None,
                             title: str | None = None, attention_label: str = "attention",
                             attribution_label: str = "integrated gradients",
                             save_to: str | os.PathLike | None = None) -> Figure:
    """Attention and attribution of one pair side by side.

    Layout: top row, the per-token attribution of the pair's score (bars, red = raises it);
    then one row per chosen word: its attention over the regions (left) and its region
    attribution (right), over the image when boxes are given, else as one-row heat maps.

    Args:
        attention: ``(n, R)`` word-region weights; token_attr: ``(n,)``; region_attr: ``(n, R)``
            token-conditioned region attributions (or ``(R,)``, the same for every word).
        positions: words to show (default: up to 4 content words with ground truth, else the
            first content words).
    """
    att = _check_map(attention, len(tokens), "attention")
    tok = np.asarray(token_attr, dtype=np.float64).reshape(-1)
    if tok.shape[0] != len(tokens):
        raise ConfigError(f"token_attr must have one value per token ({len(tokens)}), got {tok.shape[0]}")
    reg = np.asarray(region_attr, dtype=np.float64)
    if reg.ndim == 1:
        reg = np.broadcast_to(reg, att.shape)
    reg = _check_map(reg, len(tokens), "region_attr")
    gt_regions = dict(gt_regions or {})
    if positions is None:
        content = [p for p, t in enumerate(tokens) if t not in ("<start>", "<end>", "<pad>")]
        positions = [p for p in content if p in gt_regions][:4] or content[:4] or [0]
    positions = [int(p) for p in positions]
    rows = len(positions)
    fig = Figure(figsize=(7.0, 1.8 + 2.6 * rows), layout="constrained")
    grid = fig.add_gridspec(rows + 1, 2, height_ratios=[1.0] + [2.0] * rows)
    ax_tok = fig.add_subplot(grid[0, :])
    norm_tok = style.signed_norm(tok)
    ax_tok.bar(np.arange(len(tokens)), tok, color=[style.signed_cmap()(norm_tok(v)) for v in tok])
    ax_tok.axhline(0, color="black", linewidth=0.6)
    ax_tok.set_xticks(np.arange(len(tokens)))
    ax_tok.set_xticklabels([style.short_label(t, 10) for t in tokens], rotation=60, fontsize=7)
    ax_tok.set_title(f"per-token {attribution_label} of the pair score", fontsize=9)
    ax_tok.tick_params(axis="y", labelsize=7)
    norm_att = style.weight_norm(att[positions])
    norm_reg = style.signed_norm(reg[positions])
    for k, p in enumerate(positions):
        ax_a, ax_r = fig.add_subplot(grid[k + 1, 0]), fig.add_subplot(grid[k + 1, 1])
        gt = gt_regions.get(p, ())
        for ax, values, signed, norm, label in ((ax_a, att[p], False, norm_att, attention_label),
                                                  (ax_r, reg[p], True, norm_reg, attribution_label)):
            top = int(np.argmax(values))
            if boxes is not None:
                ax.imshow(render_regions(image, np.asarray(boxes, dtype=np.float64), values, signed=signed, norm=norm,
                                         gt=list(gt)), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.imshow(values[None, :], aspect="auto", cmap=style.signed_cmap() if signed else style.weight_cmap(),
                          norm=norm)
                for r in gt:
                    ax.add_patch(Rectangle((r - 0.5, -0.5), 1, 1, fill=False, edgecolor=style.GT_COLOR, linewidth=2))
                ax.set_yticks([])
                ax.set_xticks(np.arange(values.shape[0]))
                ax.set_xticklabels([f"r{r}" for r in range(values.shape[0])], fontsize=6)
            ax.set_title(f"{style.short_label(tokens[p])}: {label} → r{top}{_gt_note(gt, top)}", fontsize=8)
            ax.set_label("panel")
    head = title or ""
    if boxes is None:
        head = f"{head}\n({FALLBACK_NOTE})" if head else f"({FALLBACK_NOTE})"
    return style.finish(fig, save_to, head or None)
