"""Views of what a matching model does: alignments, reasoning graphs, streams, retrieval galleries.

>>> from thsrn_lib import viz                                   # doctest: +SKIP
>>> pair = viz.pair_maps(model, dataset, image_index=3, caption_index=15)   # doctest: +SKIP
>>> fig = viz.pair_attention(pair, "t2i", viz.VisualContext.from_dataset(dataset), save_to="t2i.png")  # doctest: +SKIP

Every view returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (nothing is
shown or kept globally) and writes an atomic PNG when given ``save_to``. Colours follow one
convention (:mod:`thsrn_lib.viz.style`). Real SCAN features usually come without boxes or
images: alignment views then fall back to word x region heat maps and say so in the title;
pass ``VisualContext.from_dataset(ds, boxes=..., image_dir=...)`` to draw over images.

Names are imported on first use, so ``import thsrn_lib.viz`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    # maps (arrays, no plotting)
    "PairMaps": "maps",
    "BlockMaps": "maps",
    "VisualContext": "maps",
    "explain_block": "maps",
    "pair_maps": "maps",
    "pairs_for_images": "maps",
    "pair_from_block": "maps",
    "word_region_maps": "maps",
    "hje_affinity": "maps",
    "caption_targets": "maps",
    "encode_query": "maps",
    # alignment views
    "word_to_region": "alignment",
    "region_to_word": "alignment",
    "word_region_heatmap": "alignment",
    "pair_attention": "alignment",
    "attention_vs_attribution": "alignment",
    "FALLBACK_NOTE": "alignment",
    # reasoning graph
    "reasoning_graph": "graph",
    "gate_weights": "graph",
    "pair_reasoning": "graph",
    "pair_gates": "graph",
    # streams
    "part_score_matrices": "streams",
    "stream_scores": "streams",
    "stream_disagreement": "streams",
    "disagreements": "streams",
    "gt_image_ranks": "streams",
    # galleries
    "image_gallery": "gallery",
    "caption_gallery": "gallery",
    "top_k": "gallery",
    # raster panels
    "render_regions": "render",
    "tile_figure": "render",
    # style
    "save_figure": "style",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
