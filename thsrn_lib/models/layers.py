"""Numerical building blocks shared by every model.

The normalisations put the epsilon *outside* the square root (``x / (||x|| + eps)``), as the
official SGRAF/SCAN code does. This is not ``F.normalize`` (which divides by ``max(||x||, eps)``);
the two differ for near-zero vectors such as padded word rows, and official checkpoints are only
reproduced with this form.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "l2norm",
    "l1norm",
    "lengths_to_mask",
    "masked_softmax",
    "masked_mean",
    "xavier_init_linear",
    "init_like_sgraf",
]


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``x / (sqrt(sum x^2) + eps)`` along ``dim``.

    ``vector_norm`` is one fused pass, and its backward is 0 (not 0/0 = NaN) at an all-zero row,
    which padded words and ReLU-fed vectors produce.
    """
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def l1norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``x / (sum |x| + eps)`` along ``dim``."""
    return x / (x.abs().sum(dim=dim, keepdim=True) + eps)


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """Boolean mask ``(N, L)``, True at valid positions ``l < lengths[n]``."""
    max_len = int(lengths.max()) if max_len is None else max_len
    pos = torch.arange(max_len, device=lengths.device)
    return pos.unsqueeze(0) < lengths.unsqueeze(1)


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax along ``dim`` where ``mask`` (broadcastable, True = keep) excludes positions.

    Masked positions get probability exactly 0. Every slice must keep at least one position.
    """
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of ``x`` over ``dim`` counting only positions where ``mask`` is True.

    ``mask`` has the shape of ``x`` without its trailing feature axis, e.g. x (N, L, D), mask (N, L).
    """
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def xavier_init_linear(layer: nn.Linear) -> None:
    """Xavier-uniform weights ``U(-r, r)``, ``r = sqrt(6 / (fan_in + fan_out))``, zero bias."""
    r = math.sqrt(6.0) / math.sqrt(layer.in_features + layer.out_features)
    nn.init.uniform_(layer.weight, -r, r)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_like_sgraf(module: nn.Module) -> None:
    """SGRAF's initialisation for a sub-tree: Xavier-uniform Linear layers, BatchNorm weight 1 / bias 0.

    Embeddings and GRUs are initialised by their owners (the text encoder), not here.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            xavier_init_linear(m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
