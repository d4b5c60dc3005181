"""Pointing accuracy: does a model's top-ranked region for a word lie on the object the word names?

Scenes captions carry ground-truth alignments: for each token naming an object (its noun and
attribute words) the regions whose box has IoU >= 0.5 with that object. For every such token of
every matched (image, caption) pair, a *method* ranks the image's regions for that word:

* ``"attention"``: the model's word-to-region maps (:mod:`thsrn_lib.viz.maps`): the
  text-to-image attention at the token's position (stream ``"t2i"``), the image-to-text
  attention read per word (``"i2t"``: regions ranked by the weight they give the word), every
  ensemble member's maps and their weighted average, and for HJE (no attention) the word-region
  cosine in its local space (stream ``"affinity"``).
* ``"integrated_gradients"`` / ``"occlusion"``: word-specific region attributions of the final
  score (:func:`thsrn_lib.attribution.word_region_attributions`; stream ``"pair"``).

A token scores 1 when the top region is one of its ground-truth regions. Ties (e.g. a uniform
map) get the expected value under a random tie-break, ``|top ∩ GT| / |top|``, so a uniform map
scores exactly chance. Chance for a token is ``|GT| / R`` (a uniformly random top region); the
reported chance is its mean over the scored tokens. Tokens without any ground-truth region (no
box reached IoU 0.5) cannot be scored and are counted in ``skipped``.

Results break down per stream and per word type (``colour``, ``shape``, ``size``, ``pattern``,
``count``, ``relation`` as the alignments label them;
plus ``in_relation``: tokens inside a relation phrase, whatever their type; and ``all``).
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, DataError
from .models.base import Explanation

__all__ = [
    "METHODS",
    "PointingResult",
    "top_region_hits",
    "pointing_from_maps",
    "pointing_from_explanation",
    "pointing_accuracy",
    "format_pointing_table",
    "load_split",
]

METHODS = ("attention", "integrated_gradients", "occlusion")
_TIE_RTOL = 1e-6


def top_region_hits(scores: Any, gt: Any) -> np.ndarray:
    """``(T,)`` pointing hits of ``scores (T, R)`` against boolean ground truth ``gt (T, R)``.

    Ties for the top count as a random tie-break: ``|top ∩ GT| / |top|``.
    """
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(gt, dtype=bool)
    if s.shape != g.shape or s.ndim != 2:
        raise ConfigError(f"scores and gt must both be (T, R), got {s.shape} and {g.shape}")
    if s.shape[0] == 0:
        return np.zeros(0)
    top = s.max(axis=1, keepdims=True)
    is_top = s >= top - _TIE_RTOL * np.abs(top)
    return (is_top & g).sum(axis=1) / is_top.sum(axis=1)


@dataclass
class PointingResult:
    """Per-token pointing outcomes of one model and method.

    Attributes:
        tokens: one dict per (stream, token): ``caption``, ``image``, ``position`` (model
            position), ``word``, ``type``, ``in_relation``, ``stream``, ``hit`` (0..1), ``chance``,
            ``top`` (the top region).
        skipped: counts of tokens that could not be scored, by reason.
        sources: stream -> what ranks the regions (``"attention"``, ``"hje_local_affinity"``,
            ``"integrated_gradients"``, ``"occlusion"``).
    """

    model: str
    method: str
    num_regions: int
    tokens: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def streams(self) -> list[str]:
        return list(dict.fromkeys(t["stream"] for t in self.tokens)) or list(self.sources)

    def _select(self, stream: str | None, word_type: str) -> list[dict[str, Any]]:
        stream = stream or (self.streams[0] if self.streams else None)
        rows = [t for t in self.tokens if t["stream"] == stream]
        if word_type == "all":
            return rows
        if word_type == "in_relation":
            return [t for t in rows if t["in_relation"]]
        return [t for t in rows if t["type"] == word_type]

    def accuracy(self, stream: str | None = None, word_type: str = "all") -> float:
        """Mean hit over the selected tokens (NaN if none)."""
        rows = self._select(stream, word_type)
        return float(np.mean([t["hit"] for t in rows])) if rows else float("nan")

    def chance(self, stream: str | None = None, word_type: str = "all") -> float:
        rows = self._select(stream, word_type)
        return float(np.mean([t["chance"] for t in rows])) if rows else float("nan")

    def word_types(self) -> list[str]:
        order = ["colour", "shape", "size", "pattern", "count", "relation"]
        seen = {t["type"] for t in self.tokens}
        return [w for w in order if w in seen] + sorted(seen - set(order))

    def table(self) -> list[dict[str, Any]]:
        """One row per stream and word type (``all`` first): accuracy, chance, token count."""
        out = []
        for stream in self.streams:
            for wt in ["all", *self.word_types(), "in_relation"]:
                rows = self._select(stream, wt)
                if not rows:
                    continue
                out.append({"model": self.model, "method": self.method, "stream": stream, "type": wt,
                            "accuracy": float(np.mean([t["hit"] for t in rows])),
                            "chance": float(np.mean([t["chance"] for t in rows])), "tokens": len(rows)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "num_regions": self.num_regions,
                "sources": dict(self.sources), "skipped": dict(self.skipped), "table": self.table(),
                "info": dict(self.info)}


# ------------------------------------------------------------------------------------ scoring
def _targets(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    from .data.scenes import pointing_targets

    return pointing_targets(dict(record))


def pointing_from_maps(maps: Mapping[str, Any], pairs: Sequence[tuple[int, int]], records: Sequence[Mapping[str, Any]],
                       lengths: Any, result: PointingResult, caption_ids: Sequence[int] | None = None,
                       image_ids: Sequence[int] | None = None) -> PointingResult:
    """Add the tokens of ``pairs`` to ``result``, ranking regions by ``maps[stream][b, n, pos]``.

    Args:
        maps: stream -> ``(B, N, L, R)`` word-region scores (tensor or array).
        pairs: ``(b, n)`` block entries to score; ``records[n]`` is caption ``n``'s alignment.
        lengths: ``(N,)`` caption lengths (model positions, ``<start>``/``<end>`` included).
        caption_ids / image_ids: dataset indices of the block's captions / images (for the rows).
    """
    lengths = np.asarray(lengths.cpu() if isinstance(lengths, Tensor) else lengths).reshape(-1)
    b_idx, n_idx, pos_idx, meta, gts = [], [], [], [], []
    r = result.num_regions
    for b, n in pairs:
        rec = records[n]
        n_words = len(rec.get("tokens", [])) if "tokens" in rec else None
        if n_words is not None and n_words + 2 != int(lengths[n]):
            result.skipped["tokenization_mismatch"] = result.skipped.get("tokenization_mismatch", 0) + len(rec["align"])
            continue
        for t in _targets(rec):
            pos = int(t["token"]) + 1  # <start> is position 0
            if not t["regions"]:
                result.skipped["no_gt_region"] = result.skipped.get("no_gt_region", 0) + 1
                continue
            if pos >= int(lengths[n]) - 1:
                result.skipped["position_out_of_caption"] = result.skipped.get("position_out_of_caption", 0) + 1
                continue
            g = np.zeros(r, dtype=bool)
            g[[int(x) for x in t["regions"]]] = True
            b_idx.append(b)
            n_idx.append(n)
            pos_idx.append(pos)
            gts.append(g)
            meta.append({"caption": int(caption_ids[n]) if caption_ids is not None else int(n),
                         "image": int(image_ids[b]) if image_ids is not None else int(b), "position": pos,
                         "word": t["word"], "type": t["type"], "in_relation": bool(t.get("in_relation", False))})
    if not meta:
        return result
    gt = np.stack(gts)
    chance = gt.sum(axis=1) / r
    bi, ni, pi = (np.asarray(v) for v in (b_idx, n_idx, pos_idx))
    for stream, m in maps.items():
        arr = m.detach().float().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m, dtype=np.float64)
        if arr.shape[-1] != r:
            raise ConfigError(f"map {stream!r} has {arr.shape[-1]} regions, the result expects {r}")
        scores = arr[bi, ni, pi]  # (T, R)
        hits = top_region_hits(scores, gt)
        tops = scores.argmax(axis=1)
        result.tokens.extend({**mt, "stream": stream, "hit": float(h), "chance": float(c), "top": int(tp)}
                             for mt, h, c, tp in zip(meta, hits, chance, tops))
    return result


def pointing_from_explanation(expl: Explanation, records: Sequence[Mapping[str, Any]],
                              pairs: Sequence[tuple[int, int]] | None = None, model: Any = None,
                              model_name: str = "model") -> PointingResult:
    """Pointing accuracy of an :class:`Explanation`'s attention maps (useful to score any maps).

    ``records[n]`` is the alignment of caption ``n`` of the block; ``pairs`` the ``(b, n)``
    entries to score (default: every caption with image 0 when ``B == 1``, else the diagonal).
    """
    from .viz.maps import word_region_maps

    maps = word_region_maps(expl, model)
    if not maps:
        raise ConfigError("the explanation has no word-region attention (attention['t2i'] / ['i2t'])")
    b, n = expl.sims.shape
    if len(records) != n:
        raise ConfigError(f"need one alignment record per caption of the block ({n}), got {len(records)}")
    if pairs is None:
        if b == 1:
            pairs = [(0, k) for k in range(n)]
        elif b == n:
            pairs = [(k, k) for k in range(n)]
        else:
            raise ConfigError(f"a block of {b} images x {n} captions is ambiguous: pass pairs=[(b, n), ...]")
    r = next(iter(maps.values())).shape[-1]
    res = PointingResult(model=model_name, method="attention", num_regions=int(r), sources={k: "attention" for k in maps})
    return pointing_from_maps(maps, pairs, records, expl.mask.sum(dim=1), res)


# ------------------------------------------------------------------------------------ driver
def load_split(scenes_split: Any, vocab: Any = None) -> Any:
    """A :class:`~thsrn_lib.data.PrecompDataset` from a dataset, ``(root, split)`` or ``"root:split"``."""
    from .data import PrecompDataset, find_vocab

    if hasattr(scenes_split, "alignments") and hasattr(scenes_split, "image_batch"):
        return scenes_split
    if isinstance(scenes_split, str) and ":" in scenes_split and not os.path.exists(scenes_split):
        scenes_split = tuple(scenes_split.rsplit(":", 1))
    if not (isinstance(scenes_split, (tuple, list)) and len(scenes_split) == 2):
        raise ConfigError(f"scenes_split must be a PrecompDataset, (root, split) or 'root:split', got {scenes_split!r}")
    root, split = scenes_split
    return PrecompDataset(root, split, vocab=vocab if vocab is not None else find_vocab(root))


def _model_name(model: Any) -> str:
    names = getattr(model, "names", None)
    if names:
        return "+".join(names)
    return getattr(model, "name", "") or type(model).__name__


def pointing_accuracy(model: Any, scenes_split: Any, method: str = "attention", max_captions: int | None = None,
                      captions: Sequence[int] | None = None, images_per_block: int = 4, n_steps: int = 16,
                      baseline: str | Tensor | None = None, model_name: str | None = None,
                      progress: bool = False) -> PointingResult:
    """Pointing accuracy of ``model`` on a Scenes split (see the module docstring).

    Args:
        scenes_split: a Scenes :class:`~thsrn_lib.data.PrecompDataset` with alignments (its vocab
            must be the model's), ``(root, split)`` or ``"root:split"``.
        method: ``"attention"``, ``"integrated_gradients"`` or ``"occlusion"``.
        max_captions / captions: score the first ``max_captions`` captions, or these indices
            (default all). Gradient methods cost ~``n_steps`` forward/backward passes per word.
        images_per_block: images explained together for ``"attention"`` (their captions form
            one block; larger blocks amortise overhead but score B x N pairs for N needed).
        n_steps, baseline: integration steps and region baseline for the attribution methods
            (default baseline: :func:`thsrn_lib.attribution.default_baseline` of the method).
    """
    from tqdm.auto import tqdm

    from .attribution import default_baseline, word_region_attributions
    from .viz.maps import explain_block

    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    ds = load_split(scenes_split)
    records = ds.alignments()
    if records is None:
        raise DataError(
            f"{ds.root} ({ds.split}) has no {ds.split}_alignments.jsonl: pointing accuracy needs the ground-truth "
            "word-region alignments that only Scenes data sets carry (generate one with `thsrn scenes`)"
        )
    if ds.vocab is None:
        raise DataError(f"dataset {ds.root} ({ds.split}) has no vocab; load it with the model's vocab")
    if captions is None:
        captions = range(ds.n_captions if max_captions is None else min(int(max_captions), ds.n_captions))
    captions = [int(k) for k in captions]
    by_image: dict[int, list[int]] = defaultdict(list)
    for k in captions:
        by_image[k // 5].append(k)
    images = sorted(by_image)
    result = PointingResult(model=model_name or _model_name(model), method=method, num_regions=ds.num_regions,
                            info={"data": str(ds.root), "split": ds.split, "captions": len(captions)})
    if method != "attention":
        baseline = default_baseline(method) if baseline is None else baseline
        result.info.update({"n_steps": n_steps if method == "integrated_gradients" else None,
                            "baseline": baseline if isinstance(baseline, str) else "tensor"})
    deltas: list[float] = []
    bar = tqdm(total=len(captions), desc=f"pointing ({method})", disable=not progress, leave=False)
    step = max(1, int(images_per_block)) if method == "attention" else 1
    for g0 in range(0, len(images), step):
        group = images[g0 : g0 + step]
        caps = [k for i in group for k in by_image[i]]
        ids = [ds.caption_ids(k) for k in caps]
        if method == "attention":
            lengths = torch.tensor([len(x) for x in ids])
            ids_t = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
            for j, x in enumerate(ids):
                ids_t[j, : len(x)] = torch.tensor(x)
            block = explain_block(model, ds.image_batch(group), ids_t, lengths)
            result.sources.update(block.sources)
            pos_of = {i: b for b, i in enumerate(group)}
            pairs = [(pos_of[k // 5], n) for n, k in enumerate(caps)]
            pointing_from_maps(block.word_region, pairs, [records[k] for k in caps], lengths, result,
                               caption_ids=caps, image_ids=group)
        else:
            feats = ds.image_batch(group)[0]
            for k, x in zip(caps, ids):
                rec = records[k]
                if len(rec.get("tokens", [])) + 2 != len(x):
                    result.skipped["tokenization_mismatch"] = result.skipped.get("tokenization_mismatch", 0) + len(rec["align"])
                    continue
                positions = sorted({int(t["token"]) + 1 for t in _targets(rec) if t["regions"]})
                if not positions:
                    pointing_from_maps({}, [(0, 0)], [rec], [len(x)], result)  # counts the skipped tokens
                    continue
                wr = word_region_attributions(model, feats, x, positions, method=method, n_steps=n_steps,
                                              baseline=baseline)
                if wr.delta is not None:
                    deltas.extend(np.abs(wr.delta).tolist())
                full = np.full((1, 1, len(x), ds.num_regions), -np.inf)
                full[0, 0, positions] = wr.attributions
                pointing_from_maps({"pair": full}, [(0, 0)], [rec], [len(x)], result, caption_ids=[k], image_ids=group)
            result.sources["pair"] = method
        bar.update(len(caps))
    bar.close()
    if deltas:
        result.info["abs_delta_mean"] = float(np.mean(deltas))
        result.info["abs_delta_max"] = float(np.max(deltas))
    return result


def format_pointing_table(results: Sequence[PointingResult], percent: bool = True) -> str:
    """A Markdown table: one row per model, method and stream; columns per word type and chance."""
    types: list[str] = []
    for r in results:
        types += [t for t in r.word_types() if t not in types]
    cols = ["all", *types, "in_relation"]
    scale = 100.0 if percent else 1.0
    head = ["model", "method", "stream", *cols, "chance", "tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(cols) + 2)) + "|"]
    for r in results:
        for stream in r.streams:
            vals = []
            for c in cols:
                a = r.accuracy(stream, c)
                vals.append("—" if np.isnan(a) else f"{scale * a:.1f}")
            src = r.sources.get(stream, "")
            label = f"{stream} (HJE local affinity)" if src == "hje_local_affinity" else stream
            lines.append("| " + " | ".join([r.model, r.method, label, *vals, f"{scale * r.chance(stream):.1f}",
                                            str(len(r._select(stream, "all")))]) + " |")
    return "\n".join(lines)
