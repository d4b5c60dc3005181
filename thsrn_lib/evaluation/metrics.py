"""Retrieval metrics of an (images x captions) similarity matrix: ranks, R@K, medr, meanr, rsum.

Conventions (``data_and_protocol.md`` §3):

* ``sims`` has shape ``(n_images, n_captions)``; caption ``k`` belongs to image
  ``k // captions_per_image`` (5 for Flickr30K / MS-COCO / Scenes).
* Ranks are 0-based. Image -> text (i2t): the rank of an image is the best (smallest) position
  of any of its ground-truth captions among all captions. Text -> image (t2i): the rank of a
  caption is the position of its image among all images.
* R@K = 100 * fraction of ranks < K; medr = floor(median(ranks)) + 1, where the median of an
  even count averages the two middle values; meanr = mean(ranks) + 1;
  rsum = R@1 + R@5 + R@10 of both directions.

**Ties** (library rule, an assumption: the official code's unstable argsort leaves them
unspecified): candidates are ordered by *descending score, ties broken by ascending candidate
index* (a stable sort). The position of a target ``t`` is therefore
``#{c : s_c > s_t} + #{c < t : s_c == s_t}``. It equals the usual definition when no scores
tie, is deterministic, and gives a constant score matrix no credit beyond the index order.

Every function accepts NumPy arrays (float16/32/64, memory maps) or torch tensors, and works
in chunks so that temporaries stay small even for the 5,000 x 25,000 COCO 5K matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .protocols import Protocol, fold_slices, get_protocol

__all__ = [
    "METRIC_KEYS",
    "RECALL_KEYS",
    "ranks_i2t",
    "ranks_t2i",
    "metrics_from_ranks",
    "evaluate_sims",
    "evaluate_protocol",
    "fold_metrics",
    "average_metrics",
    "recall_at_k_curve",
    "format_metrics_table",
]

RECALL_KEYS: tuple[str, ...] = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
METRIC_KEYS: tuple[str, ...] = (
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "i2t_medr",
    "i2t_meanr",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "t2i_medr",
    "t2i_meanr",
    "rsum",
)
# Elements per temporary comparison block (bool/float arrays of this many items: ~16-64 MB).
_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------- input checks
def _as_array(sims: Any, name: str = "sims") -> np.ndarray:
    """A NumPy view of ``sims`` (torch tensors are moved to the CPU; memory maps stay maps)."""
    if hasattr(sims, "detach") and hasattr(sims, "cpu"):  # torch.Tensor without importing torch
        sims = sims.detach().cpu()
        if str(sims.dtype) == "torch.bfloat16":
            sims = sims.float()
        sims = sims.numpy()
    if not isinstance(sims, np.ndarray):
        sims = np.asarray(sims)
    if not (np.issubdtype(sims.dtype, np.floating) or np.issubdtype(sims.dtype, np.integer)):
        raise DataError(f"{name} must hold real numbers, got dtype {sims.dtype}")
    return sims


def _check_pairs(sims: np.ndarray, captions_per_image: int) -> tuple[int, int]:
    if (
        isinstance(captions_per_image, bool)
        or not isinstance(captions_per_image, (int, np.integer))
        or captions_per_image < 1
    ):
        raise ConfigError(f"captions_per_image must be a positive integer, got {captions_per_image!r}")
    if sims.ndim != 2:
        raise DataError(f"sims must be a 2-D (n_images, n_captions) matrix, got shape {sims.shape}")
    n_img, n_cap = sims.shape
    if n_img == 0:
        raise DataError(f"sims has no images (shape {sims.shape})")
    if n_cap != captions_per_image * n_img:
        raise DataError(
            f"sims has shape {sims.shape}: {n_cap} captions for {n_img} images, but caption k belongs to image "
            f"k // {captions_per_image}, so n_captions must be {captions_per_image} x n_images = "
            f"{captions_per_image * n_img}. Check that images are counted once (not once per caption)."
        )
    return n_img, n_cap


def _check_finite(block: np.ndarray, where: str) -> None:
    if np.issubdtype(block.dtype, np.floating) and not np.isfinite(block).all():
        bad = np.argwhere(~np.isfinite(block))[0]
        raise DataError(
            f"sims contains NaN or inf ({where}, first at local index {tuple(int(x) for x in bad)}); "
            "ranks are undefined: check the model's outputs (e.g. a diverged checkpoint)"
        )


# ------------------------------------------------------------------------------------------ ranks
def ranks_i2t(sims: Any, captions_per_image: int = 5) -> np.ndarray:
    """0-based rank of each image's best ground-truth caption (image -> text retrieval).

    Args:
        sims: ``(n_images, n_captions)`` scores; caption ``k`` belongs to image ``k // captions_per_image``.

    Returns:
        ``(n_images,)`` int64. Ties follow the module rule (descending score, then ascending
        caption index); the best ground truth is the first of the image's captions in that order.
    """
    s = _as_array(sims)
    n_img, n_cap = _check_pairs(s, captions_per_image)
    out = np.empty(n_img, dtype=np.int64)
    cols = np.arange(n_cap)
    step = max(1, _CHUNK_ELEMENTS // n_cap)
    for r0 in range(0, n_img, step):
        r1 = min(n_img, r0 + step)
        block = np.asarray(s[r0:r1])
        _check_finite(block, f"rows {r0}..{r1 - 1}")
        rows = np.arange(r1 - r0)
        gt = block.reshape(r1 - r0, n_img, captions_per_image)[rows, rows + r0]  # (b, cpi)
        # argmax returns the first maximum: the ground truth that comes first under the tie rule.
        best = (r0 + rows) * captions_per_image + gt.argmax(axis=1)
        best_score = block[rows, best][:, None]
        ahead = (block > best_score).sum(axis=1) + ((block == best_score) & (cols[None, :] < best[:, None])).sum(axis=1)
        out[r0:r1] = ahead
    return out


def ranks_t2i(sims: Any, captions_per_image: int = 5) -> np.ndarray:
    """0-based rank of each caption's image (text -> image retrieval).

    Returns:
        ``(n_captions,)`` int64; ties broken by ascending image index.
    """
    s = _as_array(sims)
    n_img, n_cap = _check_pairs(s, captions_per_image)
    out = np.empty(n_cap, dtype=np.int64)
    rows = np.arange(n_img)[:, None]
    step = max(1, _CHUNK_ELEMENTS // n_img)
    for c0 in range(0, n_cap, step):
        c1 = min(n_cap, c0 + step)
        block = np.asarray(s[:, c0:c1])
        _check_finite(block, f"columns {c0}..{c1 - 1}")
        target = np.arange(c0, c1) // captions_per_image  # (c,)
        target_score = block[target, np.arange(c1 - c0)][None, :]
        ahead = (block > target_score).sum(axis=0) + ((block == target_score) & (rows < target[None, :])).sum(axis=0)
        out[c0:c1] = ahead
    return out


# ---------------------------------------------------------------------------------------- metrics
def _direction(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise DataError(f"{prefix} ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if ranks.min() < 0:
        raise DataError(f"{prefix} ranks must be >= 0 (0-based), got a minimum of {ranks.min()}")
    return {
        f"{prefix}_r1": 100.0 * float(np.mean(ranks < 1)),
        f"{prefix}_r5": 100.0 * float(np.mean(ranks < 5)),
        f"{prefix}_r10": 100.0 * float(np.mean(ranks < 10)),
        # np.median averages the two middle values of an even count, as the official code does.
        f"{prefix}_medr": float(math.floor(float(np.median(ranks)))) + 1.0,
        f"{prefix}_meanr": float(np.mean(ranks)) + 1.0,
    }


def metrics_from_ranks(i2t: Any, t2i: Any) -> dict[str, float]:
    """The metric dict (keys :data:`METRIC_KEYS`) of 0-based i2t and t2i rank arrays."""
    out = {**_direction(np.asarray(i2t), "i2t"), **_direction(np.asarray(t2i), "t2i")}
    out["rsum"] = float(sum(out[k] for k in RECALL_KEYS))
    return {k: out[k] for k in METRIC_KEYS}


def average_metrics(per_fold: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over folds (medr may become fractional).

    rsum is averaged like the others; this equals the sum of the fold-averaged recalls.
    """
    if not per_fold:
        raise ValueError("average_metrics needs at least one fold")
    return {k: float(np.mean([m[k] for m in per_fold])) for k in METRIC_KEYS}


