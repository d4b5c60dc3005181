"""Ranking losses for training on in-batch negatives."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ContrastiveLoss"]


class ContrastiveLoss(nn.Module):
    """Bidirectional hinge triplet loss over a ``(b, b)`` score matrix with positives on the diagonal.

    ``cost_c[i, j] = [m + s[i, j] - s[i, i]]+`` (negative captions of image i) and
    ``cost_i[i, j] = [m + s[i, j] - s[j, j]]+`` (negative images of caption j), diagonals zeroed.
    With ``max_violation`` only the hardest negative of each row / column counts (VSE++);
    otherwise every violation is summed (useful as a warm-up: hardest negatives from the first
    step can collapse some models). The loss is a *sum* over the batch, as in SCAN/SGRAF.

    ``exclude_same_image``: also ignore off-diagonal pairs whose caption belongs to the same image
    (the official code counts them as negatives; off by default).
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True, exclude_same_image: bool = False) -> None:
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation
        self.exclude_same_image = exclude_same_image

    def forward(self, sims: Tensor, image_index: Tensor | None = None, max_violation: bool | None = None) -> Tensor:
        """``sims (b, b)``: rows images, columns captions; ``image_index (b,)`` logical image ids."""
        if sims.dim() != 2 or sims.shape[0] != sims.shape[1]:
            raise ValueError(f"the loss needs a square (b, b) score matrix, got {tuple(sims.shape)}")
        hardest = self.max_violation if max_violation is None else max_violation
        pos = sims.diagonal()
        ignore = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
        if self.exclude_same_image and image_index is not None:
            ignore = ignore | (image_index.unsqueeze(0) == image_index.unsqueeze(1))
        cost_c = (self.margin + sims - pos.unsqueeze(1)).clamp_min(0).masked_fill(ignore, 0)
        cost_i = (self.margin + sims - pos.unsqueeze(0)).clamp_min(0).masked_fill(ignore, 0)
        if hardest:
            return cost_c.max(dim=1).values.sum() + cost_i.max(dim=0).values.sum()
        return cost_c.sum() + cost_i.sum()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, max_violation={self.max_violation}, exclude_same_image={self.exclude_same_image}"
