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

from dataclasses import dataclass
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
    "GATE_NORMS",
    "length_groups",
    "fast_tile",
    "fast_path_allowed",
    "PackedWords",
    "packed_cross_logits",
    "packed_t2i_attention",
    "packed_i2t_attention",
    "packed_t2i_similarity",
    "packed_i2t_similarity",
    "rows_per_pass",
    "CPU_ROWS_PER_PASS",
    "CHUNK_MIN_DIM",
]

Stream = Literal["t2i", "i2t"]
BN_STATS = ("per_caption", "pooled")
GATE_NORMS = ("bn", "none")
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


def fast_tile(base: tuple[int, int], dim: int,
              override: tuple[int | None, int | None] = (None, None)) -> tuple[int, int]:
    """``(images, captions)`` per tile of a model's inference fast path for embeddings of size ``dim``.

    ``base`` is tuned at the paper's D = 1024; below D = 512 each side doubles (4x the pairs per
    tile): the per-tile cost of dispatching a few dozen small ops then no longer dominates
    (1.2-1.5x faster at D = 64, ``benchmarks/README.md``). ``override`` entries that are not None win.
    """
    f = 1 if dim >= 512 else 2
    return override[0] or base[0] * f, override[1] or base[1] * f


def fast_path_allowed(model: nn.Module, img_emb: dict[str, Tensor], txt_emb: dict[str, Tensor]) -> bool:
    """Whether ``model``'s inference-only fast path may score this block: enabled
    (``model.use_fast_path``), eval mode, and no autograd graph to build (the fast path writes
    its outputs in place)."""
    tensors = (img_emb["regions"], img_emb["global"], txt_emb["words"], txt_emb["global"])
    return (
        model.use_fast_path
        and not model.training
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, *model.parameters())))
    )


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
    # vector_norm: one pass, and a zero (not 0/0) gradient at the all-zero padded columns.
    scale = smooth / (torch.linalg.vector_norm(c, dim=2, keepdim=True) + _EPS)  # (B, N, 1, R)
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
    # A padded word's logits are all 0: vector_norm's backward is 0 there, where sqrt(sum c^2)
    # gives 0/0 = NaN that would flow into the encoders through the masked softmax.
    scale = smooth / (torch.linalg.vector_norm(c, dim=-1, keepdim=True) + _EPS)  # (B, N, L, 1)
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
    query and key projections are folded into one matrix (see :meth:`folded_weights`), which is
    exact up to float rounding and saves most of the projection work; :meth:`reference_forward`
    is the literal two-projection form (tests prove the two equal).
    """

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.graph_query_w = nn.Linear(sim_dim, sim_dim)
        self.graph_key_w = nn.Linear(sim_dim, sim_dim)
        self.sim_graph_w = nn.Linear(sim_dim, sim_dim)
        init_like_sgraf(self)
        self._fold_cache: tuple[tuple, tuple[Tensor, ...]] | None = None

    def folded_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(W_f (S, S), b_f (S,), w_c (1, S), b_c (1,))`` of the folded logits.

        ``(Wq x_i + bq) . (Wk x_j + bk) = (W_f x_i + b_f) . x_j + (w_c . x_i + b_c)`` with
        ``W_f = Wk^T Wq``, ``b_f = Wk^T bq``, ``w_c = Wq^T bk``, ``b_c = bq . bk``. Without autograd
        the fold (``S^3`` multiply-adds) is cached until a parameter changes (in-place updates and
        ``load_state_dict`` bump the tensors' version counters), so scoring many blocks pays it once.
        """
        wq, bq = self.graph_query_w.weight, self.graph_query_w.bias  # (S_out, S_in), (S_out,)
        wk, bk = self.graph_key_w.weight, self.graph_key_w.bias
        params = (wq, bq, wk, bk)
        cacheable = not _tracks_grad(*params) and not torch.is_autocast_enabled(wq.device.type)
        cacheable = cacheable and not any(p.is_inference() for p in params)  # no version counter to key on
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params) if cacheable else None
        if key is not None and self._fold_cache is not None and self._fold_cache[0] == key:
            return self._fold_cache[1]  # type: ignore[return-value]
        wkt = wk.t()
        folded = (wkt @ wq, wkt @ bq, (wq.t() @ bk).unsqueeze(0), (bq @ bk).unsqueeze(0))
        self._fold_cache = (key, folded) if key is not None else None
        return folded

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

        Cost per graph: ``2 Q S^2 + 2 Q P S`` multiply-adds instead of ``3 P S^2 + 2 P^2 S`` for the
        literal form. The per-query constant ``w_c . x_i + b_c`` cancels in the softmax; it is kept
        when autograd records the step (the logits then equal ``Q K^T`` and ``graph_key_w.bias``
        stays in the graph as officially) and skipped in inference, which also masks and applies
        the ReLU in place.
        """
        # A sliced query block is strided: made contiguous, F.linear runs as one 2-D GEMM instead
        # of a batched matrix-vector product per graph (that took 1.5 % of SGR's scoring time).
        queries = nodes if num_queries is None else nodes[..., :num_queries, :].contiguous()
        w_f, b_f, w_c, b_c = self.folded_weights()
        logits = torch.matmul(F.linear(queries, w_f, b_f), nodes.transpose(-1, -2))  # (..., Q, P)
        if _tracks_grad(nodes, w_f):
            logits = logits + F.linear(queries, w_c, b_c)  # (..., Q, 1) per-query constant
        # Without autograd the constant is skipped: it shifts each softmax row and cancels exactly.
        return self._aggregate(logits, nodes, key_mask)

    def reference_forward(
        self, nodes: Tensor, key_mask: Tensor | None = None, num_queries: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """The literal official form ``softmax(W_q X (W_k X)^T)``: readable ground truth for tests."""
        queries = nodes if num_queries is None else nodes[..., :num_queries, :]
        logits = torch.matmul(self.graph_query_w(queries), self.graph_key_w(nodes).transpose(-1, -2))
        return self._aggregate(logits, nodes, key_mask)

    def _aggregate(self, logits: Tensor, nodes: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        grad = _tracks_grad(logits, nodes, self.sim_graph_w.weight)
        if key_mask is not None:
            fill = logits.masked_fill if grad else logits.masked_fill_  # fresh tensor: in place is safe
            logits = fill(~key_mask.unsqueeze(-2), float("-inf"))
        edges = torch.softmax(logits, dim=-1)
        out = self.sim_graph_w(torch.matmul(edges, nodes))
        return (torch.relu(out) if grad else out.relu_()), edges


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

    ``e_p = attn_sim_w(x_p)`` (or ``w . (x_p * g) + b`` with a conditioning vector ``g``),
    ``beta = l1n(sigmoid(BN(e)) * mask)``, output ``l2n(sum_p beta_p x_p)``. Parameter names
    (``attn_sim_w``, ``bn``) match SGRAF's ``SAF_module``. The BatchNorm follows
    :func:`caption_batchnorm` with ``bn_stats`` (``"per_caption"`` = SGRAF's behaviour);
    ``norm="none"`` drops it (``bn`` is then None).
    """

    def __init__(self, sim_dim: int, bn_stats: str = "per_caption", norm: str = "bn") -> None:
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ConfigError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        if norm not in GATE_NORMS:
            raise ConfigError(f"gate norm must be one of {GATE_NORMS}, got {norm!r}")
        self.bn_stats = bn_stats
        self.attn_sim_w = nn.Linear(sim_dim, 1)
        self.bn = nn.BatchNorm1d(1) if norm == "bn" else None
        init_like_sgraf(self)

    def forward(
        self, nodes: Tensor, mask: Tensor | None, condition: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Gate and pool.

        Args:
            nodes: ``(B, N, P, S)``.
            mask: ``(N, P)`` bool, True = valid node; None = every node valid.
            condition: optional ``(B, N, S)`` vector multiplied into the nodes for the gate logits
                only (the pooled values stay the raw nodes). The logit is computed as
                ``x . (w * g)``, so no ``(B, N, P, S)`` product is kept for autograd.

        Returns:
            ``pooled (B, N, S)`` and ``beta (B, N, P)`` (0 at padded nodes, sums to 1 over valid ones
            up to the l1 epsilon).
        """
        if condition is None:
            e = self.attn_sim_w(nodes).squeeze(-1)  # (B, N, P)
        else:
            u = condition * self.attn_sim_w.weight[0]  # (B, N, S)
            if _tracks_grad(nodes, u):
                e = torch.matmul(nodes, u.unsqueeze(-1)).squeeze(-1) + self.attn_sim_w.bias
            else:
                # Inference: a multiply-reduce over S, 5x faster than a matrix-vector product per
                # graph (bmm) at the papers' sizes. Training keeps the bmm: its rounding is what
                # the recorded demo results were trained with (a rounding-level change moved the
                # demo TSHSR's test rsum by 16, see docs/training.md).
                e = torch.linalg.vecdot(nodes, u.unsqueeze(-2)) + self.attn_sim_w.bias
        if self.bn is not None:
            bn_mask = mask if mask is not None else e.new_ones(e.shape[1:], dtype=torch.bool)
            e = caption_batchnorm(e, bn_mask, self.bn, self.bn_stats)
        beta = torch.sigmoid(e)
        if mask is not None:
            beta = beta * mask.unsqueeze(0).to(e.dtype)
        beta = l1norm(beta, dim=-1)
        pooled = torch.matmul(beta.unsqueeze(-2), nodes).squeeze(-2)  # (B, N, S)
        return l2norm(pooled, dim=-1), beta


# ------------------------------------------------------------------------------------------------
# length grouping (shared by the models that score caption blocks)
# ------------------------------------------------------------------------------------------------
def length_groups(
    lengths: Tensor, max_groups: int, min_group: int = 8, max_cost_ratio: float = 0.85
) -> tuple[Tensor, list[Tensor]] | None:
    """Split captions into up to ``max_groups`` groups of similar length (CPU indices).

    Returns ``(order, chunks)``: the stable length sort and its split into consecutive groups,
    each of at least ``min_group`` captions; or None when grouping does not pay (fewer than two
    groups, or the grouped padded cost ``sum_g |g| max_len(g)`` exceeds ``max_cost_ratio`` of the
    ungrouped ``N max_len``). Scoring each group trimmed to its own longest caption is exact for
    any model whose scores depend only on their pair.
    """
    lens = lengths.detach().cpu()
    n = lens.shape[0]
    k = min(int(max_groups), n // max(1, int(min_group)))
    if k < 2:
        return None
    order = torch.argsort(lens, stable=True)
    chunks = list(order.tensor_split(k))
    if sum(len(c) * int(lens[c].max()) for c in chunks) > max_cost_ratio * n * int(lens.max()):
        return None
    return order, chunks


# ------------------------------------------------------------------------------------------------
# packed fast path (inference): valid words only, no padding in any D-sized tensor
# ------------------------------------------------------------------------------------------------
# The cost of SGRAF-style scoring is the (pair, word, D) work: the attended contexts and the
# D -> S local projection (~80% of the FLOPs). The functions below keep the words of a caption
# block *packed* (T = sum of lengths rows, no padding), turn the per-caption normalisations into
# segment reductions over the packed axis, and do the D-sized element-wise work in place in as few
# passes as possible. On a CPU at large D that work runs in cache-sized row chunks (one image's
# words, or one caption's (image, region) rows, at a time; see rows_per_pass). They are
# inference-only (in-place ops): callers use them when no gradient is tracked, and the plain
# functions above otherwise. Tests prove both give the same numbers.
@dataclass
class PackedWords:
    """The valid words of a caption block, packed.

    Attributes:
        words: ``(T, D)`` valid word vectors in caption order.
        caption: ``(T,)`` long, caption index of each packed word.
        position: ``(T,)`` long, flat index ``n * L + l`` of each packed word in the padded block.
        num_captions: N; length: L (padded length of the block).
    """

    words: Tensor
    caption: Tensor
    position: Tensor
    num_captions: int
    length: int

    @classmethod
    def from_padded(cls, words: Tensor, mask: Tensor) -> PackedWords:
        """``words (N, L, D)``, ``mask (N, L)`` -> packed words (one gather)."""
        n, length, d = words.shape
        position = mask.reshape(-1).nonzero().squeeze(1)
        return cls(
            words=words.reshape(n * length, d).index_select(0, position),
            caption=torch.div(position, length, rounding_mode="floor"),
            position=position,
            num_captions=n,
            length=length,
        )

    def unpack(self, packed: Tensor, lead: int = 0) -> Tensor:
        """``(B, T, S)`` rows -> ``(B, N, lead + L, S)`` zeros elsewhere (the first ``lead`` slots are for
        the caller, e.g. a global node); padded rows are 0 (finite; masked downstream)."""
        b, _, s = packed.shape
        out = packed.new_zeros(b, self.num_captions, lead + self.length, s)
        dest = self.position + lead * (self.caption + 1)  # flat index into (N, lead + L)
        out.view(b, -1, s).index_copy_(1, dest, packed)
        return out


def _no_grad_only(*tensors: Tensor) -> None:
    if _tracks_grad(*tensors):
        raise RuntimeError("the packed scoring functions are inference-only; use the plain functions with autograd")


def packed_cross_logits(regions: Tensor, packed: PackedWords) -> Tensor:
    """``leaky_0.1(v_{b,r} . t)`` for every region and packed word: ``(B, R, T)``, one GEMM."""
    _no_grad_only(regions, packed.words)
    b, r, d = regions.shape
    logits = torch.mm(regions.reshape(b * r, d), packed.words.t())
    return F.leaky_relu_(logits, 0.1).view(b, r, -1)


def _segment_sum(x: Tensor, packed: PackedWords) -> Tensor:
    """Sum of ``(..., T)`` over the words of each caption -> ``(..., N)``."""
    out = x.new_zeros(*x.shape[:-1], packed.num_captions)
    return out.index_add_(-1, packed.caption, x)


def packed_t2i_attention(logits: Tensor, packed: PackedWords, smooth: float) -> Tensor:
    """:func:`t2i_attention` on packed words: ``(B, R, T)`` logits -> weights ``(B, R, T)`` (each
    word's column sums to 1 over R). Consumes ``logits`` (in place)."""
    _no_grad_only(logits)
    # l2 norm over each caption's words, per (image, region): a segment sum of squares.
    scale = _segment_sum(logits.square(), packed).sqrt_().add_(_EPS).reciprocal_().mul_(smooth)  # (B, R, N)
    logits.mul_(scale.index_select(-1, packed.caption))
    return torch.softmax(logits, dim=1)


def packed_i2t_attention(logits: Tensor, packed: PackedWords, smooth: float) -> Tensor:
    """:func:`i2t_attention` on packed words: ``(B, R, T)`` logits -> weights ``(B, R, T)`` (each
    region's weights over the words of each caption sum to 1). Does not modify ``logits``."""
    _no_grad_only(logits)
    x = logits * (smooth / (torch.linalg.vector_norm(logits, dim=1, keepdim=True) + _EPS))  # l2n over R
    # Softmax over each caption's words (a segment softmax), shifted by the segment max.
    seg_max = x.new_full((*x.shape[:-1], packed.num_captions), float("-inf"))
    index = packed.caption.expand_as(x)
    seg_max.scatter_reduce_(-1, index, x, reduce="amax", include_self=True)
    x.sub_(seg_max.index_select(-1, packed.caption)).exp_()
    return x.div_(_segment_sum(x, packed).index_select(-1, packed.caption))


def _l2n_sub_square_(ctx: Tensor, neg_query: Tensor) -> Tensor:
    """``(l2n(ctx) - query)^2`` in place on ``ctx``, given ``-query``: a norm pass, then one fused
    multiply-add pass and one square pass (the plain formula takes five passes and two temporaries)."""
    inv = torch.linalg.vector_norm(ctx, dim=-1, keepdim=True).add_(_EPS).reciprocal_()
    torch.addcmul(neg_query, ctx, inv, out=ctx)  # ctx * inv - query
    return ctx.square_()


def _project_l2n(diff2: Tensor, proj: nn.Linear) -> Tensor:
    """``l2n(proj(x))`` over the last axis, the normalisation in place."""
    y = F.linear(diff2, proj.weight, proj.bias)
    return y.div_(torch.linalg.vector_norm(y, dim=-1, keepdim=True).add_(_EPS))


def _local_rows_(ctx: Tensor, neg_query: Tensor, proj: nn.Linear, out: Tensor) -> None:
    """``out <- l2n(proj((l2n(ctx) - query)^2))`` for a chunk of rows: ``ctx (M, D)`` (scratch,
    overwritten), ``neg_query (M, D)`` = ``-query``, ``out (M, S)`` contiguous."""
    _l2n_sub_square_(ctx, neg_query)
    torch.addmm(proj.bias, ctx, proj.weight.t(), out=out)
    out.div_(torch.linalg.vector_norm(out, dim=-1, keepdim=True).add_(_EPS))


#: Rows of D-sized work per pass on a CPU (:func:`rows_per_pass`). At D = 1024 a chunk is 2 MiB:
#: its context, the normalise-subtract-square passes and the projection's input stay in cache
#: instead of streaming a tile-sized (B, T, D) tensor through memory three times (1.18x on the
#: context-to-local-vector part for one 8 x 480-word tile at the papers' sizes).
CPU_ROWS_PER_PASS = 512
#: Below this embedding size a whole tile fits in cache and the per-chunk op dispatch costs more
#: than it saves (1.3-1.8x slower at the Scenes demo's D = 64).
CHUNK_MIN_DIM = 512


def rows_per_pass(device: torch.device, dim: int) -> int | None:
    """Row chunk of the packed similarity functions for embeddings of size ``dim``:
    :data:`CPU_ROWS_PER_PASS` on a CPU in full precision at ``dim >= CHUNK_MIN_DIM``; otherwise
    None (the whole tile in a few large kernels: small embeddings, accelerators, where fewer
    launches win, and autocast, which does not cover the chunked path's ``out=`` writes)."""
    if device.type != "cpu" or dim < CHUNK_MIN_DIM or torch.is_autocast_enabled(device.type):
        return None
    return CPU_ROWS_PER_PASS


def packed_t2i_similarity(
    attn: Tensor, regions: Tensor, packed: PackedWords, proj: nn.Linear, chunk: int | Literal["auto"] | None = "auto"
) -> Tensor:
    """Word-centred local similarity vectors of packed words: ``attn (B, R, T)`` -> ``(B, T, S)``.

    Equals :func:`attended_context` + :func:`similarity_vectors` (``stream="t2i"``) on the valid words.
    ``chunk``: rows per pass (``"auto"``: :func:`rows_per_pass`; None: the whole tile at once).
    With a chunk, each image's words are streamed in chunks of that many rows through one small
    GEMM for the context, the fused element-wise pass and the projection, all in cache.
    """
    _no_grad_only(attn, regions, packed.words)
    chunk = rows_per_pass(attn.device, regions.shape[-1]) if chunk == "auto" else chunk
    neg_words = packed.words.neg()
    if chunk is None:
        ctx = torch.bmm(attn.transpose(1, 2), regions)  # (B, T, D)
        return _project_l2n(_l2n_sub_square_(ctx, neg_words), proj)
    b, _, t = attn.shape
    out = attn.new_empty(b, t, proj.out_features)
    buf = attn.new_empty(min(t, chunk), regions.shape[-1])
    for i in range(b):
        for t0 in range(0, t, chunk):
            t1 = min(t, t0 + chunk)
            ctx = torch.mm(attn[i, :, t0:t1].t(), regions[i], out=buf[: t1 - t0])  # (m, D)
            _local_rows_(ctx, neg_words[t0:t1], proj, out[i, t0:t1])
    return out


def packed_i2t_similarity(
    attn: Tensor, regions: Tensor, packed: PackedWords, proj: nn.Linear, chunk: int | Literal["auto"] | None = "auto"
) -> Tensor:
    """Region-centred local similarity vectors: ``attn (B, R, T)`` -> ``(B, N, R, S)``.

    Each (image, caption, region) context is a weighted sum of that caption's words. The work is
    caption-first, ``(N, B R, D)``, so the region query ``(B, R, D)`` broadcasts over captions
    without a copy. ``chunk`` as in :func:`packed_t2i_similarity`: with a chunk, one caption at a
    time (its packed words directly, no padding) in chunks of at most that many ``(b, r)`` rows;
    None: one padded bmm over all captions. Equals :func:`attended_context` +
    :func:`similarity_vectors` (``stream="i2t"``).
    """
    _no_grad_only(attn, regions, packed.words)
    chunk = rows_per_pass(attn.device, regions.shape[-1]) if chunk == "auto" else chunk
    b, r, t = attn.shape
    n, length, d = packed.num_captions, packed.length, packed.words.shape[1]
    neg_regions = regions.reshape(b * r, d).neg()
    if chunk is None:
        weights = attn.new_zeros(b * r, n * length)
        weights.index_copy_(1, packed.position, attn.reshape(b * r, t))
        weights = weights.view(b * r, n, length).transpose(0, 1)  # (N, B R, L)
        words = packed.words.new_zeros(n * length, d).index_copy_(0, packed.position, packed.words)
        ctx = torch.bmm(weights, words.view(n, length, d)).view(n, b, r, d)  # (N, B, R, D)
        local = _project_l2n(_l2n_sub_square_(ctx, neg_regions.view(b, r, d)), proj)  # (N, B, R, S)
        return local.transpose(0, 1)
    out = attn.new_empty(n, b * r, proj.out_features)
    buf = attn.new_empty(min(b * r, chunk), d)
    weights = attn.reshape(b * r, t)
    ends = torch.bincount(packed.caption, minlength=n).cumsum(0).tolist()  # one host sync per tile
    start = 0
    for j, end in enumerate(ends):
        for r0 in range(0, b * r, chunk):
            r1 = min(b * r, r0 + chunk)
            ctx = torch.mm(weights[r0:r1, start:end], packed.words[start:end], out=buf[: r1 - r0])  # (m, D)
            _local_rows_(ctx, neg_regions[r0:r1], proj, out[j, r0:r1])
        start = end
    return out.view(n, b, r, -1).transpose(0, 1)