def _fold_blocks(sims: np.ndarray, captions_per_image: int, folds: int) -> list[np.ndarray]:
    if sims.ndim == 3:  # already sliced: (folds, n, cpi * n)
        if folds not in (1, sims.shape[0]):
            raise ConfigError(f"sims is a stack of {sims.shape[0]} fold matrices but folds={folds} was requested")
        return [sims[f] for f in range(sims.shape[0])]
    if sims.ndim != 2:
        raise DataError(
            f"sims must be a 2-D (n_images, n_captions) matrix or a 3-D (folds, n, n_captions_per_fold) stack, "
            f"got shape {sims.shape}"
        )
    n_img, _ = _check_pairs(sims, captions_per_image)
    return [sims[i, c] for i, c in fold_slices(n_img, folds, captions_per_image)]


def fold_metrics(sims: Any, captions_per_image: int = 5, folds: int = 1) -> list[dict[str, float]]:
    """Metrics of each fold: ``folds`` equal consecutive blocks of images with their captions.

    Fold ``f`` holds images ``f*n .. (f+1)*n - 1`` and captions ``f*n*cpi .. (f+1)*n*cpi - 1``
    (n = n_images / folds), i.e. a diagonal block of ``sims``; only those blocks are read.
    ``sims`` may also be a ``(folds, n, cpi*n)`` stack of blocks that were scored separately.
    """
    s = _as_array(sims)
    return [
        metrics_from_ranks(ranks_i2t(b, captions_per_image), ranks_t2i(b, captions_per_image))
        for b in _fold_blocks(s, captions_per_image, folds)
    ]


