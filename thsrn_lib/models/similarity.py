"""Vectorised similarity building blocks for a block of B images x N captions (SGRAF and its kin).

Every function works on whole blocks at once with boolean masks for the padded word positions,
so no caller needs a Python loop over captions. Notation: R regions, L padded words, D joint
dimension, S similarity-vector size, P graph nodes.

Streams:

* ``"t2i"`` (word-centred, SGRAF/SCAN t2i): each word attends over the regions of the image,
  giving a context per word; the query of the similarity vector is the word.
* ``"i2t"`` (region-centred mirror): each region attends over the *valid* words of the caption,
  giving a context per region; the query is the region.

Normalisations put the epsilon outside the square root (see :mod:`thsrn_lib.models.layers`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .layers import init_like_sgraf, l1norm, l2norm

__all__ = [
    "cross_logits",
    "t2i_attention",
    "i2t_attention",
    "attended_context",
    "similarity_vectors",
    "global_similarity",
    "SGRStep",
    "caption_batchnorm",
    "GatedPooling",
    "BN_STATS",
]

Stream = Literal["t2i", "i2t"]
BN_STATS = ("per_caption", "pooled")
_EPS = 1e-8


def _tracks_grad(*tensors: Tensor) -> bool:
    """True when autograd will record ops on ``tensors`` (then in-place tricks are not allowed)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _l2n_inplace_ok(x: Tensor, dim: int = -1) -> Tensor:
    """:func:`l2norm`, done in place on ``x`` when no gradient is tracked (halves peak memory in eval)."""
    if _tracks_grad(x):
        return l2norm(x, dim=dim)
    # vector_norm avoids materialising x^2 (the eps stays outside the root, as in l2norm).
    return x.div_(torch.linalg.vector_norm(x, dim=dim, keepdim=True).add_(_EPS))


def cross_logits(regions: Tensor, words: Tensor) -> Tensor:
    """LeakyReLU(0.1) of every region-word dot product, as one large matmul.

    Args:
        regions: ``(B, R, D)``.
        words: ``(N, L, D)``.

    Returns:
        ``(B, N, L, R)``: ``leaky(v_{b,r} . t_{n,l})``. Both attention directions start from this
        tensor, so a model using both streams can compute it once and pass it as ``logits=``.
    """
    n, length, d = words.shape
    # (1, N*L, D) @ (B, D, R) -> (B, N*L, R): one GEMM per image over all words of the block.
    dots = torch.matmul(words.reshape(1, n * length, d), regions.transpose(1, 2))
    return F.leaky_relu(dots, 0.1).view(regions.shape[0], n, length, regions.shape[1])


def _check_block(regions: Tensor, words: Tensor, mask: Tensor) -> None:
    if regions.dim() != 3 or words.dim() != 3 or regions.shape[-1] != words.shape[-1]:
        raise ValueError(
            f"expected regions (B, R, D) and words (N, L, D) with the same D, got {tuple(regions.shape)} "
            f"and {tuple(words.shape)}"
        )
    if mask.shape != words.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool (N, L) = {tuple(words.shape[:2])} tensor, got {mask.dtype} {tuple(mask.shape)}"
        )


def t2i_attention(regions: Tensor, words: Tensor, mask: Tensor, smooth: float, logits: Tensor | None = None) -> Tensor:
    """Word-centred attention weights of SGRAF/SCAN t2i.

    For each image b, caption n, word l and region r: ``c = leaky_0.1(v_r . t_l)``; ``c`` is
    l2-normalised over the *valid* words of the caption separately for each region
    (``c / (sqrt(sum_l c^2) + 1e-8)``); then ``softmax_r(smooth * c)``.

    Args:
        regions: ``(B, R, D)``; words: ``(N, L, D)``; mask: ``(N, L)`` bool, True = valid word.
        smooth: inverse temperature lambda (9 in SGRAF).
        logits: optional precomputed :func:`cross_logits` ``(B, N, L, R)``.

    Returns:
        ``(B, N, L, R)``; each valid word's row sums to 1 over regions. Rows of padded words are
        finite (uniform) and must be ignored downstream.
    """
    _check_block(regions, words, mask)
    c = cross_logits(regions, words) if logits is None else logits
    c = c.masked_fill(~mask[None, :, :, None], 0.0)  # padded words leave the word-axis norm
    # Fold lambda into the per-(b, n, r) reciprocal norm: one multiply over the big tensor.
    scale = smooth / (c.pow(2).sum(dim=2, keepdim=True).sqrt() + _EPS)  # (B, N, 1, R)
    return torch.softmax(c * scale, dim=-1)


