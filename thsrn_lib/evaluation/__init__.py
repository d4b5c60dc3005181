"""Evaluation: retrieval metrics, protocols (F30K 1K, COCO 1K/5K), sharded scoring, two-stage retrieval.

>>> from thsrn_lib.evaluation import evaluate_sims
>>> import numpy as np
>>> evaluate_sims(np.eye(2).repeat(5, axis=1))["rsum"]
600.0

The metric and protocol helpers need only NumPy; the torch-based engine (:func:`evaluate`,
:func:`score_matrix`, :func:`two_stage_retrieval`, ...) is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .metrics import (
    METRIC_KEYS,
    RECALL_KEYS,
    average_metrics,
    evaluate_protocol,
    evaluate_sims,
    fold_metrics,
    format_metrics_table,
    metrics_from_ranks,
    ranks_i2t,
    ranks_t2i,
    recall_at_k_curve,
)
from .protocols import PROTOCOLS, Protocol, fold_slices, get_protocol

# name -> submodule, for the torch-based parts (loaded lazily so that metrics stay light).
_LAZY = {
    "EvalResult": "engine",
    "TextShard": "engine",
    "evaluate": "engine",
    "encode_images": "engine",
    "encode_texts": "engine",
    "score_matrix": "engine",
    "choose_shards": "engine",
    "estimate_pair_bytes": "engine",
    "TwoStageResult": "two_stage",
    "two_stage_retrieval": "two_stage",
}

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
    "Protocol",
    "PROTOCOLS",
    "get_protocol",
    "fold_slices",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
