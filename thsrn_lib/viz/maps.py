"""What the views draw: word-region maps and reasoning maps of (image, caption) pairs, as arrays.

This module has no plotting code (torch and numpy only); the views, the explorer, the
attribution figures and :mod:`thsrn_lib.pointing` all read pairs through it, so that "which
region does word w point at" means the same everywhere.

Word-to-region maps (``(B, N, L, R)``: for every word position, a non-negative weight per
region, used to rank regions), named by *stream*:

* ``"t2i"``: the text-to-image attention ``attention["t2i"]`` (each word's softmax over regions).
* ``"i2t"``: the image-to-text attention read per word: ``attention["i2t"]`` is each region's
  softmax over words ``(B, N, R, L)``; a word ranks the regions by the weight they put on it,
  i.e. the transposed map. Its rows do not sum to 1 (views show them as they are).
* Ensembles (keys ``"member:t2i"``): every member's map under its own name, plus the
  member-weighted average under the plain stream name, so an ensemble is scored like one model.
* ``"affinity"`` (HJE, which has no cross-attention): the cosine between a word's and a
  region's projections in HJE's *local* space (the global space when the model has no local
  branch), before pooling. HJE pools words and regions separately, so this is the alignment its
  local space implies, not an attention the model computed; it is displayed as
  ``softmax_r(cos / 0.1)`` and ranked by the cosine itself (the same order).

Positions are the model's own (``<start>`` = 0), so a Scenes alignment token ``p`` is position
``p + 1``.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..models.base import Explanation, MatchingModel

__all__ = [
    "AFFINITY_TEMPERATURE",
    "eval_mode",
    "word_region_maps",
    "hje_affinity",
    "BlockMaps",
    "explain_block",
    "PairMaps",
    "VisualContext",
    "caption_targets",
    "encode_query",
    "pair_maps",
]

AFFINITY_TEMPERATURE = 0.1
_BASE_STREAMS = ("t2i", "i2t")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode, restoring its previous mode afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------ maps
def _as_word_region(key: str, att: Tensor) -> Tensor:
    """``(B, N, L, R)`` view of an attention map named ``...t2i`` or ``...i2t``."""
    return att if key.endswith("t2i") else att.transpose(-1, -2)


def word_region_maps(expl: Explanation, model: MatchingModel | None = None) -> dict[str, Tensor]:
    """Every word-to-region map of an explanation, ``stream -> (B, N, L, R)`` (see module doc).

    Padded word rows are zeroed. Ensembles (``expl.extras["members"]``) also get the
    member-weighted average per base stream when ``model`` (the :class:`Ensemble`) is given,
    else the plain average.
    """
    mask = expl.mask  # (N, L)
    out: dict[str, Tensor] = {}
    for key, att in expl.attention.items():
        base = key.split(":")[-1]
        if base not in _BASE_STREAMS or att.dim() != 4:
            continue  # e.g. SHAN's g2l maps: not word-region maps
        out[key] = _as_word_region(base, att).masked_fill(~mask[None, :, :, None], 0.0)
    members = [k for k in out if ":" in k]
    if members:
        names = list(getattr(model, "names", [])) if model is not None else []
        weights = list(getattr(model, "weights", [])) if model is not None else []
        w_of = dict(zip(names, weights))
        for base in _BASE_STREAMS:
            keys = [k for k in members if k.endswith(":" + base)]
            if not keys or base in out:
                continue
            w = torch.tensor([w_of.get(k.split(":")[0], 1.0) for k in keys], dtype=out[keys[0]].dtype)
            stacked = torch.stack([out[k] for k in keys])
            out[base] = (stacked * w.to(stacked.device).view(-1, 1, 1, 1, 1)).sum(0) / w.sum()
    return out


@torch.no_grad()
def hje_affinity(model: MatchingModel, feats: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
    """HJE's word-region cosine in its local space (global if it has no local branch), ``(B, N, L, R)``.

    Padded word rows are 0. See the module docstring for what this map is and is not.
    """
    from ..models.layers import l2norm, lengths_to_mask

    lin_v = getattr(model, "loc_v", None)
    lin_t = getattr(model, "loc_t", None)
    if lin_v is None or lin_t is None:
        lin_v, lin_t = getattr(model, "glo_v", None), getattr(model, "glo_t", None)
    if lin_v is None or lin_t is None or not hasattr(model, "img_enc") or not hasattr(model, "txt_enc"):
        raise ConfigError(f"{type(model).__name__} has no HJE-style projections (loc_v/loc_t or glo_v/glo_t)")
    lengths = lengths.to(device=ids.device, dtype=torch.long)
    regions = l2norm(lin_v(model.img_enc(feats)), dim=-1)  # (B, R, E)
    words = l2norm(lin_t(model.txt_enc(ids, lengths)), dim=-1)  # (N, L, E)
    cos = torch.einsum("bre,nle->bnlr", regions, words)
    mask = lengths_to_mask(lengths, ids.shape[1])
    return cos.masked_fill(~mask[None, :, :, None], 0.0)


@dataclass
class BlockMaps:
    """Maps of a block of B images x N captions (tensors on the model's device).

    Attributes:
        expl: the model's :class:`Explanation`.
        word_region: stream -> ``(B, N, L, R)`` ranking maps (see :func:`word_region_maps`).
        display: stream -> ``(B, N, L, R)`` maps as drawn (equal to ``word_region`` except HJE's
            affinity, drawn as a softmax over regions).
        sources: stream -> ``"attention"`` or ``"hje_local_affinity"``.
        ids, lengths: the captions' ids ``(N, L)`` and lengths ``(N,)``.
    """

    expl: Explanation
    word_region: dict[str, Tensor]
    display: dict[str, Tensor]
    sources: dict[str, str]
    ids: Tensor
    lengths: Tensor


def explain_block(model: MatchingModel, feats: Tensor, ids: Tensor, lengths: Tensor) -> BlockMaps:
    """``model.explain`` in eval mode plus the word-region maps of every stream the model has."""
    device = _model_device(model)
    feats, ids, lengths = feats.to(device), ids.to(device), lengths.to(device)
    with eval_mode(model), torch.no_grad():
        expl = model.explain(feats, ids, lengths)
        maps = word_region_maps(expl, model)
        sources = {k: "attention" for k in maps}
        display = dict(maps)
        if not maps and getattr(model, "name", "") == "hje":
            aff = hje_affinity(model, feats, ids, lengths)
            maps = {"affinity": aff}
            mask = expl.mask[None, :, :, None]
            display = {"affinity": torch.softmax(aff / AFFINITY_TEMPERATURE, dim=-1).masked_fill(~mask, 0.0)}
            sources = {"affinity": "hje_local_affinity"}
    return BlockMaps(expl=expl, word_region=maps, display=display, sources=sources, ids=ids, lengths=lengths)


# ------------------------------------------------------------------------------------ images
@dataclass
class VisualContext:
    """Where the pixels and boxes of a split's images come from (optional for real data).

    Attributes:
        boxes: ``(n_images, R, 4)`` pixel boxes ``x1, y1, x2, y2`` or None.
        image_dir: folder with ``{id}.png|.jpg|.jpeg`` or None.
        image_ids: one id per image (file stem) or None.
    """

    boxes: np.ndarray | None = None
    image_dir: Path | None = None
    image_ids: list[str] | None = None

    @classmethod
    def from_dataset(cls, dataset: Any, boxes: np.ndarray | str | os.PathLike | None = None,
                     image_dir: str | os.PathLike | None = None) -> VisualContext:
        """The dataset's own boxes / images, overridden by user-supplied ``boxes`` (array or ``.npy``) and ``image_dir``."""
        n, r = int(dataset.n_images), int(dataset.num_regions)
        if boxes is not None and not isinstance(boxes, np.ndarray):
            path = Path(boxes)
            if not path.is_file():
                raise DataError(f"box file {path} not found; pass an (n_images, R, 4) .npy of pixel x1, y1, x2, y2")
            boxes = np.load(path, allow_pickle=False)
        if boxes is None:
            boxes = getattr(dataset, "boxes", None)
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float32)
            if boxes.shape != (n, r, 4):
                raise DataError(
                    f"boxes have shape {boxes.shape}; expected ({n}, {r}, 4) (one x1, y1, x2, y2 box per region "
                    f"of each of the {n} images of the split)"
                )
        folder = Path(image_dir) if image_dir is not None else getattr(dataset, "image_dir", None)
        return cls(boxes=boxes, image_dir=Path(folder) if folder is not None else None,
                   image_ids=getattr(dataset, "image_ids", None))

    def image_path(self, i: int) -> Path | None:
        if self.image_dir is None or self.image_ids is None or not self.image_dir.is_dir():
            return None
        name = self.image_ids[i]
        for cand in (self.image_dir / name, *(self.image_dir / f"{name}{s}" for s in (".png", ".jpg", ".jpeg"))):
            if cand.suffix.lower() in (".png", ".jpg", ".jpeg") and cand.is_file():
                return cand
        return None

    def image(self, i: int) -> np.ndarray | None:
        """``(H, W, 3)`` uint8 pixels of image ``i`` or None."""
        path = self.image_path(i)
        if path is None:
            return None
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    def boxes_of(self, i: int) -> np.ndarray | None:
        return None if self.boxes is None else self.boxes[i]

    def missing(self, i: int) -> str | None:
        """None when image ``i`` can be drawn with its boxes, else the reason (for the figure's note)."""
        if self.boxes is None and self.image_path(i) is None:
            return "no region boxes and no image file"
        if self.boxes is None:
            return "no region boxes (pass boxes=... as an (n_images, R, 4) array or .npy)"
        if self.image_path(i) is None:
            return "no image file (pass image_dir=... with {id}.png/.jpg files)"
        return None


