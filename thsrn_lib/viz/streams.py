"""The streams side by side: their scores on correct and incorrect pairs, and where they disagree.

A "stream" here is any partial score a model returns from ``score_parts``: TSHSR's ``t2i`` /
``i2t``, SHAN's ``l2l`` / ``g2l`` / ``g2g``, HJE's ``local`` / ``global``, an ensemble's members.

* :func:`part_score_matrices`: ``name -> (n_images, n_captions)`` score matrices of a split
  (``"score"`` is the final one), computed block by block with the evaluation encoders.
* :func:`stream_scores`: per stream, the distribution of scores of correct pairs (caption of
  the image) vs. incorrect ones; a scatter of two streams over the same pairs.
* :func:`stream_disagreement`: per caption, the rank of its image under stream A vs. stream B,
  and which captions they disagree on most (:func:`disagreements` gives the rows as data).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import ConfigError
from . import style

__all__ = ["part_score_matrices", "gt_image_ranks", "disagreements", "stream_scores", "stream_disagreement"]

CAPTIONS_PER_IMAGE = 5


def part_score_matrices(model: Any, dataset: Any, image_indices: Sequence[int] | None = None,
                        caption_indices: Sequence[int] | None = None, batch_size: int = 128,
                        image_block: int = 64) -> dict[str, np.ndarray]:
    """Final and partial scores of every (image, caption) of the selection, in eval mode.

    Returns ``{"score": (n_i, n_c), <part>: (n_i, n_c), ...}`` (float32), rows/columns in the
    order of ``image_indices`` / ``caption_indices`` (default: all).
    """
    from ..evaluation.engine import encode_images, encode_texts, eval_mode
    from ..models.base import select

    img = encode_images(model, dataset, batch_size=batch_size, indices=image_indices)
    shards = encode_texts(model, dataset, batch_size=batch_size, indices=caption_indices)
    n_i = dataset.n_images if image_indices is None else len(image_indices)
    n_c = sum(len(s) for s in shards)
    out: dict[str, np.ndarray] = {}
    with eval_mode(model), torch.inference_mode():
        for i0 in range(0, n_i, image_block):
            blk = select(img, slice(i0, min(n_i, i0 + image_block)))
            for shard in shards:
                sims, parts = model.score_parts(blk, shard.emb)
                cols = shard.position.numpy()
                for name, value in {"score": sims, **parts}.items():
                    if name not in out:
                        out[name] = np.zeros((n_i, n_c), dtype=np.float32)
                    out[name][i0 : i0 + value.shape[0], cols] = value.detach().float().cpu().numpy()
    return out


def _gt_mask(shape: tuple[int, int], image_ids: Sequence[int] | None, caption_ids: Sequence[int] | None) -> np.ndarray:
    n_i, n_c = shape
    imgs = np.arange(n_i) if image_ids is None else np.asarray(image_ids)
    caps = np.arange(n_c) if caption_ids is None else np.asarray(caption_ids)
    return imgs[:, None] == (caps[None, :] // CAPTIONS_PER_IMAGE)


def gt_image_ranks(sims: np.ndarray, image_ids: Sequence[int] | None = None,
                   caption_ids: Sequence[int] | None = None) -> np.ndarray:
    """``(n_c,)`` 1-based rank of each caption's own image among the images (ties count against it)."""
    gt = _gt_mask(sims.shape, image_ids, caption_ids)
    if not gt.any(axis=0).all():
        raise ConfigError("some captions' images are not among the scored images; pass matching index lists")
    own = np.where(gt, sims, -np.inf).max(axis=0)
    return 1 + ((sims >= own[None, :]) & ~gt).sum(axis=0)