def evaluate_sims(sims: Any, captions_per_image: int = 5, folds: int = 1) -> dict[str, float]:
    """R@1/5/10, medr, meanr in both directions and rsum of a similarity matrix.

    Args:
        sims: ``(n_images, n_captions)`` scores (caption k belongs to image k // captions_per_image),
            or a ``(folds, n, cpi*n)`` stack of fold blocks.
        captions_per_image: ground-truth captions per image (5).
        folds: 1 for one matrix; ``F > 1`` splits the images (and their captions) into ``F``
            equal consecutive folds, computes every metric per fold and returns their means
            (``folds=5`` on COCO ``testall`` is the COCO 1K protocol).

    Returns:
        ``{i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, t2i_r1, ..., t2i_meanr, rsum}``
        (recalls in percent, ranks 1-based).
    """
    per_fold = fold_metrics(sims, captions_per_image, folds)
    return per_fold[0] if len(per_fold) == 1 else average_metrics(per_fold)


def evaluate_protocol(sims: Any, protocol: str | Protocol = "generic") -> dict[str, float]:
    """:func:`evaluate_sims` under a named protocol, after checking the matrix size it requires.

    ``sims`` is ``(n_images, n_captions)``, or for a multi-fold protocol also the
    ``(folds, n, cpi*n)`` stack that :func:`thsrn_lib.evaluation.evaluate` stores for COCO 1K.
    """
    p = get_protocol(protocol)
    s = _as_array(sims)
    if s.ndim == 3:
        n_img, n_cap = s.shape[0] * s.shape[1], s.shape[0] * s.shape[2]
        if s.shape[0] != p.folds:
            raise DataError(f"sims is a stack of {s.shape[0]} folds but protocol {p.name!r} has {p.folds}")
    elif s.ndim == 2:
        n_img, n_cap = s.shape
    else:
        raise DataError(f"sims must be a 2-D (n_images, n_captions) matrix, got shape {s.shape}")
    p.check_shape(n_img, n_cap, source=f"sims of shape {s.shape}")
    return evaluate_sims(s, p.captions_per_image, p.folds)


def recall_at_k_curve(ranks: Any, max_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """R@K for every K = 1..max_k from 0-based ranks.

    Returns:
        ``(ks (max_k,), recall (max_k,))`` with ``recall[K-1] = 100 * mean(ranks < K)``;
        ``max_k`` defaults to ``max(ranks) + 1`` (where the curve reaches 100).
    """
    r = np.asarray(ranks).reshape(-1)
    if r.size == 0:
        raise DataError("recall_at_k_curve needs at least one rank")
    if r.min() < 0:
        raise DataError(f"ranks must be >= 0 (0-based), got a minimum of {r.min()}")
    r = r.astype(np.int64)
    if max_k is None:
        max_k = int(r.max()) + 1
    if isinstance(max_k, bool) or int(max_k) < 1:
        raise ConfigError(f"max_k must be a positive integer, got {max_k!r}")
    max_k = int(max_k)
    counts = np.bincount(np.minimum(r, max_k), minlength=max_k + 1)[:max_k]
    return np.arange(1, max_k + 1), 100.0 * np.cumsum(counts) / r.size


def format_metrics_table(metrics: dict[str, float], title: str | None = None) -> str:
    """A plain-text table with correctly labelled rows (rsum recomputed from the six recalls).

    The official 5-fold summary mislabels three lines (``data_and_protocol.md`` §5.1); this
    table prints each number under its own name.
    """
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ConfigError(f"metrics lack {', '.join(missing)}")
    lines = [title] if title else []
    lines.append(f"{'direction':<22}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'meanr':>9}{'mean R':>9}")
    for prefix, label in (("i2t", "image -> text (i2t)"), ("t2i", "text -> image (t2i)")):
        recalls = [metrics[f"{prefix}_r{k}"] for k in (1, 5, 10)]
        lines.append(
            f"{label:<22}"
            + "".join(f"{v:8.2f}" for v in recalls)
            + f"{metrics[f'{prefix}_medr']:8.1f}{metrics[f'{prefix}_meanr']:9.2f}{np.mean(recalls):9.2f}"
        )
    rsum = sum(metrics[k] for k in RECALL_KEYS)
    lines.append(f"{'rsum (6 recalls)':<22}{rsum:8.2f}")
    return "\n".join(lines)