def i2t_attention(regions: Tensor, words: Tensor, mask: Tensor, smooth: float, logits: Tensor | None = None) -> Tensor:
    """Region-centred mirror of :func:`t2i_attention` (SCAN i2t).

    ``c = leaky_0.1(v_r . t_l)`` is l2-normalised over the regions separately for each word, then
    each region takes a softmax over the caption's valid words of ``smooth * c``.

    Args:
        regions: ``(B, R, D)``; words: ``(N, L, D)``; mask: ``(N, L)`` bool.
        smooth: inverse temperature lambda (SCAN uses 4 for i2t).
        logits: optional precomputed :func:`cross_logits` ``(B, N, L, R)``.

    Returns:
        ``(B, N, R, L)``; each row sums to 1 over the valid words; padded words get exactly 0.
    """
    _check_block(regions, words, mask)
    c = cross_logits(regions, words) if logits is None else logits  # (B, N, L, R)
    scale = smooth / (c.pow(2).sum(dim=-1, keepdim=True).sqrt() + _EPS)  # (B, N, L, 1)
    x = (c * scale).masked_fill(~mask[None, :, :, None], float("-inf"))
    return torch.softmax(x, dim=2).transpose(2, 3)


def attended_context(attn: Tensor, values: Tensor, stream: Stream = "t2i") -> Tensor:
    """Attention-weighted sum of ``values``, l2-normalised (SGRAF normalises the context).

    * ``stream="t2i"``: ``attn (B, N, L, R)`` x regions ``(B, R, D)`` -> ``(B, N, L, D)``.
    * ``stream="i2t"``: ``attn (B, N, R, L)`` x words ``(N, L, D)`` -> ``(B, N, R, D)``.
    """
    if stream == "t2i":
        b, n, length, r = attn.shape
        if values.dim() != 3 or values.shape[:2] != (b, r):
            raise ValueError(
                f"t2i context needs regions (B, R, D) = ({b}, {r}, D) for attention {tuple(attn.shape)}, "
                f"got {tuple(values.shape)} (pass stream='i2t' for region-centred attention)"
            )
        ctx = torch.bmm(attn.reshape(b, n * length, r), values).view(b, n, length, values.shape[-1])
    elif stream == "i2t":
        b, n, r, length = attn.shape
        if values.dim() != 3 or values.shape[:2] != (n, length):
            raise ValueError(
                f"i2t context needs words (N, L, D) = ({n}, {length}, D) for attention {tuple(attn.shape)}, "
                f"got {tuple(values.shape)} (pass stream='t2i' for word-centred attention)"
            )
        ctx = torch.einsum("bnrl,nld->bnrd", attn, values)  # one bmm over captions, (b, r) folded
    else:
        raise ValueError(f"stream must be 't2i' or 'i2t', got {stream!r}")
    return _l2n_inplace_ok(ctx)


def similarity_vectors(ctx: Tensor, query: Tensor, proj: nn.Linear, stream: Stream = "t2i") -> Tensor:
    """Local similarity vectors ``l2n(proj((ctx - query)^2))``.

    * ``stream="t2i"``: ``ctx (B, N, L, D)``, query = words ``(N, L, D)`` -> ``(B, N, L, S)``.
    * ``stream="i2t"``: ``ctx (B, N, R, D)``, query = regions ``(B, R, D)`` -> ``(B, N, R, S)``.

    The query is broadcast (a view), never repeated over the other axis.
    """
    if stream == "t2i":
        q = query
        if q.shape != ctx.shape[1:]:
            raise ValueError(f"t2i query must be words {tuple(ctx.shape[1:])}, got {tuple(q.shape)}")
    elif stream == "i2t":
        if query.shape != (ctx.shape[0], *ctx.shape[2:]):
            raise ValueError(f"i2t query must be regions {(ctx.shape[0], *ctx.shape[2:])}, got {tuple(query.shape)}")
        q = query.unsqueeze(1)
    else:
        raise ValueError(f"stream must be 't2i' or 'i2t', got {stream!r}")
    diff = ctx - q
    diff = diff.square() if _tracks_grad(diff) else diff.square_()
    return _l2n_inplace_ok(proj(diff))


def global_similarity(img_global: Tensor, txt_global: Tensor, proj: nn.Linear) -> Tensor:
    """Global similarity vectors ``l2n(proj((v_b - t_n)^2))`` for every pair: ``(B, D), (N, D) -> (B, N, S)``."""
    diff = img_global.unsqueeze(1) - txt_global.unsqueeze(0)
    return l2norm(proj(diff.square()), dim=-1)


