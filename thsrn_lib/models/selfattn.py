"""Self-attention pooling to one global vector per image / caption (SGRAF's ``v_global_w`` / ``t_global_w``).

Module layout and parameter names follow the official SGRAF state dicts
(``embedding_local``, ``embedding_global``, ``embedding_common`` as Sequentials).
"""
from __future__ import annotations

from torch import Tensor, nn

from .layers import init_like_sgraf, l2norm, masked_softmax

__all__ = ["VisualSA", "TextSA"]


class VisualSA(nn.Module):
    """Global image vector from its regions.

    ``forward(local (B, R, D), raw_global (B, D)) -> (B, D)``:
    ``w = softmax_r(common(tanh(BN_R(W1 v_r)) * tanh(BN_D(W2 mean))))``, output ``l2n(sum_r w_r v_r)``.
    ``BN_R`` is a BatchNorm1d whose channels are the R region *slots*, so the model is tied to R;
    in train mode ``BN_D`` needs at least 2 images in the call.
    """

    def __init__(self, embed_dim: int, num_regions: int, dropout: float = 0.4) -> None:
        super().__init__()
        self.embedding_local = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.BatchNorm1d(num_regions), nn.Tanh(), nn.Dropout(dropout)
        )
        self.embedding_global = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.BatchNorm1d(embed_dim), nn.Tanh(), nn.Dropout(dropout)
        )
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        init_like_sgraf(self)

    def forward(self, local: Tensor, raw_global: Tensor) -> Tensor:
        l_emb = self.embedding_local(local)  # (B, R, D)
        g_emb = self.embedding_global(raw_global)  # (B, D)
        weights = self.embedding_common(l_emb * g_emb.unsqueeze(1)).squeeze(-1).softmax(dim=-1)  # (B, R)
        return l2norm((weights.unsqueeze(-1) * local).sum(dim=1), dim=-1)


class TextSA(nn.Module):
    """Global caption vector from its valid words (as :class:`VisualSA`, without BatchNorm).

    ``forward(local (N, L, D), raw_global (N, D), mask (N, L) bool) -> (N, D)``; padded words get
    zero weight.
    """

    def __init__(self, embed_dim: int, dropout: float = 0.4) -> None:
        super().__init__()
        self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Dropout(dropout))
        self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Dropout(dropout))
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        init_like_sgraf(self)

    def forward(self, local: Tensor, raw_global: Tensor, mask: Tensor) -> Tensor:
        l_emb = self.embedding_local(local)  # (N, L, D)
        g_emb = self.embedding_global(raw_global)  # (N, D)
        logits = self.embedding_common(l_emb * g_emb.unsqueeze(1)).squeeze(-1)  # (N, L)
        weights = masked_softmax(logits, mask, dim=-1)
        return l2norm((weights.unsqueeze(-1) * local).sum(dim=1), dim=-1)