def disagreements(mats: Mapping[str, np.ndarray], a: str, b: str, captions: Sequence[str] | None = None,
                  k: int = 10, image_ids: Sequence[int] | None = None,
                  caption_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The ``k`` captions whose own image ranks most differently under streams ``a`` and ``b``."""
    for name in (a, b):
        if name not in mats:
            raise ConfigError(f"no score matrix {name!r}; available: {sorted(mats)}")
    ra = gt_image_ranks(mats[a], image_ids, caption_ids)
    rb = gt_image_ranks(mats[b], image_ids, caption_ids)
    gap = np.log(ra) - np.log(rb)
    order = np.argsort(-np.abs(gap), kind="stable")[:k]
    caps = np.arange(len(ra)) if caption_ids is None else np.asarray(caption_ids)
    return [{"caption": int(caps[j]), "text": captions[int(caps[j])] if captions is not None else "",
             f"rank_{a}": int(ra[j]), f"rank_{b}": int(rb[j]), "better": a if ra[j] < rb[j] else b}
            for j in order if ra[j] != rb[j]]


def stream_scores(mats: Mapping[str, np.ndarray], streams: Sequence[str] | None = None,
                  image_ids: Sequence[int] | None = None, caption_ids: Sequence[int] | None = None,
                  max_negatives: int = 4000, seed: int = 0, title: str | None = None,
                  save_to: str | os.PathLike | None = None) -> Figure:
    """Scores of correct vs. incorrect pairs per stream, and two streams against each other.

    Left panels: one per stream, histograms of correct pairs (green) and a random sample of at
    most ``max_negatives`` incorrect ones (grey). Right panel (with two or more streams): the
    first two streams' scores of the same pairs, correct pairs on top.
    """
    import seaborn as sns

    names = list(streams) if streams is not None else [k for k in mats if k != "score"] or ["score"]
    missing = [n for n in names if n not in mats]
    if missing:
        raise ConfigError(f"no score matrix for {missing}; available: {sorted(mats)}")
    shape = mats[names[0]].shape
    gt = _gt_mask(shape, image_ids, caption_ids)
    rng = np.random.default_rng(seed)
    neg_idx = np.flatnonzero(~gt.ravel())
    if neg_idx.size > max_negatives:
        neg_idx = rng.choice(neg_idx, max_negatives, replace=False)
    pos_idx = np.flatnonzero(gt.ravel())
    n_panels = len(names) + (1 if len(names) >= 2 else 0)
    fig, axes = style.new_figure(n_panels, ncols=min(n_panels, 4), panel_size=(3.2, 2.8))
    for k, (ax, name) in enumerate(zip(axes, names)):
        flat = mats[name].ravel()
        bins = np.linspace(float(flat.min()), float(flat.max()) + 1e-9, 30)
        sns.histplot(flat[neg_idx], bins=bins, ax=ax, color=style.NEUTRAL_COLOR, stat="density", label="incorrect",
                     alpha=0.5)
        sns.histplot(flat[pos_idx], bins=bins, ax=ax, color=style.GT_COLOR, stat="density", label="correct",
                     alpha=0.6)
        gap = float(flat[pos_idx].mean() - flat[neg_idx].mean())
        ax.set_title(f"{name} (mean gap {gap:+.3f})", fontsize=9, color=style.stream_color(name, k))
        ax.set_xlabel("score", fontsize=8)
        ax.legend(fontsize=7)
        ax.set_label("panel")
    if len(names) >= 2:
        ax = axes[len(names)]
        a, b = names[0], names[1]
        xa, xb = mats[a].ravel(), mats[b].ravel()
        ax.scatter(xa[neg_idx], xb[neg_idx], s=4, c=style.NEUTRAL_COLOR, alpha=0.3, label="incorrect")
        ax.scatter(xa[pos_idx], xb[pos_idx], s=6, c=style.GT_COLOR, alpha=0.8, label="correct")
        ax.set_xlabel(a, fontsize=8, color=style.stream_color(a, 0))
        ax.set_ylabel(b, fontsize=8, color=style.stream_color(b, 1))
        r = float(np.corrcoef(xa, xb)[0, 1]) if xa.std() > 0 and xb.std() > 0 else float("nan")
        ax.set_title(f"{a} vs {b} (Pearson r {r:.2f})", fontsize=9)
        ax.legend(fontsize=7, markerscale=2)
        ax.set_label("panel")
    return style.finish(fig, save_to, title or "stream scores on correct and incorrect pairs")


def stream_disagreement(mats: Mapping[str, np.ndarray], a: str, b: str, captions: Sequence[str] | None = None,
                        k: int = 8, image_ids: Sequence[int] | None = None, caption_ids: Sequence[int] | None = None,
                        title: str | None = None, save_to: str | os.PathLike | None = None) -> Figure:
    """Where streams ``a`` and ``b`` disagree: rank of each caption's image under both (log axes),
    the share of captions each ranks better, and the ``k`` largest disagreements listed."""
    ra = gt_image_ranks(mats[a], image_ids, caption_ids) if a in mats else None
    rb = gt_image_ranks(mats[b], image_ids, caption_ids) if b in mats else None
    if ra is None or rb is None:
        raise ConfigError(f"need score matrices {a!r} and {b!r}; available: {sorted(mats)}")
    rows = disagreements(mats, a, b, captions, k, image_ids, caption_ids)
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    grid = fig.add_gridspec(1, 3, width_ratios=[1.1, 0.8, 1.6])
    ax = fig.add_subplot(grid[0])
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, size=(2, ra.size))
    ax.scatter(ra * np.exp(jitter[0] * 0.2), rb * np.exp(jitter[1] * 0.2), s=6, alpha=0.4, c=style.NEUTRAL_COLOR)
    top = max(int(ra.max()), int(rb.max()), 2)
    ax.plot([1, top], [1, top], color="black", linewidth=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"rank of the caption's image, {a}", fontsize=8, color=style.stream_color(a, 0))
    ax.set_ylabel(f"rank, {b}", fontsize=8, color=style.stream_color(b, 1))
    ax.set_title(f"per caption (below the line: {b} ranks better)", fontsize=8)
    ax.set_label("panel")
    ax2 = fig.add_subplot(grid[1])
    shares = [float(np.mean(ra < rb)), float(np.mean(ra == rb)), float(np.mean(ra > rb))]
    ax2.bar([f"{a}\nbetter", "tie", f"{b}\nbetter"], shares,
            color=[style.stream_color(a, 0), style.NEUTRAL_COLOR, style.stream_color(b, 1)])
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("share of captions", fontsize=8)
    ax2.tick_params(labelsize=7)
    ax2.set_label("panel")
    ax3 = fig.add_subplot(grid[2])
    ax3.axis("off")
    lines = [f"{'caption':>7} {a:>6} {b:>6}  text"] + [
        f"{r['caption']:>7} {r[f'rank_{a}']:>6} {r[f'rank_{b}']:>6}  {style.short_label(r['text'], 44)}" for r in rows
    ]
    ax3.text(0.0, 1.0, "\n".join(lines) if rows else "the streams rank every caption's image alike",
             family="monospace", fontsize=7, va="top")
    ax3.set_title("largest disagreements (rank of the caption's own image)", fontsize=8)
    return style.finish(fig, save_to, title or f"where {a} and {b} disagree")
