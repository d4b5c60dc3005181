"""Reading a Scenes data set for evaluation: alignments, binding accuracy, the t2i ceiling.

- :func:`caption_ambiguity_ceiling`: captions are often true of several images ("a red
  circle"), so text-to-image recall cannot reach 100 even for a perfect model. For each
  caption c we count ``n_c``, the images of the split whose scene makes c true (from the
  scene JSON and the caption's stored meaning; its own image is always one of them). A model
  that ranks exactly those ``n_c`` images first, in random order, finds the right one in
  the top K with probability ``min(1, K / n_c)``. The ceiling is the mean of that over
  captions, in percent (same units as R@K).
- :func:`binding_accuracy`: fraction of binding captions k with
  ``score(image k // 5, caption k) > score(image k // 5, swapped caption k)`` (ties fail).
- :func:`pointing_targets`: an alignment record regrouped per token (a token naming several
  objects, "two red circles", appears once per object in ``align``; here their regions are
  merged), ready for pointing accuracy.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from thsrn_lib.data.scenes.meaning import MeaningTable, SceneTable, fit_matrix
from thsrn_lib.errors import DataError

__all__ = [
    "load_scenes",
    "load_alignments",
    "load_swapped_captions",
    "binding_accuracy",
    "caption_ambiguity_ceiling",
    "pointing_targets",
]


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{what} file {path} not found; generate the data set with `thsrn scenes` "
                        "(thsrn_lib.data.scenes.generate)")
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise DataError(f"{path}: line {n} is empty; regenerate the data set (thsrn scenes --force)")
    return lines


def _read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    out = []
    for n, line in enumerate(_read_lines(path, what), 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n} is not valid JSON ({exc}); regenerate the data set") from exc
    return out


def load_scenes(root: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """Per-image scene records of ``{split}_scenes.jsonl`` (objects, boxes, relations, region kinds)."""
    return _read_jsonl(Path(root) / f"{split}_scenes.jsonl", "scenes")


def load_alignments(root: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """Per-caption alignment records of ``{split}_alignments.jsonl``."""
    return _read_jsonl(Path(root) / f"{split}_alignments.jsonl", "alignments")


def load_swapped_captions(root: str | os.PathLike) -> list[str]:
    """Lines of ``binding_swapped_caps.txt``: line k swaps one attribute of ``binding_caps.txt`` line k."""
    root = Path(root)
    swapped = _read_lines(root / "binding_swapped_caps.txt", "swapped binding captions")
    original = _read_lines(root / "binding_caps.txt", "binding captions")
    if len(swapped) != len(original):
        raise DataError(
            f"{root / 'binding_swapped_caps.txt'} has {len(swapped)} lines but {root / 'binding_caps.txt'} has "
            f"{len(original)}; they must pair line by line (regenerate with `thsrn scenes --force`)"
        )
    return swapped


def binding_accuracy(sims_true: np.ndarray, sims_swapped: np.ndarray) -> float:
    """Fraction (0..1) of captions whose true score beats the swapped caption's score.

    Args:
        sims_true: ``(n_caps,)`` score of (image k // 5, caption k).
        sims_swapped: ``(n_caps,)`` score of (image k // 5, swapped caption k).
    """
    a = np.asarray(sims_true, dtype=np.float64)
    b = np.asarray(sims_swapped, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"binding_accuracy needs two non-empty 1-D arrays of equal length, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("binding_accuracy: scores contain NaN or inf")
    return float(np.mean(a > b))


def caption_ambiguity_ceiling(root: str | os.PathLike, split: str) -> dict[str, Any]:
    """The best t2i R@1/5/10 any model can expect on ``split`` (see the module docstring).

    Returns:
        ``{"split", "n_images", "n_captions", "fits_mean", "fits_median", "fits_max",
        "unique_percent", "t2i_r1", "t2i_r5", "t2i_r10"}``; ``fits_*`` describe how many
        images each caption is true of, ``unique_percent`` the share of captions true of
        their own image only, ``t2i_r*`` the ceilings in percent.
    """
    root = Path(root)
    scenes = load_scenes(root, split)
    records = load_alignments(root, split)
    if len(records) != 5 * len(scenes):
        raise DataError(f"{root / f'{split}_alignments.jsonl'} has {len(records)} captions for {len(scenes)} images; "
                        "expected 5 per image")
    fit = fit_matrix(MeaningTable.from_meanings([r["meaning"] for r in records]), SceneTable.from_records(scenes))
    own = np.array([r["image"] for r in records])
    if not fit[np.arange(len(records)), own].all():
        bad = int(np.nonzero(~fit[np.arange(len(records)), own])[0][0])
        raise DataError(f"{root / f'{split}_alignments.jsonl'}: caption {bad} is not true of its own image; "
                        "the data set is inconsistent, regenerate it")
    n_fit = fit.sum(axis=1).astype(np.float64)
    ceil = {f"t2i_r{k}": float(100.0 * np.minimum(1.0, k / n_fit).mean()) for k in (1, 5, 10)}
    return {
        "split": split,
        "n_images": len(scenes),
        "n_captions": len(records),
        "fits_mean": float(n_fit.mean()),
        "fits_median": float(np.median(n_fit)),
        "fits_max": int(n_fit.max()),
        "unique_percent": float(100.0 * (n_fit == 1).mean()),
        **ceil,
    }


def pointing_targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Regroup one alignment record per token: ``[{"token", "word", "type", "objects", "regions",
    "in_relation"}]``, regions being the union over the objects the token names (sorted)."""
    by_token: dict[int, dict[str, Any]] = {}
    for a in record["align"]:
        t = by_token.setdefault(a["token"], {"token": a["token"], "word": a["word"], "type": a["type"],
                                             "objects": [], "regions": set(), "in_relation": a["in_relation"]})
        t["objects"].append(a["object"])
        t["regions"].update(a["regions"])
    return [{**t, "regions": sorted(t["regions"])} for _, t in sorted(by_token.items())]