# ------------------------------------------------------------------------------------ pairs
def caption_targets(record: dict[str, Any] | None) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Ground truth of one Scenes alignment record: model position -> GT regions, and -> word type.

    Alignment token ``p`` is model position ``p + 1`` (``<start>`` comes first). Tokens naming
    several objects get the union of their regions; tokens inside a relation phrase keep their
    own type (``in_relation`` is available from :func:`thsrn_lib.data.scenes.pointing_targets`).
    """
    if not record:
        return {}, {}
    from ..data.scenes import pointing_targets

    regions, types = {}, {}
    for t in pointing_targets(record):
        regions[int(t["token"]) + 1] = [int(r) for r in t["regions"]]
        types[int(t["token"]) + 1] = str(t["type"])
    return regions, types


def encode_query(vocab: Any, text: str) -> list[int]:
    """Ids of a free-text caption with the dataset's vocab (``<start>``/``<end>`` added)."""
    if vocab is None:
        raise DataError("a free-text caption needs the vocab the model was trained with (dataset.vocab is None)")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("the caption is empty; type a few words")
    return list(vocab.encode(text))


@dataclass
class PairMaps:
    """Everything the views need about one (image, caption) pair, as numpy arrays.

    Word axes cover the caption's ``n`` valid positions only (``<start>`` ... ``<end>``).

    Attributes:
        tokens: the words at model positions ``0 .. n-1``.
        score: the pair's final score; ``stream_scores``: partial scores by name.
        word_region: stream -> ``(n, R)`` ranking map; ``display``: the same as drawn.
        sources: stream -> ``"attention"`` / ``"hje_local_affinity"``.
        region_word: stream -> ``(R, n)`` the image-to-text attention as computed (rows sum to 1).
        edges: stream -> list of ``(P, P)`` edge matrices over the pair's valid nodes.
        node_groups: stream -> list of ``(name, size)`` for those valid nodes.
        gates: stream -> list of ``(n or R,)`` gate weights per level.
        gt_regions / gt_types: model position -> ground-truth regions / word type (Scenes only).
    """

    image_index: int | None
    caption_index: int | None
    caption: str
    tokens: list[str]
    ids: np.ndarray
    score: float
    num_regions: int
    stream_scores: dict[str, float] = field(default_factory=dict)
    word_region: dict[str, np.ndarray] = field(default_factory=dict)
    display: dict[str, np.ndarray] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    region_word: dict[str, np.ndarray] = field(default_factory=dict)
    edges: dict[str, list[np.ndarray]] = field(default_factory=dict)
    node_groups: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    gates: dict[str, list[np.ndarray]] = field(default_factory=dict)
    gt_regions: dict[int, list[int]] = field(default_factory=dict)
    gt_types: dict[int, str] = field(default_factory=dict)

    @property
    def streams(self) -> list[str]:
        return list(self.word_region)

    def content_positions(self) -> list[int]:
        """Positions without ``<start>``/``<end>``/``<pad>`` (the words a reader cares about)."""
        return [i for i, t in enumerate(self.tokens) if t not in ("<start>", "<end>", "<pad>")]


