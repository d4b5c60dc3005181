"""The interface every matching model implements, and the containers it returns.

A model scores a *block* of B images against N captions in one call. Encoding and scoring are
separate so that evaluation encodes every image and every caption once and then scores shards
of the (images x captions) matrix.

Embeddings are plain ``dict[str, Tensor]`` (possibly nested, for ensembles) whose tensors all have
the item axis first. That keeps them sliceable (:func:`select`) and concatenable
(:func:`concat`) without knowing the model. Text embeddings always carry ``"mask"`` ``(N, L)`` and
``"lengths"`` ``(N,)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "ModelConfig",
    "MatchingModel",
    "Explanation",
    "Embeddings",
    "select",
    "concat",
    "embeddings_to",
]

Embeddings = dict[str, Any]  # values: Tensor (item axis first) or nested Embeddings
# The padded-length axis (dim 1) of these keys may differ between caption blocks; concat pads it.
_PADDED_AXIS_KEYS = ("words", "mask", "ids")


@dataclass
class ModelConfig:
    """Fields every model shares. Subclasses add their own; defaults are the papers' settings."""

    vocab_size: int = 8481
    img_dim: int = 2048
    word_dim: int = 300
    embed_size: int = 1024
    num_regions: int = 36
    num_layers: int = 1
    bi_gru: bool = True
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    dropout: float = 0.4

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON/YAML/``torch.load(weights_only=True)`` friendly)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from plain data; unknown keys are an error (see :func:`thsrn_lib.models.registry.build_config`)."""
        from .registry import _checked_config  # local import: registry imports this module

        return _checked_config(cls, dict(data))


@dataclass
class Explanation:
    """Intermediate maps of a block of B images x N captions, for the interpretability views.

    All tensors are detached, on the model's device. Word axes use padded length L and the
    model's own token positions (``<start>`` is position 0); ``mask`` tells which are real.

    Attributes:
        sims: ``(B, N)`` final scores.
        mask: ``(N, L)`` valid-word mask of the captions.
        attention: ``"t2i"`` -> ``(B, N, L, R)``, each word's weights over regions;
            ``"i2t"`` -> ``(B, N, R, L)``, each region's weights over words. Other keys allowed
            (e.g. SHAN's ``"g2l_t2i"``), documented by the model.
        edges: stream -> list over reasoning steps of ``(B, N, P, P)`` edge matrices (rows =
            queries, softmax over keys); node order is described by ``node_layout[stream]``.
        gates: stream -> list over levels of ``(B, N, P_local)`` filtration / context-gate weights
            over the local nodes (words for t2i, regions for i2t).
        stream_scores: stream or step name -> ``(B, N)`` partial scores.
        node_layout: stream -> list of node-group names in order, e.g.
            ``["global", "context:1", "local"]``; the local group spans the rest of P.
        extras: anything model-specific, documented by the model.
    """

    sims: Tensor
    mask: Tensor
    attention: dict[str, Tensor] = field(default_factory=dict)
    edges: dict[str, list[Tensor]] = field(default_factory=dict)
    gates: dict[str, list[Tensor]] = field(default_factory=dict)
    stream_scores: dict[str, Tensor] = field(default_factory=dict)
    node_layout: dict[str, list[str]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


class MatchingModel(nn.Module):
    """Base class of every image-text matching model.

    Subclasses set ``name`` and ``config_class`` and implement :meth:`encode_images`,
    :meth:`encode_texts`, :meth:`score_parts` and :meth:`explain`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    #: True for models whose scores are a single dot product of fixed vectors (HJE): evaluation
    #: then needs no sharded cross-attention pass.
    is_embedding_model: ClassVar[bool] = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    # --- encoding -------------------------------------------------------------------------
    def encode_images(self, feats: Tensor) -> Embeddings:
        """``feats (B, R, F)`` -> image embeddings (item axis first)."""
        raise NotImplementedError

    def encode_texts(self, ids: Tensor, lengths: Tensor) -> Embeddings:
        """``ids (N, L)``, ``lengths (N,)`` (any order) -> text embeddings with ``mask``/``lengths``."""
        raise NotImplementedError

    # --- scoring --------------------------------------------------------------------------
    def score_parts(self, img_emb: Embeddings, txt_emb: Embeddings) -> tuple[Tensor, dict[str, Tensor]]:
        """Scores ``(B, N)`` and named partial scores ``(B, N)`` (streams, steps) for auxiliary losses."""
        raise NotImplementedError

    def score(self, img_emb: Embeddings, txt_emb: Embeddings) -> Tensor:
        """Similarity matrix ``(B, N)`` of every image in ``img_emb`` against every caption in ``txt_emb``."""
        return self.score_parts(img_emb, txt_emb)[0]

    def forward(self, feats: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        """``feats (B, R, F)``, ``ids (N, L)``, ``lengths (N,)`` -> sims ``(B, N)``."""
        return self.score(self.encode_images(feats), self.encode_texts(ids, lengths))

    # --- interpretability -----------------------------------------------------------------
    def explain(self, feats: Tensor, ids: Tensor, lengths: Tensor) -> Explanation:
        """Intermediate maps for every (image, caption) pair of the block (see :class:`Explanation`)."""
        raise NotImplementedError

    # --- fast first stage (two-stage retrieval) ---------------------------------------------
    def global_image_vectors(self, img_emb: Embeddings) -> Tensor | None:
        """``(B, E)`` fixed vectors whose dot products rank candidates, or None if the model has none."""
        return None

    def global_text_vectors(self, txt_emb: Embeddings) -> Tensor | None:
        """``(N, E)`` counterpart of :meth:`global_image_vectors`."""
        return None

    # --- training -------------------------------------------------------------------------
    def prepare(self, train_dataset: Any) -> None:
        """Hook called once before training with the training data set (e.g. HJE's concept vocabulary)."""

    def aux_loss_weight(self) -> float:
        """Weight of the ranking loss applied to each partial score of :meth:`score_parts` (0 = off)."""
        return 0.0

    def training_loss(self, batch: Any, criterion: Callable[..., Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one training batch (images ``(b, R, F)`` paired with captions on the diagonal).

        Returns the scalar loss and detached tensors to log (no host sync here; the trainer
        converts them when it logs).
        """
        img = self.encode_images(batch.images)
        txt = self.encode_texts(batch.ids, batch.lengths)
        sims, parts = self.score_parts(img, txt)
        loss = criterion(sims, batch.image_index)
        logs: dict[str, Tensor] = {"loss_rank": loss.detach()}
        weight = self.aux_loss_weight()
        if weight > 0:
            for key, part in parts.items():
                aux = criterion(part, batch.image_index)
                logs[f"loss_{key}"] = aux.detach()
                loss = loss + weight * aux
        return loss, logs

    # --- conveniences ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def select(emb: Embeddings, index: Tensor | slice) -> Embeddings:
    """Items ``index`` of every tensor in ``emb`` (recursing into nested dicts)."""
    return {k: select(v, index) if isinstance(v, dict) else v[index] for k, v in emb.items()}


def embeddings_to(emb: Embeddings, device: torch.device | str) -> Embeddings:
    """Move every tensor of ``emb`` to ``device``."""
    return {k: embeddings_to(v, device) if isinstance(v, dict) else v.to(device) for k, v in emb.items()}


def concat(parts: list[Embeddings]) -> Embeddings:
    """Concatenate embeddings along the item axis.

    Text embeddings whose padded length differs are right-padded (zeros / False) on axis 1 for the
    keys ``words``, ``mask``, ``ids``, and any key whose tensors differ only in axis 1.
    """
    if not parts:
        raise ValueError("concat needs at least one embeddings dict")
    out: Embeddings = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        if isinstance(first, dict):
            out[key] = concat(values)
            continue
        if first.dim() >= 2 and len({v.shape[1] for v in values}) > 1:
            width = max(v.shape[1] for v in values)
            values = [_pad_axis1(v, width) for v in values]
        out[key] = torch.cat(values, dim=0)
    return out


def _pad_axis1(x: Tensor, width: int) -> Tensor:
    if x.shape[1] == width:
        return x
    pad_shape = list(x.shape)
    pad_shape[1] = width - x.shape[1]
    return torch.cat([x, x.new_zeros(pad_shape)], dim=1)