class SGRStep(nn.Module):
    """One similarity-graph-reasoning layer (SGRAF's ``GraphReasoning``), batched over any leading axes.

    ``E = softmax_keys(Q K^T)`` (no scaling, padded keys at -inf), then ``X <- ReLU(W_r (E X) + b_r)``;
    no residual and no normalisation. Parameter names follow the official state dicts. The
    query and key projections are folded into one matrix (see :meth:`_qk_logits`), which is
    exact up to float rounding and saves most of the projection work.
    """

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.graph_query_w = nn.Linear(sim_dim, sim_dim)
        self.graph_key_w = nn.Linear(sim_dim, sim_dim)
        self.sim_graph_w = nn.Linear(sim_dim, sim_dim)
        init_like_sgraf(self)

    def forward(
        self, nodes: Tensor, key_mask: Tensor | None = None, num_queries: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Reason over the nodes.

        Args:
            nodes: ``(..., P, S)``.
            key_mask: ``(..., P)`` bool (broadcastable to the leading axes), True = valid node;
                every row must keep at least one valid key. None = all valid.
            num_queries: if given, only the first ``num_queries`` nodes are updated and returned
                (a readout of node 0 after the last step needs only ``num_queries=1``).

        Returns:
            ``new_nodes (..., Q, S)`` and ``edges (..., Q, P)`` with ``Q = num_queries or P``.
        """
        queries = nodes if num_queries is None else nodes[..., :num_queries, :]
        logits = self._qk_logits(queries, nodes)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask.unsqueeze(-2), float("-inf"))
        edges = torch.softmax(logits, dim=-1)
        return torch.relu(self.sim_graph_w(torch.matmul(edges, nodes))), edges

    def _qk_logits(self, queries: Tensor, nodes: Tensor) -> Tensor:
        """Logits ``Q K^T`` ``(..., Q, P)`` computed without projecting the keys.

        ``(Wq x_i + bq) . (Wk x_j + bk) = (Wk^T Wq x_i + Wk^T bq) . x_j + (x_i . Wq^T bk + bq . bk)``.
        The first term needs one ``(S, S)`` projection of the query rows only; the bracket is a
        per-query constant (it cancels in the softmax, but is kept so the logits equal ``Q K^T``
        and ``graph_key_w.bias`` stays in the graph as in the official code). A step then costs
        ``2 P S^2`` instead of ``3 P S^2`` projection multiply-adds, and a readout step
        (``num_queries=1``) almost nothing.
        """
        wq, bq = self.graph_query_w.weight, self.graph_query_w.bias  # (S_out, S_in), (S_out,)
        wk, bk = self.graph_key_w.weight, self.graph_key_w.bias
        folded = F.linear(queries, wk.t() @ wq, wk.t() @ bq)  # (..., Q, S)
        row_const = F.linear(queries, (wq.t() @ bk).unsqueeze(0), (bq @ bk).unsqueeze(0))  # (..., Q, 1)
        return torch.matmul(folded, nodes.transpose(-1, -2)) + row_const


def caption_batchnorm(logits: Tensor, mask: Tensor, bn: nn.BatchNorm1d, stats: str = "per_caption") -> Tensor:
    """BatchNorm1d(1) over gate logits, with the statistics of SGRAF's per-caption loop.

    Args:
        logits: ``(B, N, P)`` one scalar per (image, caption, node).
        mask: ``(N, P)`` bool, True = valid node (padded nodes take no part in the statistics).
        bn: a ``BatchNorm1d(1)``; its mode (train / eval), eps, momentum and affine are honoured.
        stats: ``"per_caption"``: in train mode each caption is normalised with the mean and
            biased variance of its own ``B x n_valid`` logits, and the running statistics move
            exactly as ``N`` sequential BatchNorm calls in caption order would (the folded update
            ``mu <- (1-m)^N mu + sum_j m (1-m)^(N-j) mu_j`` with unbiased variances;
            ``num_batches_tracked += N``). ``"pooled"``: one BatchNorm over all valid logits of
            the block (one running-stat update).

    Returns:
        ``(B, N, P)``; values at padded nodes are finite and meaningless.
    """
    if stats not in BN_STATS:
        raise ConfigError(f"BatchNorm statistics must be one of {BN_STATS}, got {stats!r}")
    if bn.num_features != 1:
        raise ValueError(f"caption_batchnorm needs a BatchNorm1d(1), got BatchNorm1d({bn.num_features})")
    if logits.dim() != 3 or mask.shape != logits.shape[1:]:
        raise ValueError(
            f"expected logits (B, N, P) and mask (N, P), got {tuple(logits.shape)} and {tuple(mask.shape)}"
        )
    x = logits.float()  # statistics in float32, also under autocast
    use_batch_stats = bn.training or bn.running_mean is None
    if use_batch_stats:
        m = mask.to(x.dtype).unsqueeze(0)  # (1, N, P)
        if stats == "per_caption":
            count = m.sum(dim=2) * x.shape[0]  # (1, N): B x valid nodes of each caption
            mean = (x * m).sum(dim=(0, 2), keepdim=True) / count.unsqueeze(-1)  # (1, N, 1)
            var = ((x - mean).pow(2) * m).sum(dim=(0, 2), keepdim=True) / count.unsqueeze(-1)
            count_flat, mean_flat, var_flat = count.view(-1), mean.view(-1), var.view(-1)
        else:
            count_flat = (m.sum() * x.shape[0]).view(1)
            mean = (x * m).sum() / count_flat
            var = ((x - mean).pow(2) * m).sum() / count_flat
            mean_flat, var_flat = mean.view(1), var.view(1)
        if bool((count_flat < 2).any()):
            raise ValueError(
                "BatchNorm in train mode needs more than one value per statistic (here: images x valid "
                "nodes of a caption); use blocks of at least 2 images or call model.eval()"
            )
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            _fold_running_stats(bn, mean_flat.detach(), var_flat.detach() * count_flat / (count_flat - 1))
    else:
        mean, var = bn.running_mean.float(), bn.running_var.float()
    y = (x - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight.float() + bn.bias.float()
    return y.to(logits.dtype)


@torch.no_grad()
def _fold_running_stats(bn: nn.BatchNorm1d, means: Tensor, unbiased_vars: Tensor) -> None:
    """Apply ``len(means)`` sequential running-stat updates of ``bn`` in one step (in order)."""
    k = means.numel()
    t0 = int(bn.num_batches_tracked)
    if bn.momentum is None:
        # Cumulative moving average: after k more updates the running value is the plain average.
        total = t0 + k
        new_mean = (bn.running_mean * t0 + means.sum()) / total
        new_var = (bn.running_var * t0 + unbiased_vars.sum()) / total
    else:
        mom = float(bn.momentum)
        keep = (1.0 - mom) ** torch.arange(k - 1, -1, -1, dtype=torch.float64, device=means.device)
        w = (mom * keep).to(means.dtype)  # weight of update j is m (1-m)^(k-1-j)
        decay = (1.0 - mom) ** k
        new_mean = bn.running_mean * decay + (w * means).sum()
        new_var = bn.running_var * decay + (w * unbiased_vars).sum()
    bn.running_mean.copy_(new_mean)
    bn.running_var.copy_(new_var)
    bn.num_batches_tracked.add_(k)


class GatedPooling(nn.Module):
    """SAF-style attention filtration: pool nodes with sigmoid gates normalised to sum 1.

    ``e_p = attn_sim_w(x_p)`` (or ``attn_sim_w(x_p * g)`` with a conditioning vector ``g``),
    ``beta = l1n(sigmoid(BN(e)) * mask)``, output ``l2n(sum_p beta_p x_p)``. Parameter names
    (``attn_sim_w``, ``bn``) match SGRAF's ``SAF_module``. The BatchNorm follows
    :func:`caption_batchnorm` with ``bn_stats`` (``"per_caption"`` = SGRAF's behaviour).
    """

    def __init__(self, sim_dim: int, bn_stats: str = "per_caption") -> None:
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ConfigError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        self.bn_stats = bn_stats
        self.attn_sim_w = nn.Linear(sim_dim, 1)
        self.bn = nn.BatchNorm1d(1)
        init_like_sgraf(self)

    def forward(self, nodes: Tensor, mask: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Gate and pool.

        Args:
            nodes: ``(B, N, P, S)``.
            mask: ``(N, P)`` bool, True = valid node.
            condition: optional ``(B, N, S)`` vector multiplied into the nodes for the gate logits
                only (the pooled values stay the raw nodes).

        Returns:
            ``pooled (B, N, S)`` and ``beta (B, N, P)`` (0 at padded nodes, sums to 1 over valid ones
            up to the l1 epsilon).
        """
        gate_in = nodes if condition is None else nodes * condition.unsqueeze(-2)
        e = self.attn_sim_w(gate_in).squeeze(-1)  # (B, N, P)
        e = caption_batchnorm(e, mask, self.bn, self.bn_stats)
        beta = l1norm(torch.sigmoid(e) * mask.unsqueeze(0).to(e.dtype), dim=-1)
        pooled = torch.matmul(beta.unsqueeze(-2), nodes).squeeze(-2)  # (B, N, S)
        return l2norm(pooled, dim=-1), beta