def _group_sizes(expl: Explanation, stream: str, p: int, length: int) -> list[tuple[str, int]]:
    names = expl.node_layout.get(stream, ["global", "local"])
    sizes = expl.extras.get("node_group_sizes", {}).get(stream) if isinstance(expl.extras.get("node_group_sizes"), dict) else None
    if sizes is None or len(sizes) != len(names):
        # Every group but the last (local) is one node unless the model says otherwise.
        sizes = [1] * (len(names) - 1)
        sizes.append(p - sum(sizes))
    return list(zip(names, [int(s) for s in sizes]))


def _words_are_local(stream: str) -> bool:
    return stream.split(":")[-1] == "t2i"


def pair_from_block(block: BlockMaps, b: int, n: int, vocab: Any = None, image_index: int | None = None,
                    caption_index: int | None = None, caption: str = "",
                    record: dict[str, Any] | None = None) -> PairMaps:
    """Extract pair ``(b, n)`` of a block as a :class:`PairMaps`."""
    expl = block.expl
    length = int(block.lengths[n])
    ids = block.ids[n, :length].detach().cpu().numpy()
    tokens = vocab.tokens(ids) if vocab is not None else [str(int(i)) for i in ids]
    r = next(iter(block.word_region.values())).shape[-1] if block.word_region else 0
    pm = PairMaps(image_index=image_index, caption_index=caption_index, caption=caption, tokens=tokens, ids=ids,
                  score=float(expl.sims[b, n]), num_regions=int(r),
                  stream_scores={k: float(v[b, n]) for k, v in expl.stream_scores.items()})
    for key, m in block.word_region.items():
        pm.word_region[key] = m[b, n, :length].detach().float().cpu().numpy()
        pm.display[key] = block.display[key][b, n, :length].detach().float().cpu().numpy()
        pm.sources[key] = block.sources[key]
    for key, att in expl.attention.items():
        if key.split(":")[-1] == "i2t" and att.dim() == 4:
            pm.region_word[key] = att[b, n, :, :length].detach().float().cpu().numpy()
    for stream, steps in expl.edges.items():
        if not steps:
            continue
        p = steps[0].shape[-1]
        groups = _group_sizes(expl, stream, p, length)
        keep = np.ones(p, dtype=bool)
        if _words_are_local(stream):  # drop padded word nodes (the local group is last)
            local = groups[-1][1]
            keep[p - local + length:] = False
            groups = groups[:-1] + [(groups[-1][0], min(local, length))]
        idx = torch.from_numpy(np.flatnonzero(keep)).to(steps[0].device)
        pm.edges[stream] = [e[b, n][idx][:, idx].detach().float().cpu().numpy() for e in steps]
        pm.node_groups[stream] = groups
    for stream, levels in expl.gates.items():
        words = _words_are_local(stream)
        pm.gates[stream] = [g[b, n, :length].detach().float().cpu().numpy() if words else g[b, n].detach().float().cpu().numpy()
                            for g in levels]
    pm.gt_regions, pm.gt_types = caption_targets(record)
    return pm


