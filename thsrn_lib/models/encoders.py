"""Encoders shared by every model: precomputed region features and a bi-GRU over words.

Parameter names (``fc``, ``embed``, ``cap_rnn``) follow the official SGRAF state dicts so that
official checkpoints load with an identity key map.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .layers import l2norm, xavier_init_linear

__all__ = ["ImageEncoder", "TextEncoder"]


class ImageEncoder(nn.Module):
    """Precomputed regions -> joint space: ``v = l2n(W f + b)``.

    Input ``(B, R, F)`` float features; output ``(B, R, D)``. No BatchNorm, no dropout: the stored
    features are used as they are (they must not be renormalised on input).
    """

    def __init__(self, img_dim: int, embed_size: int, no_imgnorm: bool = False) -> None:
        super().__init__()
        self.no_imgnorm = no_imgnorm
        self.fc = nn.Linear(img_dim, embed_size)
        xavier_init_linear(self.fc)

    def forward(self, feats: Tensor) -> Tensor:
        if feats.dim() != 3:
            raise ValueError(f"image features must be (B, R, F), got shape {tuple(feats.shape)}")
        v = self.fc(feats)
        return v if self.no_imgnorm else l2norm(v, dim=-1)


class TextEncoder(nn.Module):
    """Word ids -> per-word embeddings with a (bi-)GRU over packed sequences.

    ``forward(ids (N, L), lengths (N,)) -> (N, L, D)``: lengths count ``<start>``/``<end>`` and may
    come in any order (packing sorts and unsorts internally). The two directions are *averaged*,
    not concatenated; padded rows are exactly zero (also after the l2 normalisation).
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        embed_size: int,
        num_layers: int = 1,
        bi_gru: bool = True,
        no_txtnorm: bool = False,
        dropout: float = 0.4,
    ) -> None:
        super().__init__()
        self.embed_size = embed_size
        self.bi_gru = bi_gru
        self.no_txtnorm = no_txtnorm
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(dropout)
        self.cap_rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=bi_gru)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        if ids.dim() != 2:
            raise ValueError(f"caption ids must be (N, L), got shape {tuple(ids.shape)}")
        if lengths.shape != ids.shape[:1]:
            raise ValueError(f"lengths must be (N,) = ({ids.shape[0]},), got {tuple(lengths.shape)}")
        x = self.dropout(self.embed(ids))
        # pack_padded_sequence needs lengths on the CPU; this is the only host sync of the encoder.
        packed = pack_padded_sequence(x, lengths.detach().cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.cap_rnn(packed)
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        if self.bi_gru:
            h = (h[..., : self.embed_size] + h[..., self.embed_size :]) / 2
        return h if self.no_txtnorm else l2norm(h, dim=-1)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device
