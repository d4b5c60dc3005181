"""What a caption asserts, and on which scenes it is true (batched over captions x images).

A caption's *meaning* is a small logical form stored with its alignment record::

    {"mentions": [{"shape": "circle", "colour": "red", "size": None, "pattern": None, "count": None}, ...],
     "relation": None | {"type": "left_of", "subject": 0, "object": 1}}

A mention with ``count: None`` ("a red circle") needs at least one matching object; one with
``count: n`` ("two red circles") needs exactly ``n`` matching objects in the scene. Different
mentions must be satisfied by *different* objects (checked with Hall's condition on the
mention-to-object matching, each mention demanding ``max(count, 1)`` objects). A relation
holds if some object matching the subject mention stands in that relation to some object
matching the object mention. Attribute values ``None`` are wildcards.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from thsrn_lib.data.scenes.world import COLOURS, PATTERNS, RELATIONS, SHAPES, SIZES

__all__ = ["ATTRIBUTES", "SceneTable", "MeaningTable", "fit_matrix", "fits"]

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "pattern")
_VALUES: dict[str, dict[str, int]] = {
    "shape": {v: i for i, v in enumerate(SHAPES)},
    "colour": {v: i for i, v in enumerate(COLOURS)},
    "size": {v: i for i, v in enumerate(SIZES)},
    "pattern": {v: i for i, v in enumerate(PATTERNS)},
}
_REL_INDEX = {r: i for i, r in enumerate(RELATIONS)}


@dataclass
class SceneTable:
    """Scenes as arrays: ``attrs`` int ``(I, O, 4)`` (-1 padding), ``valid`` bool ``(I, O)``,
    ``rel`` bool ``(n_relations, I, O, O)`` with ``rel[r, i, a, b]``: "a r b" in scene i."""

    attrs: np.ndarray
    valid: np.ndarray
    rel: np.ndarray

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> SceneTable:
        """From ``{split}_scenes.jsonl`` records (or :meth:`Scene.to_record` dicts)."""
        n_img = len(records)
        n_obj = max((len(r["objects"]) for r in records), default=1)
        attrs = np.full((n_img, n_obj, len(ATTRIBUTES)), -1, dtype=np.int16)
        valid = np.zeros((n_img, n_obj), dtype=bool)
        rel = np.zeros((len(RELATIONS), n_img, n_obj, n_obj), dtype=bool)
        for i, rec in enumerate(records):
            for k, obj in enumerate(rec["objects"]):
                if obj["id"] != k:
                    raise ValueError(f"scene {i}: object ids must be 0..n-1 in order, got id {obj['id']} at {k}")
                attrs[i, k] = [_VALUES[a][obj[a]] for a in ATTRIBUTES]
                valid[i, k] = True
            for name, pairs in rec.get("relations", {}).items():
                for a, b in pairs:
                    rel[_REL_INDEX[name], i, a, b] = True
        return cls(attrs, valid, rel)


@dataclass
class MeaningTable:
    """Meanings as arrays: ``cons`` int ``(C, M, 4)`` (-1 = any), ``mvalid`` bool ``(C, M)``,
    ``count`` int ``(C, M)`` (0 = at least one), ``rel_type``/``rel_subj``/``rel_obj`` int ``(C,)``
    (``rel_type`` -1 = no relation)."""

    cons: np.ndarray
    mvalid: np.ndarray
    count: np.ndarray
    rel_type: np.ndarray
    rel_subj: np.ndarray
    rel_obj: np.ndarray

    @classmethod
    def from_meanings(cls, meanings: list[dict[str, Any]]) -> MeaningTable:
        n = len(meanings)
        m = max((len(x["mentions"]) for x in meanings), default=1)
        cons = np.full((n, m, len(ATTRIBUTES)), -1, dtype=np.int16)
        mvalid = np.zeros((n, m), dtype=bool)
        count = np.zeros((n, m), dtype=np.int16)
        rel_type = np.full(n, -1, dtype=np.int64)
        rel_subj = np.zeros(n, dtype=np.int64)
        rel_obj = np.zeros(n, dtype=np.int64)
        for c, meaning in enumerate(meanings):
            for k, mention in enumerate(meaning["mentions"]):
                for a, attr in enumerate(ATTRIBUTES):
                    if mention.get(attr) is not None:
                        cons[c, k, a] = _VALUES[attr][mention[attr]]
                mvalid[c, k] = True
                count[c, k] = mention.get("count") or 0
            if meaning.get("relation"):
                r = meaning["relation"]
                rel_type[c], rel_subj[c], rel_obj[c] = _REL_INDEX[r["type"]], r["subject"], r["object"]
        return cls(cons, mvalid, count, rel_type, rel_subj, rel_obj)

    def __len__(self) -> int:
        return self.cons.shape[0]

    def slice(self, start: int, stop: int) -> MeaningTable:
        return MeaningTable(*(getattr(self, f)[start:stop] for f in
                              ("cons", "mvalid", "count", "rel_type", "rel_subj", "rel_obj")))


def fit_matrix(meanings: MeaningTable, scenes: SceneTable, chunk: int = 64) -> np.ndarray:
    """bool ``(C, I)``: is caption meaning c true of scene i?"""
    out = np.empty((len(meanings), scenes.attrs.shape[0]), dtype=bool)
    for start in range(0, len(meanings), chunk):
        out[start:start + chunk] = _fit_chunk(meanings.slice(start, start + chunk), scenes)
    return out


def _fit_chunk(mt: MeaningTable, st: SceneTable) -> np.ndarray:
    cons = mt.cons[:, :, None, None, :]  # (C, M, 1, 1, 4)
    match = np.all((cons < 0) | (st.attrs[None, None] == cons), axis=-1)  # (C, M, I, O)
    match &= st.valid[None, None] & mt.mvalid[:, :, None, None]
    n_match = match.sum(axis=-1)  # (C, M, I)
    exact = mt.count[:, :, None]
    ok_count = np.where(exact > 0, n_match == exact, True).all(axis=1)  # (C, I)

    # Distinct objects for distinct mentions: Hall's condition with demands max(count, 1).
    demand = np.where(mt.mvalid, np.maximum(mt.count, 1), 0)  # (C, M)
    ok = ok_count
    n_m = mt.cons.shape[1]
    for size in range(1, n_m + 1):
        for subset in combinations(range(n_m), size):
            idx = list(subset)
            union = match[:, idx].any(axis=1).sum(axis=-1)  # (C, I)
            ok &= union >= demand[:, idx].sum(axis=1)[:, None]

    has_rel = mt.rel_type >= 0
    if has_rel.any():
        rows = np.arange(len(mt))
        subj = match[rows, mt.rel_subj]  # (C, I, O)
        obj = match[rows, mt.rel_obj]
        rel = st.rel[np.maximum(mt.rel_type, 0)]  # (C, I, O, O)
        rel_ok = (subj[..., :, None] & obj[..., None, :] & rel).any(axis=(-1, -2))
        ok &= np.where(has_rel[:, None], rel_ok, True)
    return ok


def fits(meaning: dict[str, Any], scene_record: dict[str, Any]) -> bool:
    """Is one caption meaning true of one scene record?"""
    return bool(fit_matrix(MeaningTable.from_meanings([meaning]), SceneTable.from_records([scene_record]))[0, 0])