def pair_maps(model: MatchingModel, dataset: Any, image_index: int, caption_index: int | None = None,
              text: str | None = None) -> PairMaps:
    """Maps of image ``image_index`` with caption ``caption_index`` of the dataset or a free ``text``.

    Ground truth is attached when the caption comes from a Scenes split with alignments.
    """
    if (caption_index is None) == (text is None):
        raise ConfigError("pass exactly one of caption_index (a caption of the split) or text (a free caption)")
    if caption_index is not None:
        ids = dataset.caption_ids(caption_index)
        caption = dataset.captions[caption_index]
        aligns = dataset.alignments() if hasattr(dataset, "alignments") else None
        record = aligns[caption_index] if aligns else None
    else:
        ids, caption, record = encode_query(dataset.vocab, text), text, None
    feats = dataset.image_batch([image_index])
    ids_t = torch.tensor([ids], dtype=torch.long)
    block = explain_block(model, feats, ids_t, torch.tensor([len(ids)]))
    return pair_from_block(block, 0, 0, dataset.vocab, image_index, caption_index, caption or "", record)


def pairs_for_images(model: MatchingModel, dataset: Any, image_indices: Sequence[int], ids: Sequence[int],
                     caption: str = "", caption_index: int | None = None) -> list[PairMaps]:
    """Maps of one caption (``ids``) against several images, from one explain call."""
    feats = dataset.image_batch(list(image_indices))
    ids_t = torch.tensor([list(ids)], dtype=torch.long)
    block = explain_block(model, feats, ids_t, torch.tensor([len(ids)]))
    aligns = dataset.alignments() if caption_index is not None and hasattr(dataset, "alignments") else None
    out = []
    for b, i in enumerate(image_indices):
        # GT regions belong to the caption's own image only.
        record = aligns[caption_index] if aligns and caption_index // 5 == i else None
        out.append(pair_from_block(block, b, 0, dataset.vocab, int(i), caption_index, caption, record))
    return out
