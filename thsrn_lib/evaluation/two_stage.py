"""Two-stage retrieval: shortlist with fast vectors, re-rank the shortlist with a cross-attention model.

Stage 1 ranks all candidates with a dot product of fixed vectors: an embedding model's (e.g.
HJE, ``first_stage=model``) or the re-ranking model's own global vectors
(``global_image_vectors`` / ``global_text_vectors``, ``first_stage=None``). Each image keeps its
top-``k`` captions, each caption its top-``k`` images (ties: ascending index, as in
:mod:`.metrics`).

Stage 2 scores only the shortlisted pairs with the cross-attention model. Pairs are grouped per
image: image ``i`` is scored in one call against the union of its own shortlist and of the
captions whose shortlist contains ``i``, so every needed pair is scored exactly once (a pair
shortlisted in both directions is not scored twice) and no unneeded pair is scored.

Final ranking of a query: its shortlist ordered by the re-ranking score (descending, ties by
ascending candidate index), then every other candidate in first-stage order. Unscored pairs
therefore rank below all scored ones, and a ground truth outside the shortlist keeps its
first-stage position (``>= k``). With ``k >=`` the number of candidates the result equals full
scoring.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..models.base import Embeddings, MatchingModel, concat, select
from .engine import (
    DEFAULT_MEMORY_BUDGET_MB,
    TextShard,
    _model_device,
    _progress,
    _sync,
    choose_shards,
    encode_images,
    encode_texts,
    estimate_pair_bytes,
    eval_mode,
    num_items,
    score_matrix,
)
from .metrics import RECALL_KEYS, evaluate_sims, metrics_from_ranks, ranks_i2t, ranks_t2i

__all__ = ["TwoStageResult", "two_stage_retrieval", "first_stage_sims", "shortlists"]

# Elements of one first-stage block sorted at a time.
_SORT_CHUNK = 1 << 23


@dataclass
class TwoStageResult:
    """Recall and cost of two-stage retrieval for several shortlist sizes, against full scoring.

    Attributes:
        first_stage: what produced the shortlists (``"global vectors of <model>"`` or the model name).
        n_images, n_captions: matrix size; ``n_images * n_captions`` pairs for full scoring.
        encode_seconds: encoding with the re-ranking model (shared by full and two-stage scoring).
        first_stage_seconds: first-stage vectors, similarities and sorting (once for all k).
        first_stage_metrics: metrics of the first stage alone.
        full: ``{"metrics", "pairs", "seconds"}`` of full scoring (None if not computed).
        per_k: one dict per k: ``k``, ``k_i2t``, ``k_t2i``, ``metrics``, ``pairs_scored``,
            ``pair_fraction`` (of full), ``pair_reduction`` (full / scored), ``rerank_seconds``,
            ``seconds`` (first stage + re-ranking), ``recall_loss`` (full minus two-stage, per recall
            and rsum; present when ``full`` is).
    """

    first_stage: str
    n_images: int
    n_captions: int
    encode_seconds: float
    first_stage_seconds: float
    first_stage_metrics: dict[str, float]
    full: dict[str, Any] | None
    per_k: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """Plain-text summary: one row per k (and the full and first-stage-only references)."""
        head = (
            f"{'method':<18}{'pairs':>12}{'x fewer':>9}{'seconds':>9}"
            + "".join(f"{k.replace('_r', ' R@'):>10}" for k in RECALL_KEYS)
            + f"{'rsum':>9}"
        )
        rows = [head]

        def row(name: str, pairs: int | None, secs: float | None, m: dict[str, float]) -> str:
            red = f"{self.n_images * self.n_captions / pairs:9.1f}" if pairs else f"{'':>9}"
            s = f"{secs:9.2f}" if secs is not None else f"{'':>9}"
            p = f"{pairs:12,d}" if pairs is not None else f"{'':>12}"
            return f"{name:<18}{p}{red}{s}" + "".join(f"{m[k]:10.2f}" for k in RECALL_KEYS) + f"{m['rsum']:9.2f}"

        if self.full is not None:
            rows.append(row("full scoring", self.full["pairs"], self.full["seconds"], self.full["metrics"]))
        rows.append(row("first stage only", None, self.first_stage_seconds, self.first_stage_metrics))
        for r in self.per_k:
            rows.append(row(f"two-stage k={r['k']}", r["pairs_scored"], r["seconds"], r["metrics"]))
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "first_stage": self.first_stage,
            "n_images": self.n_images,
            "n_captions": self.n_captions,
            "encode_seconds": self.encode_seconds,
            "first_stage_seconds": self.first_stage_seconds,
            "first_stage_metrics": self.first_stage_metrics,
            "full": self.full,
            "per_k": self.per_k,
        }


# ----------------------------------------------------------------------------------- first stage
def _text_vectors(model: MatchingModel, shards: Sequence[TextShard], n_cap: int) -> torch.Tensor | None:
    out: torch.Tensor | None = None
    for s in shards:
        v = model.global_text_vectors(s.emb)
        if v is None:
            return None
        if out is None:
            out = v.new_empty((n_cap, v.shape[1]))
        out[s.position.to(v.device)] = v
    return out


def first_stage_sims(
    model: MatchingModel, img_emb: Embeddings, txt_shards: Sequence[TextShard], memory_budget_mb: float
) -> np.ndarray:
    """Float32 ``(n_images, n_captions)`` first-stage scores: a dot product of ``model``'s fixed vectors.

    Uses ``global_image_vectors`` / ``global_text_vectors``; an embedding model without them is
    scored in full with :func:`~.engine.score_matrix` (one matmul per shard).
    """
    n_img, n_cap = num_items(img_emb), sum(len(s) for s in txt_shards)
    with eval_mode(model), torch.inference_mode():
        gi = model.global_image_vectors(img_emb)
        gt = _text_vectors(model, txt_shards, n_cap) if gi is not None else None
        if gi is not None and gt is not None:
            return (gi.float() @ gt.float().T).cpu().numpy()
    if getattr(model, "is_embedding_model", False):
        b, c = choose_shards(n_img, n_cap, estimate_pair_bytes(model, img_emb, txt_shards), memory_budget_mb)
        return score_matrix(model, img_emb, txt_shards, b, c)
    raise ConfigError(
        f"model {model.name!r} has no global vectors (global_image_vectors returned None) and is not an embedding "
        "model, so it cannot shortlist; pass first_stage=<an embedding model such as HJE>"
    )


def shortlists(s1: np.ndarray, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k_max`` candidates of every query of the first-stage matrix ``s1 (n_images, n_captions)``.

    Returns:
        ``(i2t (n_images, k_i) caption ids, t2i (n_captions, k_t) image ids)``, best first, ties
        by ascending index; ``k_i = min(k_max, n_captions)``, ``k_t = min(k_max, n_images)``.
    """
    n_img, n_cap = s1.shape
    k_i, k_t = min(k_max, n_cap), min(k_max, n_img)
    t = torch.from_numpy(np.ascontiguousarray(s1, dtype=np.float32))
    i2t = np.empty((n_img, k_i), dtype=np.int64)
    step = max(1, _SORT_CHUNK // n_cap)
    for r0 in range(0, n_img, step):
        i2t[r0 : r0 + step] = (
            torch.sort(t[r0 : r0 + step], dim=1, descending=True, stable=True).indices[:, :k_i].numpy()
        )
    t2i = np.empty((n_cap, k_t), dtype=np.int64)
    step = max(1, _SORT_CHUNK // n_img)
    for c0 in range(0, n_cap, step):
        idx = torch.sort(t[:, c0 : c0 + step], dim=0, descending=True, stable=True).indices[:k_t]
        t2i[c0 : c0 + step] = idx.T.numpy()
    return i2t, t2i


# ------------------------------------------------------------------------------------ re-ranking
def _needed_pairs(i2t: np.ndarray, t2i: np.ndarray, n_cap: int) -> np.ndarray:
    """Sorted unique keys ``image * n_cap + caption`` of every shortlisted pair (both directions)."""
    n_img = i2t.shape[0]
    keys_i = (np.arange(n_img)[:, None] * n_cap + i2t).reshape(-1)
    keys_t = (t2i * n_cap + np.arange(t2i.shape[0])[:, None]).reshape(-1)
    return np.unique(np.concatenate([keys_i, keys_t]))


def _score_pairs(
    model: MatchingModel,
    img_emb: Embeddings,
    txt_shards: Sequence[TextShard],
    keys: np.ndarray,
    n_cap: int,
    progress: bool,
) -> np.ndarray:
    """Scores of the pairs ``keys`` (sorted ``image * n_cap + caption``), one model call per image."""
    # caption -> (shard, row in shard)
    shard_of = np.empty(n_cap, dtype=np.int64)
    row_of = np.empty(n_cap, dtype=np.int64)
    for si, s in enumerate(txt_shards):
        pos = s.position.numpy()
        shard_of[pos] = si
        row_of[pos] = np.arange(len(pos))
    images = keys // n_cap
    bounds = np.searchsorted(images, np.arange(num_items(img_emb) + 1))
    out = np.empty(keys.shape[0], dtype=np.float32)
    todo = np.flatnonzero(np.diff(bounds))
    with eval_mode(model), torch.inference_mode(), _progress(len(todo), "re-ranking", progress, "img") as bar:
        for i in todo.tolist():
            a, b = int(bounds[i]), int(bounds[i + 1])
            caps = keys[a:b] - i * n_cap
            sh = shard_of[caps]
            order = np.argsort(sh, kind="stable")  # group the captions by shard: one gather per shard
            pieces, placed = [], []
            for si in np.unique(sh).tolist():
                sel = order[sh[order] == si]
                shard = txt_shards[si]
                rows = torch.from_numpy(row_of[caps[sel]])
                pieces.append(select(shard.emb, _on_device_index(rows, shard.emb)))
                placed.append(sel)
            txt = pieces[0] if len(pieces) == 1 else concat(pieces)
            s = model.score(select(img_emb, slice(i, i + 1)), txt)[0]
            out[a + np.concatenate(placed)] = s.detach().float().cpu().numpy()
            bar.update(1)
    return out


def _on_device_index(rows: torch.Tensor, emb: Embeddings) -> torch.Tensor:
    for v in emb.values():
        if isinstance(v, dict):
            return _on_device_index(rows, v)
        if isinstance(v, torch.Tensor):
            return rows.to(v.device)
    return rows


def _rerank_ranks(shortlist: np.ndarray, scores: np.ndarray, is_gt: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Rank of the best ground truth per query after re-ranking its shortlist.

    ``shortlist``/``scores``/``is_gt``: ``(Q, k)`` candidate ids, re-ranking scores, ground-truth
    flags. A query without a ground truth in its shortlist keeps ``fallback`` (its first-stage rank).
    """
    # Sort each row by descending score, ties by ascending candidate id (the library's tie rule).
    order = np.lexsort((shortlist, -scores.astype(np.float64)), axis=-1)
    gt_sorted = np.take_along_axis(is_gt, order, axis=1)
    has = gt_sorted.any(axis=1)
    first = gt_sorted.argmax(axis=1)
    return np.where(has, first, fallback).astype(np.int64)


def two_stage_retrieval(
    rerank_model: MatchingModel,
    dataset: Any,
    first_stage: MatchingModel | None = None,
    ks: Sequence[int] = (10, 20, 50),
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = False,
    compare_full: bool = True,
    full_sims: np.ndarray | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    captions_per_image: int = 5,
) -> TwoStageResult:
    """Shortlist with fast vectors, re-rank with ``rerank_model``; recall and cost for each ``k``.

    Args:
        rerank_model: the cross-attention model (SGR, SAF, TSHSR, SHAN, an ensemble).
        dataset: a :class:`~thsrn_lib.data.PrecompDataset` (all its images and captions are used).
        first_stage: an embedding model (HJE) whose fixed vectors shortlist, or None to use
            ``rerank_model.global_image_vectors`` / ``global_text_vectors``.
        ks: shortlist sizes (clipped per direction to the number of candidates).
        compare_full: also score the full matrix (timed) to report the recall loss;
            ``full_sims`` supplies a precomputed full matrix instead (then its time is unknown).

    Returns:
        :class:`TwoStageResult`. Pairs are counted once even if shortlisted in both directions.
    """
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ConfigError(f"ks must be positive integers, got {ks!r}")
    device = torch.device(device) if device is not None else _model_device(rerank_model)
    rerank_model.to(device)
    n_img, n_cap = int(dataset.n_images), int(dataset.n_captions)
    if n_cap != captions_per_image * n_img:
        raise ConfigError(f"two-stage retrieval needs {captions_per_image} captions per image, got {n_img} x {n_cap}")

    t0 = time.perf_counter()
    img_emb = encode_images(rerank_model, dataset, batch_size, device, progress)
    txt = encode_texts(rerank_model, dataset, batch_size, None, device, progress)
    _sync(device)
    encode_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if first_stage is None:
        s1 = first_stage_sims(rerank_model, img_emb, txt, memory_budget_mb)
        fs_name = f"global vectors of {rerank_model.name}"
    else:
        first_stage.to(device)
        f_img = encode_images(first_stage, dataset, batch_size, device, progress)
        f_txt = encode_texts(first_stage, dataset, batch_size, None, device, progress)
        s1 = first_stage_sims(first_stage, f_img, f_txt, memory_budget_mb)
        del f_img, f_txt
        fs_name = first_stage.name or type(first_stage).__name__
    k_max = int(max(ks))
    sl_i2t, sl_t2i = shortlists(s1, k_max)
    fs_ranks_i2t, fs_ranks_t2i = ranks_i2t(s1, captions_per_image), ranks_t2i(s1, captions_per_image)
    first_s = time.perf_counter() - t0
    fs_metrics = metrics_from_ranks(fs_ranks_i2t, fs_ranks_t2i)
    del s1

    full: dict[str, Any] | None = None
    if full_sims is not None:
        full = {"metrics": evaluate_sims(full_sims, captions_per_image), "pairs": n_img * n_cap, "seconds": None}
    elif compare_full:
        t0 = time.perf_counter()
        b, c = choose_shards(n_img, n_cap, estimate_pair_bytes(rerank_model, img_emb, txt), memory_budget_mb)
        sims = score_matrix(rerank_model, img_emb, txt, b, c, device, progress)
        full_s = time.perf_counter() - t0
        full = {"metrics": evaluate_sims(sims, captions_per_image), "pairs": n_img * n_cap, "seconds": full_s}
        del sims

    gt_img_of_cap = np.arange(n_cap) // captions_per_image
    per_k = []
    for k in sorted({int(k) for k in ks}):
        t0 = time.perf_counter()
        k_i, k_t = min(k, n_cap), min(k, n_img)
        i2t, t2i = sl_i2t[:, :k_i], sl_t2i[:, :k_t]
        keys = _needed_pairs(i2t, t2i, n_cap)
        scores = _score_pairs(rerank_model, img_emb, txt, keys, n_cap, progress)
        # Look the re-ranking scores up for each direction's shortlist.
        sc_i2t = scores[np.searchsorted(keys, np.arange(n_img)[:, None] * n_cap + i2t)]
        sc_t2i = scores[np.searchsorted(keys, t2i * n_cap + np.arange(n_cap)[:, None])]
        r_i2t = _rerank_ranks(i2t, sc_i2t, (i2t // captions_per_image) == np.arange(n_img)[:, None], fs_ranks_i2t)
        r_t2i = _rerank_ranks(t2i, sc_t2i, t2i == gt_img_of_cap[:, None], fs_ranks_t2i)
        rerank_s = time.perf_counter() - t0
        m = metrics_from_ranks(r_i2t, r_t2i)
        entry: dict[str, Any] = {
            "k": k,
            "k_i2t": k_i,
            "k_t2i": k_t,
            "metrics": m,
            "pairs_scored": int(keys.size),
            "pair_fraction": keys.size / (n_img * n_cap),
            "pair_reduction": (n_img * n_cap) / keys.size,
            "rerank_seconds": rerank_s,
            "seconds": first_s + rerank_s,
        }
        if full is not None:
            entry["recall_loss"] = {key: full["metrics"][key] - m[key] for key in (*RECALL_KEYS, "rsum")}
        per_k.append(entry)
    return TwoStageResult(
        first_stage=fs_name,
        n_images=n_img,
        n_captions=n_cap,
        encode_seconds=encode_s,
        first_stage_seconds=first_s,
        first_stage_metrics=fs_metrics,
        full=full,
        per_k=per_k,
    )
