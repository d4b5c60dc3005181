"""Score-level ensembles: the average of several models' similarity matrices (e.g. SGRAF = SGR + SAF).

Members are trained separately; the ensemble only combines their scores, block by block, so it
plugs into the same sharded evaluation as a single model.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import Embeddings, Explanation, MatchingModel
from .registry import create, register_builder

__all__ = ["Ensemble", "sgraf"]


class Ensemble(MatchingModel):
    """Weighted average of member similarity matrices ``sum_k w_k S_k / sum_k w_k``.

    Embeddings are nested per member (``{"m0": ..., "m1": ...}``); the text embeddings also carry
    the caption ``mask``/``lengths`` at the top level as every text embedding must.
    """

    name = "ensemble"

    def __init__(
        self,
        members: Sequence[MatchingModel],
        names: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        if len(members) < 2:
            raise ConfigError(f"an ensemble needs at least 2 models, got {len(members)}")
        super().__init__(config=None)  # type: ignore[arg-type]
        self.members = nn.ModuleList(members)
        self.names = list(names) if names is not None else [m.name or f"model{i}" for i, m in enumerate(members)]
        if len(self.names) != len(members):
            raise ConfigError(f"got {len(self.names)} names for {len(members)} ensemble members")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(
                f"ensemble member names must be unique (their scores are reported by name), got {self.names}; "
                "pass names=[...], e.g. ['sgr_seed0', 'sgr_seed1']"
            )
        w = [1.0] * len(members) if weights is None else [float(x) for x in weights]
        if len(w) != len(members) or any(x < 0 for x in w) or sum(w) <= 0:
            raise ConfigError(f"ensemble weights must be {len(members)} non-negative numbers with a positive sum, got {w}")
        self.weights = [x / sum(w) for x in w]

    def _keys(self) -> list[str]:
        return [f"m{i}" for i in range(len(self.members))]

    def encode_images(self, feats: Tensor) -> Embeddings:
        return {k: m.encode_images(feats) for k, m in zip(self._keys(), self.members)}

    def encode_texts(self, ids: Tensor, lengths: Tensor) -> Embeddings:
        out: Embeddings = {k: m.encode_texts(ids, lengths) for k, m in zip(self._keys(), self.members)}
        first = out["m0"]
        out["mask"], out["lengths"] = first["mask"], first["lengths"]
        return out

    def score_parts(self, img_emb: Embeddings, txt_emb: Embeddings) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {
            name: m.score(img_emb[k], txt_emb[k])
            for name, k, m in zip(self.names, self._keys(), self.members)
        }
        sims = sum(w * s for w, s in zip(self.weights, parts.values()))
        return sims, parts  # type: ignore[return-value]

    @torch.no_grad()
    def explain(self, feats: Tensor, ids: Tensor, lengths: Tensor) -> Explanation:
        member_expl = [m.explain(feats, ids, lengths) for m in self.members]
        sims = sum(w * e.sims for w, e in zip(self.weights, member_expl))
        out = Explanation(sims=sims, mask=member_expl[0].mask)  # type: ignore[arg-type]
        for name, e in zip(self.names, member_expl):
            out.stream_scores[name] = e.sims
            out.attention.update({f"{name}:{k}": v for k, v in e.attention.items()})
            out.edges.update({f"{name}:{k}": v for k, v in e.edges.items()})
            out.gates.update({f"{name}:{k}": v for k, v in e.gates.items()})
            out.node_layout.update({f"{name}:{k}": v for k, v in e.node_layout.items()})
        out.extras["members"] = dict(zip(self.names, member_expl))
        return out

    def training_loss(self, batch: Any, criterion: Any) -> tuple[Tensor, dict[str, Tensor]]:
        raise ConfigError(
            "an ensemble is not trained as one model: train each member (e.g. 'sgr' and 'saf') and "
            "combine their checkpoints at evaluation time"
        )


def sgraf(**config: Any) -> Ensemble:
    """SGRAF: the average of an SGR and an SAF model sharing ``config`` (untrained members)."""
    return Ensemble([create("sgr", **config), create("saf", **config)], names=["sgr", "saf"])


register_builder("sgraf", sgraf)
