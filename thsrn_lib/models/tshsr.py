"""TSHSR: two-stream hierarchical similarity reasoning (a documented reconstruction).

Paper: Ran Chen, Hanli Wang, Lei Wang, Sam Kwong, "Two-stream Hierarchical Similarity Reasoning
for Image-text Matching", arXiv:2203.05349 (2022), https://arxiv.org/abs/2203.05349.

Only the paper's abstract was available. The abstract fixes *that* there are two streams
(image-to-text and text-to-image level similarity) and a hierarchical similarity reasoning (HSR)
module that extracts context automatically and reasons over it together with the local
interactions; everything else here is an assumption, built on SGRAF
(:mod:`thsrn_lib.models.similarity`) and exposed as a :class:`TSHSRConfig` switch. Numbers
produced with this model are re-implementation numbers, never the paper's.

Layout of one scoring call on a block of B images x N captions::

    regions (B,R,D) --VisualSA--> v_g (B,D)      words (N,L,D) --TextSA--> t_g (N,D)
    T2I stream: word-centred SGRAF nodes  [global; words]   (B,N,L,S) -> HSR -> S_T (B,N)
    I2T stream: region-centred mirror     [global; regions] (B,N,R,S) -> HSR -> S_I (B,N)
    S = fuse(S_T, S_I)

The I2T context is computed *caption-first* ``(N, B, R, D)``: attending over words is a batched
matmul per caption, and the region query then broadcasts over captions without any copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from .base import Embeddings, Explanation, MatchingModel, ModelConfig, select
from .encoders import ImageEncoder, TextEncoder
from .layers import init_like_sgraf, l1norm, l2norm, lengths_to_mask, masked_mean
from .registry import register_model
from .selfattn import TextSA, VisualSA
from .similarity import (
    BN_STATS,
    GATE_NORMS,
    GatedPooling,
    PackedWords,
    SGRStep,
    attended_context,
    cross_logits,
    fast_path_allowed,
    fast_tile,
    global_similarity,
    i2t_attention,
    length_groups,
    packed_cross_logits,
    packed_i2t_attention,
    packed_i2t_similarity,
    packed_t2i_attention,
    packed_t2i_similarity,
    similarity_vectors,
    t2i_attention,
)

__all__ = ["TSHSRConfig", "TSHSR", "HSRA", "HSRB", "FlatSGR", "SAFReadout", "MeanReadout"]

STREAMS = ("t2i", "i2t")
HSR_VARIANTS = ("A", "B", "sgr", "saf", "mean")
FUSIONS = ("mean", "learned", "mlp")
READOUTS = ("global", "concat")


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class TSHSRConfig(ModelConfig):
    """TSHSR switches. Defaults are the reconstruction of spec ``tshsr.md`` (see §12 there).

    Shared fields (:class:`ModelConfig`): encoders and dimensions, assumptions #1-#3.

    Attributes:
        sim_dim: S, size of the similarity vectors (#3).
        lambda_t2i: inverse temperature of the word-centred attention (#6).
        lambda_i2t: inverse temperature of the region-centred attention (#6).
        streams: subset of ``("t2i", "i2t")`` (#5); with one stream its score is the output.
        share_global_proj: one global-node projection for both streams (#8).
        hsr: reasoning module (#10): ``"A"`` (context levels + SGR), ``"B"`` (phrase /
            soft-cluster contexts + SGR), ``"sgr"`` (flat SGRAF SGR with ``hsr_levels`` steps),
            ``"saf"`` (SGRAF SAF filtration), ``"mean"`` (l2n of the mean of the valid nodes).
        hsr_levels: H, context levels of HSR-A; also the number of steps of ``"sgr"`` (#12).
        context_conditioning: HSR-A gate logit ``w . (x * g)`` (True) or SAF's ``w . x`` (#11).
        context_gate_norm: ``"bn"`` (BatchNorm1d(1) on the gate logits) or ``"none"`` (#11).
        bn_stats: train-mode statistics of every gate BatchNorm: ``"per_caption"`` (SGRAF) or
            ``"pooled"`` over the block (#11).
        readout: ``"global"`` (z = g^H) or ``"concat"`` (z = l2n(W [g^H; mean C])), HSR-A only (#15).
        share_hsr: one HSR module (weights and gate BatchNorms) for both streams (#17).
        hsrb_kernel_sizes: HSR-B phrase kernels of the T2I stream (#25).
        hsrb_num_queries: HSR-B learnable soft-cluster queries of the I2T stream (#25).
        hsrb_steps: HSR-B SGR steps (#25).
        fusion: ``"mean"``, ``"learned"`` (sigma(theta) mix, theta = 0 at init) or ``"mlp"`` on
            ``[z_T; z_I]`` (#18).
        aux_stream_loss_weight: gamma of the per-stream ranking losses on S_T and S_I (#20).
        exclude_same_image_negatives: recorded for the trainer's loss (#21); the model ignores it.
    """

    sim_dim: int = 256
    lambda_t2i: float = 9.0
    lambda_i2t: float = 4.0
    streams: tuple[str, ...] = ("t2i", "i2t")
    share_global_proj: bool = False
    hsr: str = "A"
    hsr_levels: int = 3
    context_conditioning: bool = True
    context_gate_norm: str = "bn"
    bn_stats: str = "per_caption"
    readout: str = "global"
    share_hsr: bool = False
    hsrb_kernel_sizes: tuple[int, ...] = (2, 3)
    hsrb_num_queries: int = 4
    hsrb_steps: int = 3
    fusion: str = "mean"
    aux_stream_loss_weight: float = 0.0
    exclude_same_image_negatives: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field and the accepted values."""
        streams = tuple(self.streams)
        if not streams or len(set(streams)) != len(streams) or not set(streams) <= set(STREAMS):
            raise ConfigError(f"streams must be a non-empty subset of {STREAMS} without repeats, got {self.streams!r}")

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ConfigError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        choice("hsr", HSR_VARIANTS)
        choice("fusion", FUSIONS)
        choice("readout", READOUTS)
        choice("context_gate_norm", GATE_NORMS)
        choice("bn_stats", BN_STATS)
        for name in (
            "vocab_size", "img_dim", "word_dim", "embed_size", "num_regions", "num_layers",
            "sim_dim", "hsr_levels", "hsrb_num_queries", "hsrb_steps",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("lambda_t2i", "lambda_i2t"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.hsrb_kernel_sizes or any(int(k) < 1 for k in self.hsrb_kernel_sizes):
            raise ConfigError(f"hsrb_kernel_sizes must be positive integers, got {self.hsrb_kernel_sizes!r}")
        if len(set(self.hsrb_kernel_sizes)) != len(self.hsrb_kernel_sizes):
            raise ConfigError(f"hsrb_kernel_sizes must not repeat a size, got {self.hsrb_kernel_sizes!r}")
        if self.aux_stream_loss_weight < 0:
            raise ConfigError(f"aux_stream_loss_weight must be >= 0, got {self.aux_stream_loss_weight!r}")
        if self.fusion != "mean" and len(streams) != 2:
            raise ConfigError(
                f"fusion={self.fusion!r} combines two streams but streams={streams!r}; use fusion='mean' "
                "(a single stream's score is the output) or enable both streams"
            )
        if self.readout == "concat" and self.hsr != "A":
            raise ConfigError(f"readout='concat' pools HSR-A context nodes; it needs hsr='A', got hsr={self.hsr!r}")


# ------------------------------------------------------------------------------------------------
# reasoning modules (one instance per stream, or one shared)
# ------------------------------------------------------------------------------------------------
@dataclass
class HSROutput:
    """What a reasoning module returns for a block.

    Attributes:
        z: ``(B, N, S)`` readout vector of every pair.
        edges: per reasoning step ``(B, N, P, P)`` (only when traced; P is the full node count of
            the layout, rows/columns of nodes that do not exist yet at a level are 0).
        edge_masks: per step ``(N, P)`` bool: node exists at that step and is valid (traced only).
        gates: per level ``(B, N, n)`` gate weights over the local nodes (traced only).
        layout: node groups in order, as (name, size).
        extras: module-specific traced maps.
    """

    z: Tensor
    edges: list[Tensor] = field(default_factory=list)
    edge_masks: list[Tensor] = field(default_factory=list)
    gates: list[Tensor] = field(default_factory=list)
    layout: list[tuple[str, int]] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)


def _full_mask(mask: Tensor | None, n_caps: int, n_nodes: int, device: torch.device) -> Tensor:
    """The ``(N, n)`` validity mask, all True where the nodes have no padding (I2T regions)."""
    if mask is not None:
        return mask
    return torch.ones(n_caps, n_nodes, dtype=torch.bool, device=device)


def _prefix_mask(mask: Tensor | None, n_prefix: int) -> Tensor | None:
    """Key mask of ``[n_prefix always-valid nodes; local nodes]``; None when nothing is padded."""
    return None if mask is None else F.pad(mask, (n_prefix, 0), value=True)


def _scatter_edges(edges: Tensor, index: Tensor, size: int) -> Tensor:
    """Place ``(B, N, p, p)`` edges of the existing nodes into a zero ``(B, N, size, size)`` layout."""
    out = edges.new_zeros(*edges.shape[:-2], size, size)
    out[..., index[:, None], index[None, :]] = edges
    return out


def sgr_step(step: SGRStep, nodes: Tensor, key_mask: Tensor | None, num_queries: int | None = None) -> tuple[Tensor, Tensor]:
    """Kept for compatibility: the folded-key step now lives in :meth:`SGRStep.forward` (shared with SGR)."""
    return step(nodes, key_mask, num_queries=num_queries)


class HSRLevel(nn.Module):
    """One HSR-A level: a context gate and the level's SGR step."""

    def __init__(self, sim_dim: int, norm: str, bn_stats: str) -> None:
        super().__init__()
        self.gate = GatedPooling(sim_dim, bn_stats=bn_stats, norm=norm)  # HSR-A context extraction
        self.sgr = SGRStep(sim_dim)


class HSRA(nn.Module):
    """HSR-A (spec §5): per level, extract a context node, then one SGR step over
    ``[global; contexts 1..h; locals]`` with padded locals masked as keys.

    Context nodes stay in the graph and are updated by every later step; the locals of level h+1
    are the reasoned locals of level h. Readout: the global node, or ``l2n(W [g; mean C])``.
    """

    def __init__(
        self,
        sim_dim: int,
        levels: int = 3,
        conditioning: bool = True,
        norm: str = "bn",
        bn_stats: str = "per_caption",
        readout: str = "global",
    ) -> None:
        super().__init__()
        self.conditioning = conditioning
        self.readout = readout
        self.levels = nn.ModuleList(HSRLevel(sim_dim, norm, bn_stats) for _ in range(levels))
        self.readout_w = nn.Linear(2 * sim_dim, sim_dim) if readout == "concat" else None
        init_like_sgraf(self)

    def forward(self, glob: Tensor, local: Tensor, mask: Tensor | None, stream: str, trace: bool = False) -> HSROutput:
        """``glob (B, N, S)``, ``local (B, N, n, S)``, ``mask (N, n)`` (None = all valid)."""
        num_levels, n = len(self.levels), local.shape[2]
        out = HSROutput(z=glob)
        g, x, ctx = glob, local, local[:, :, :0]  # ctx: (B, N, h, S), empty before level 1
        p_max = 1 + num_levels + n
        for h, level in enumerate(self.levels, start=1):
            c, beta = level.gate(x, mask, g if self.conditioning else None)
            nodes = torch.cat([g.unsqueeze(2), ctx, c.unsqueeze(2), x], dim=2)  # (B, N, 1 + h + n, S)
            key_mask = _prefix_mask(mask, 1 + h)
            last = h == num_levels
            # After the last step only the global node (and the contexts, for "concat") is read.
            n_query = None if (trace or not last) else (1 if self.readout == "global" else 1 + h)
            nodes, edges = level.sgr(nodes, key_mask, num_queries=n_query)
            g, ctx = nodes[:, :, 0], nodes[:, :, 1 : 1 + h]
            x = nodes[:, :, 1 + h :]
            if trace:
                index = torch.cat([torch.arange(1 + h), torch.arange(1 + num_levels, p_max)]).to(edges.device)
                out.edges.append(_scatter_edges(edges, index, p_max))
                valid = torch.zeros(x.shape[1], p_max, dtype=torch.bool, device=edges.device)
                valid[:, index] = _full_mask(key_mask, x.shape[1], 1 + h + n, edges.device)
                out.edge_masks.append(valid)
                out.gates.append(beta)
        if self.readout_w is None:
            out.z = g
        else:
            out.z = l2norm(self.readout_w(torch.cat([g, ctx.mean(dim=2)], dim=-1)), dim=-1)
        out.layout = [("global", 1)] + [(f"context:{h}", 1) for h in range(1, num_levels + 1)] + [("local", n)]
        return out


class FlatSGR(nn.Module):
    """``hsr="sgr"``: SGRAF's SGR, ``steps`` layers over ``[global; locals]``, readout the global node."""

    def __init__(self, sim_dim: int, steps: int = 3) -> None:
        super().__init__()
        self.steps = nn.ModuleList(SGRStep(sim_dim) for _ in range(steps))

    def forward(self, glob: Tensor, local: Tensor, mask: Tensor | None, stream: str, trace: bool = False) -> HSROutput:
        nodes = torch.cat([glob.unsqueeze(2), local], dim=2)
        key_mask = _prefix_mask(mask, 1)
        out = HSROutput(z=glob, layout=[("global", 1), ("local", local.shape[2])])
        for k, step in enumerate(self.steps):
            last = k == len(self.steps) - 1
            nodes, edges = step(nodes, key_mask, num_queries=1 if last and not trace else None)
            if trace:
                out.edges.append(edges)
                out.edge_masks.append(_full_mask(key_mask, nodes.shape[1], nodes.shape[2], nodes.device))
        out.z = nodes[:, :, 0]
        return out


class SAFReadout(nn.Module):
    """``hsr="saf"``: SGRAF's SAF filtration over ``[global; locals]`` (no reasoning)."""

    def __init__(self, sim_dim: int, bn_stats: str = "per_caption") -> None:
        super().__init__()
        self.saf = GatedPooling(sim_dim, bn_stats)

    def forward(self, glob: Tensor, local: Tensor, mask: Tensor | None, stream: str, trace: bool = False) -> HSROutput:
        nodes = torch.cat([glob.unsqueeze(2), local], dim=2)
        node_mask = _full_mask(_prefix_mask(mask, 1), nodes.shape[1], nodes.shape[2], nodes.device)
        z, beta = self.saf(nodes, node_mask)
        out = HSROutput(z=z, layout=[("global", 1), ("local", local.shape[2])])
        if trace:
            out.gates.append(beta[:, :, 1:])
            out.extras["global_gate"] = beta[:, :, 0]
        return out


class MeanReadout(nn.Module):
    """``hsr="mean"``: ``l2n`` of the mean of the valid nodes ``[global; locals]`` (no reasoning, no parameters)."""

    def forward(self, glob: Tensor, local: Tensor, mask: Tensor | None, stream: str, trace: bool = False) -> HSROutput:
        if mask is None:
            total = glob + local.sum(dim=2)
            count = 1 + local.shape[2]
        else:
            m = mask.to(local.dtype)
            total = glob + torch.matmul(m.unsqueeze(-2), local).squeeze(-2)  # (B, N, S)
            count = (1 + m.sum(dim=-1)).unsqueeze(-1)  # (N, 1)
        return HSROutput(z=l2norm(total / count, dim=-1), layout=[("global", 1), ("local", local.shape[2])])


class HSRB(nn.Module):
    """HSR-B (spec §6): multi-granularity contexts extracted once, then ``steps`` SGR steps.

    * T2I (ordered words): phrase nodes ``l2n(ReLU(Conv1d_k(X)))`` for each kernel k, along the
      word axis without padding; a phrase starting at p is valid iff ``p + k <= n_j``.
    * I2T (unordered regions): M learnable queries, ``alpha_ir = softmax_r(q_i . x_r)``,
      ``c_i = l2n(sum_r alpha_ir x_r)``.

    Built for the streams it serves (both when shared); the graph is ``[global; contexts; locals]``.
    """

    def __init__(
        self,
        sim_dim: int,
        kernel_sizes: tuple[int, ...] | None,
        num_queries: int | None,
        steps: int = 3,
    ) -> None:
        super().__init__()
        self.kernel_sizes = tuple(kernel_sizes or ())
        self.phrase_convs = (
            nn.ModuleList(nn.Conv1d(sim_dim, sim_dim, k) for k in self.kernel_sizes) if kernel_sizes else None
        )
        self.queries = nn.Parameter(torch.empty(num_queries, sim_dim)) if num_queries else None
        self.steps = nn.ModuleList(SGRStep(sim_dim) for _ in range(steps))
        if self.phrase_convs is not None:
            for conv in self.phrase_convs:
                nn.init.xavier_uniform_(conv.weight)  # fans include the kernel size
                nn.init.zeros_(conv.bias)
        if self.queries is not None:
            nn.init.normal_(self.queries, std=1.0 / math.sqrt(sim_dim))

    def _phrases(self, local: Tensor, mask: Tensor | None) -> tuple[list[Tensor], list[Tensor], list[tuple[str, int]]]:
        """Phrase nodes per kernel, as one matmul per kernel on channels-last nodes.

        ``Conv1d_k(X)_p = b + sum_i W[:, :, i] x_{p+i}``: project every node with the k kernel taps
        at once, ``(B, N, n, k*S)``, then add the k shifted slices.
        """
        if self.phrase_convs is None:
            raise ConfigError("this HSR-B module has no phrase convolutions (it was built for the i2t stream only)")
        n_caps, n = local.shape[1], local.shape[2]
        lengths = None if mask is None else mask.sum(dim=1)
        nodes, masks, layout = [], [], []
        for k, conv in zip(self.kernel_sizes, self.phrase_convs):
            n_out = n - k + 1
            if n_out < 1:  # every caption of the block is shorter than the kernel
                continue
            s_out, s_in, _ = conv.weight.shape
            taps = conv.weight.permute(1, 2, 0).reshape(s_in, k * s_out)  # [c, i*S + o] = W[o, c, i]
            y = torch.matmul(local, taps)  # (B, N, n, k*S)
            phrase = conv.bias + sum(y[:, :, i : i + n_out, i * s_out : (i + 1) * s_out] for i in range(k))
            nodes.append(l2norm(torch.relu(phrase), dim=-1))
            start = torch.arange(n_out, device=local.device)
            if lengths is None:
                masks.append(torch.ones(n_caps, n_out, dtype=torch.bool, device=local.device))
            else:
                masks.append(start.unsqueeze(0) + k <= lengths.unsqueeze(1))
            layout.append((f"phrase:{k}", n_out))
        return nodes, masks, layout

    def _clusters(self, local: Tensor) -> tuple[Tensor, Tensor]:
        """``local (B, N, R, S)`` -> clusters ``(B, N, M, S)`` and weights ``alpha (B, N, M, R)``."""
        if self.queries is None:
            raise ConfigError("this HSR-B module has no cluster queries (it was built for the t2i stream only)")
        alpha = torch.softmax(torch.matmul(self.queries, local.transpose(-1, -2)), dim=-1)  # (B, N, M, R)
        return l2norm(torch.matmul(alpha, local), dim=-1), alpha

    def forward(self, glob: Tensor, local: Tensor, mask: Tensor | None, stream: str, trace: bool = False) -> HSROutput:
        n_caps, n = local.shape[1], local.shape[2]
        out = HSROutput(z=glob)
        if stream == "t2i":
            ctx_nodes, ctx_masks, ctx_layout = self._phrases(local, mask)
        else:
            clusters, alpha = self._clusters(local)
            ctx_nodes = [clusters]
            ctx_masks = [torch.ones(n_caps, clusters.shape[2], dtype=torch.bool, device=local.device)]
            ctx_layout = [(f"cluster:{i}", 1) for i in range(1, clusters.shape[2] + 1)]
            if trace:
                out.extras["cluster_weights"] = alpha
        nodes = torch.cat([glob.unsqueeze(2), *ctx_nodes, local], dim=2)
        if mask is None and stream == "i2t":
            key_mask = None  # regions and clusters are all valid
        else:
            key_mask = torch.cat(
                [torch.ones(n_caps, 1, dtype=torch.bool, device=local.device), *ctx_masks,
                 _full_mask(mask, n_caps, n, local.device)],
                dim=1,
            )
        for k, step in enumerate(self.steps):
            last = k == len(self.steps) - 1
            nodes, edges = step(nodes, key_mask, num_queries=1 if last and not trace else None)
            if trace:
                out.edges.append(edges)
                out.edge_masks.append(_full_mask(key_mask, n_caps, nodes.shape[2], nodes.device))
        out.z = nodes[:, :, 0]
        out.layout = [("global", 1), *ctx_layout, ("local", n)]
        return out


def _trim(txt_emb: Embeddings) -> Embeddings:
    """Drop the trailing word columns that are padding in every caption of the block."""
    words = txt_emb["words"]
    used = int(txt_emb["lengths"].max()) if words.shape[0] else words.shape[1]
    if used == words.shape[1]:
        return txt_emb
    return {**txt_emb, "words": words[:, :used], "mask": txt_emb["mask"][:, :used]}


def _build_hsr(cfg: TSHSRConfig, streams: tuple[str, ...]) -> nn.Module:
    if cfg.hsr == "A":
        return HSRA(cfg.sim_dim, cfg.hsr_levels, cfg.context_conditioning, cfg.context_gate_norm, cfg.bn_stats, cfg.readout)
    if cfg.hsr == "B":
        return HSRB(
            cfg.sim_dim,
            tuple(cfg.hsrb_kernel_sizes) if "t2i" in streams else None,
            cfg.hsrb_num_queries if "i2t" in streams else None,
            cfg.hsrb_steps,
        )
    if cfg.hsr == "sgr":
        return FlatSGR(cfg.sim_dim, cfg.hsr_levels)
    if cfg.hsr == "saf":
        return SAFReadout(cfg.sim_dim, cfg.bn_stats)
    return MeanReadout()


class TSHSRStream(nn.Module):
    """The parameters one stream owns: local (and global) node projections, reasoning, score head.

    ``sim_tranglo_w`` / ``hsr`` are None when shared across streams (they then live on the model).
    """

    def __init__(self, cfg: TSHSRConfig, name: str) -> None:
        super().__init__()
        d, s = cfg.embed_size, cfg.sim_dim
        self.sim_tranloc_w = nn.Linear(d, s)
        self.sim_tranglo_w = None if cfg.share_global_proj else nn.Linear(d, s)
        self.hsr = None if cfg.share_hsr else _build_hsr(cfg, (name,))
        self.sim_eval_w = nn.Linear(s, 1)
        for m in (self.sim_tranloc_w, self.sim_tranglo_w, self.sim_eval_w):
            if m is not None:
                init_like_sgraf(m)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
@register_model("tshsr")
class TSHSR(MatchingModel):
    """Two-stream hierarchical similarity reasoning (reconstruction).

    Paper: R. Chen, H. Wang, L. Wang, S. Kwong, "Two-stream Hierarchical Similarity Reasoning for
    Image-text Matching", arXiv:2203.05349, https://arxiv.org/abs/2203.05349. **Only the abstract
    was available**: the design below is the library's reconstruction (spec ``tshsr.md``), built on
    SGRAF; its numbers are re-implementation numbers.

    Established by the abstract: two streams (image-to-text and text-to-image level similarity),
    an HSR module that extracts context automatically and co-exploits it with the local
    interactions for reasoning, one end-to-end framework.

    Assumptions (switch = default; every one is a :class:`TSHSRConfig` field or a fixed default):

    1. visual input: precomputed regions, ``fc`` + l2n (``img_dim``=2048, ``num_regions``=36).
    2. text encoder: 1-layer bi-GRU over 300-d learned embeddings, directions averaged
       (``word_dim``=300, ``num_layers``=1, ``bi_gru``=True).
    3. dimensions: ``embed_size``=1024, ``sim_dim``=256.
    4. encoders, VisualSA and TextSA shared by both streams (fixed).
    5. streams: word-centred T2I (SGRAF) + region-centred I2T (SCAN i2t mirror),
       ``streams``=("t2i", "i2t").
    6. temperatures: ``lambda_t2i``=9, ``lambda_i2t``=4.
    7. attention: LeakyReLU(0.1), clipped l2norm over the other axis, l2n of the context (fixed).
    8. one global node per stream, ``share_global_proj``=False.
    9. a local projection per stream (fixed).
    10. reasoning: ``hsr``="A" (alternatives "B", "sgr", "saf", "mean").
    11. context extraction: gated pooling, ``context_conditioning``=True,
        ``context_gate_norm``="bn", ``bn_stats``="per_caption".
    12. depth: ``hsr_levels``=3.
    13. reasoning operator: SGR step (unscaled dot-product softmax, ReLU, no residual), weights
        per level (fixed).
    14. context nodes stay in the graph and are updated (fixed).
    15. ``readout``="global" ("concat").
    16. score head: Linear S->1 + sigmoid per stream (fixed).
    17. ``share_hsr``=False.
    18. ``fusion``="mean" ("learned", "mlp").
    19. loss: hardest-negative triplet, margin 0.2, summed, on the fused score (trainer default).
    20. ``aux_stream_loss_weight``=0 (ranking loss on S_T and S_I, see :meth:`aux_loss_weight`).
    21. ``exclude_same_image_negatives``=False (recorded for the trainer).
    22. optimiser / schedule: SGRAF-SGR recipe (trainer default).
    23. ``<start>``/``<end>`` are words: nodes in T2I, keys in I2T (fixed).
    24. init: Xavier-uniform Linear/Conv1d, bias 0; BatchNorm 1/0; HSR-B queries N(0, 1/S) (fixed).
    25. HSR-B: ``hsrb_kernel_sizes``=(2, 3), ``hsrb_num_queries``=4, ``hsrb_steps``=3.
    26. a headline number is a single end-to-end model (reporting convention).

    Embeddings: images ``{"regions": (B, R, D), "global": (B, D)}``; texts ``{"words": (N, L, D),
    "global": (N, D), "mask": (N, L), "lengths": (N,)}`` (the layout of SGRAF's models).
    :meth:`score_parts` returns the fused scores and ``{"t2i": S_T, "i2t": S_I}`` (active streams).
    """

    name = "tshsr"
    config_class = TSHSRConfig

    def __init__(self, config: TSHSRConfig) -> None:
        config.validate()
        super().__init__(config)
        cfg = config
        self.active_streams = tuple(s for s in STREAMS if s in cfg.streams)  # canonical order
        self.img_enc = ImageEncoder(cfg.img_dim, cfg.embed_size, cfg.no_imgnorm)
        self.txt_enc = TextEncoder(
            cfg.vocab_size, cfg.word_dim, cfg.embed_size, cfg.num_layers, cfg.bi_gru, cfg.no_txtnorm, cfg.dropout
        )
        self.v_global_w = VisualSA(cfg.embed_size, cfg.num_regions, cfg.dropout)
        self.t_global_w = TextSA(cfg.embed_size, cfg.dropout)
        self.streams = nn.ModuleDict({s: TSHSRStream(cfg, s) for s in self.active_streams})
        self.sim_tranglo_w = nn.Linear(cfg.embed_size, cfg.sim_dim) if cfg.share_global_proj else None
        self.shared_hsr = _build_hsr(cfg, self.active_streams) if cfg.share_hsr else None
        self.fusion_logit = nn.Parameter(torch.zeros(())) if cfg.fusion == "learned" else None
        self.fusion_mlp = (
            nn.Sequential(nn.Linear(2 * cfg.sim_dim, cfg.sim_dim), nn.ReLU(), nn.Linear(cfg.sim_dim, 1))
            if cfg.fusion == "mlp"
            else None
        )
        for m in (self.sim_tranglo_w, self.fusion_mlp):
            if m is not None:
                init_like_sgraf(m)

    # --- encoding ---------------------------------------------------------------------------
    def encode_images(self, feats: Tensor) -> Embeddings:
        """``feats (B, R, F)`` -> ``{"regions": (B, R, D), "global": (B, D)}``."""
        if feats.dim() != 3 or feats.shape[1] != self.config.num_regions or feats.shape[2] != self.config.img_dim:
            raise DataError(
                f"image features must be (B, {self.config.num_regions}, {self.config.img_dim}), got "
                f"{tuple(feats.shape)}; build the model with num_regions/img_dim matching the features"
            )
        if self.training and feats.shape[0] < 2:
            raise DataError(
                "TSHSR in train mode needs at least 2 images per call: the visual self-attention's "
                "BatchNorm1d over features normalises across the images of the call. Drop a final "
                "training batch of size 1, or call model.eval() for inference"
            )
        regions = self.img_enc(feats)
        return {"regions": regions, "global": self.v_global_w(regions, regions.mean(dim=1))}

    def encode_texts(self, ids: Tensor, lengths: Tensor) -> Embeddings:
        """``ids (N, L)``, ``lengths (N,)`` -> ``{"words", "global", "mask", "lengths"}``."""
        if ids.dim() != 2 or lengths.shape != ids.shape[:1]:
            raise DataError(f"expected ids (N, L) and lengths (N,), got {tuple(ids.shape)} and {tuple(lengths.shape)}")
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]):
            raise DataError(
                f"caption lengths must lie in [1, {ids.shape[1]}] (the padded length), got "
                f"[{int(lengths.min())}, {int(lengths.max())}]; pad ids to the longest caption"
            )
        lengths = lengths.to(device=ids.device, dtype=torch.long)
        mask = lengths_to_mask(lengths, ids.shape[1])
        # Padded rows are exact zeros in float32; the fill also keeps reduced-precision runs finite.
        words = self.txt_enc(ids, lengths).masked_fill(~mask.unsqueeze(-1), 0.0)
        glob = self.t_global_w(words, masked_mean(words, mask, dim=1), mask)
        return {"words": words, "global": glob, "mask": mask, "lengths": lengths}

    def global_image_vectors(self, img_emb: Embeddings) -> Tensor:
        """The VisualSA vectors ``(B, D)`` (fast first stage of two-stage retrieval)."""
        return img_emb["global"]

    def global_text_vectors(self, txt_emb: Embeddings) -> Tensor:
        """The TextSA vectors ``(N, D)``."""
        return txt_emb["global"]

    def aux_loss_weight(self) -> float:
        return float(self.config.aux_stream_loss_weight)

    # --- scoring ----------------------------------------------------------------------------
    def _hsr(self, stream: str) -> nn.Module:
        return self.shared_hsr if self.shared_hsr is not None else self.streams[stream].hsr

    def _glo_proj(self, stream: str) -> nn.Linear:
        return self.sim_tranglo_w if self.sim_tranglo_w is not None else self.streams[stream].sim_tranglo_w

    def _t2i_nodes(self, regions: Tensor, words: Tensor, mask: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Word-centred local nodes ``(B, N, L, S)`` and attention ``(B, N, L, R)``."""
        attn = t2i_attention(regions, words, mask, self.config.lambda_t2i, logits=logits)
        ctx = attended_context(attn, regions, stream="t2i")  # (B, N, L, D)
        return similarity_vectors(ctx, words, self.streams["t2i"].sim_tranloc_w, stream="t2i"), attn

    def _i2t_nodes(self, regions: Tensor, words: Tensor, mask: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Region-centred local nodes ``(B, N, R, S)`` and attention ``(B, N, R, L)``.

        Caption-first: with ``attn (N, B, R, L)`` and words ``(N, L, D)`` the context is one bmm per
        caption, ``(N, B, R, D)``, and the region query ``(B, R, D)`` broadcasts over the captions,
        i.e. the t2i-shaped code path of the shared helpers with the roles of the axes swapped.
        """
        # i2t_attention's region-axis norm is zero-safe: padded words (all-zero logits) get no NaN gradient.
        attn = i2t_attention(regions, words, mask, self.config.lambda_i2t, logits=logits)  # (B, N, R, L)
        ctx = attended_context(attn.transpose(0, 1), words, stream="t2i")  # (N, B, R, D)
        local = similarity_vectors(ctx, regions, self.streams["i2t"].sim_tranloc_w, stream="t2i")  # (N, B, R, S)
        return local.transpose(0, 1).contiguous(), attn

    def _packed_nodes(self, regions: Tensor, words: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Inference-only local nodes of the active streams from packed words (no padded D-sized rows):
        ``{"t2i": (B, N, L, S), "i2t": (B, N, R, S)}``; the region-word logits are computed once."""
        packed = PackedWords.from_padded(words, mask)
        logits = packed_cross_logits(regions, packed)  # (B, R, T)
        out: dict[str, Tensor] = {}
        if "i2t" in self.active_streams:  # first: the t2i attention consumes the logits in place
            attn = packed_i2t_attention(logits, packed, self.config.lambda_i2t)
            out["i2t"] = packed_i2t_similarity(attn, regions, packed, self.streams["i2t"].sim_tranloc_w)
        if "t2i" in self.active_streams:
            attn = packed_t2i_attention(logits, packed, self.config.lambda_t2i)
            local = packed_t2i_similarity(attn, regions, packed, self.streams["t2i"].sim_tranloc_w)
            out["t2i"] = packed.unpack(local)
        return out

    def _run(self, img_emb: Embeddings, txt_emb: Embeddings, trace: bool, fast: bool = False) -> dict:
        regions, v_glob = img_emb["regions"], img_emb["global"]
        words, t_glob, mask = txt_emb["words"], txt_emb["global"], txt_emb["mask"]
        if regions.shape[-1] != words.shape[-1]:
            raise DataError(f"image and text embeddings differ in size: {regions.shape[-1]} vs {words.shape[-1]}")
        if fast:
            locals_ = self._packed_nodes(regions, words, mask)
        else:
            logits = cross_logits(regions, words)  # (B, N, L, R), shared by both attention directions
        shared_glob = global_similarity(v_glob, t_glob, self.sim_tranglo_w) if self.sim_tranglo_w is not None else None
        res: dict = {"scores": {}, "z": {}, "hsr": {}, "attention": {}}
        for s in self.active_streams:
            local_mask: Tensor | None = mask if s == "t2i" else None  # every region is a valid node
            if fast:
                local, attn = locals_[s], None
            elif s == "t2i":
                local, attn = self._t2i_nodes(regions, words, mask, logits)
            else:
                local, attn = self._i2t_nodes(regions, words, mask, logits)
            glob = shared_glob if shared_glob is not None else global_similarity(v_glob, t_glob, self._glo_proj(s))
            out = self._hsr(s)(glob, local, local_mask, s, trace=trace)
            res["scores"][s] = torch.sigmoid(self.streams[s].sim_eval_w(out.z)).squeeze(-1)
            res["z"][s] = out.z
            if trace:
                res["hsr"][s], res["attention"][s] = out, attn
        res["fused"] = self._fuse(res["scores"], res["z"])
        return res

    def _fuse(self, scores: dict[str, Tensor], z: dict[str, Tensor]) -> Tensor:
        if len(scores) == 1:
            return next(iter(scores.values()))
        fusion = self.config.fusion
        if fusion == "mean":
            return (scores["t2i"] + scores["i2t"]) / 2
        if fusion == "learned":
            mu = torch.sigmoid(self.fusion_logit)
            return mu * scores["i2t"] + (1 - mu) * scores["t2i"]
        return torch.sigmoid(self.fusion_mlp(torch.cat([z["t2i"], z["i2t"]], dim=-1))).squeeze(-1)

    def score_parts(self, img_emb: Embeddings, txt_emb: Embeddings) -> tuple[Tensor, dict[str, Tensor]]:
        """Fused scores ``(B, N)`` and the per-stream scores ``{"t2i": S_T, "i2t": S_I}``.

        Captions are scored in up to :attr:`max_length_buckets` groups of similar length, each
        trimmed to its longest caption (the T2I cost is linear in the padded length). This is exact
        since a score depends only on its pair; it is skipped in train mode when a gate BatchNorm
        is present, whose running statistics move in caption order.
        """
        if self._use_fast_path(img_emb, txt_emb):
            return self._fast_score_parts(img_emb, txt_emb)
        groups = self._length_groups(txt_emb["lengths"])
        if groups is None:
            res = self._run(img_emb, _trim(txt_emb), trace=False)
            return res["fused"], dict(res["scores"])
        order, chunks = groups
        device = txt_emb["lengths"].device
        outs = [self._run(img_emb, _trim(select(txt_emb, idx.to(device))), trace=False) for idx in chunks]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        inverse = inverse.to(device)
        fused = torch.cat([o["fused"] for o in outs], dim=1)[:, inverse]
        parts = {s: torch.cat([o["scores"][s] for o in outs], dim=1)[:, inverse] for s in self.active_streams}
        return fused, parts

    #: Fast-path tile (images x length-sorted captions); see :meth:`preferred_block`.
    #: None: :func:`~thsrn_lib.models.similarity.fast_tile` of 8 x 16 for the embedding size.
    tile_images: int | None = None
    tile_captions: int | None = None
    #: Set False to force the plain vectorised path (tests compare the two).
    use_fast_path: bool = True

    def preferred_block(self) -> tuple[int, int]:
        """``(images, captions)`` per :meth:`score` call; any block is exact and is tiled internally."""
        return 128, 1024

    def _use_fast_path(self, img_emb: Embeddings, txt_emb: Embeddings) -> bool:
        return fast_path_allowed(self, img_emb, txt_emb)

    def _fast_score_parts(self, img_emb: Embeddings, txt_emb: Embeddings) -> tuple[Tensor, dict[str, Tensor]]:
        """Inference: length-sorted caption tiles x image tiles, packed local nodes, outputs written in place."""
        lens = txt_emb["lengths"].detach().cpu()
        b, n = img_emb["regions"].shape[0], lens.shape[0]
        fused = img_emb["regions"].new_empty(b, n)
        parts = {s: img_emb["regions"].new_empty(b, n) for s in self.active_streams}
        device = txt_emb["lengths"].device
        tile_i, tile_c = fast_tile((8, 16), img_emb["regions"].shape[-1], (self.tile_images, self.tile_captions))
        for idx_cpu in torch.argsort(lens, stable=True).split(tile_c):
            idx = idx_cpu.to(device)
            txt = _trim(select(txt_emb, idx))
            for i0 in range(0, b, tile_i):
                rows = slice(i0, i0 + tile_i)
                res = self._run(select(img_emb, rows), txt, trace=False, fast=True)
                fused[rows, idx] = res["fused"]
                for s in self.active_streams:
                    parts[s][rows, idx] = res["scores"][s]
        return fused, parts

    #: Upper bound on the caption-length groups of :meth:`score_parts` (1 disables grouping).
    max_length_buckets: int = 4
    _MIN_BUCKET = 8

    def _length_groups(self, lengths: Tensor) -> tuple[Tensor, list[Tensor]] | None:
        """Sorted caption order and its split into length groups, or None when one block is as cheap."""
        if self.training and self._has_gate_bn:
            return None
        return length_groups(lengths, self.max_length_buckets, self._MIN_BUCKET)

    @property
    def _has_gate_bn(self) -> bool:
        return any(isinstance(m, nn.BatchNorm1d) for s in self.active_streams for m in self._hsr(s).modules())

    # --- interpretability -------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, feats: Tensor, ids: Tensor, lengths: Tensor) -> Explanation:
        """Maps of a block (run in the model's current mode; call ``eval()`` first for evaluation maps).

        * ``attention["t2i"] (B, N, L, R)`` (rows of padded words zeroed), ``attention["i2t"] (B, N, R, L)``.
        * ``edges[stream]``: per level / step ``(B, N, P, P)``; for HSR-A every level uses the full
          layout ``[global; context:1..H; local]`` with zero rows/columns for the contexts not yet
          extracted at that level (``extras["edge_masks"]`` marks the nodes present and valid).
        * ``gates[stream]``: HSR-A context gates per level over the local nodes (``(B, N, L)`` /
          ``(B, N, R)``); SAF's weights over the local nodes for ``hsr="saf"``.
        * ``stream_scores``: ``"t2i"``, ``"i2t"``, ``"fused"``.
        * ``node_layout[stream]`` and ``extras["node_group_sizes"][stream]`` (parallel lists).
        * ``extras``: ``"edge_masks"``, ``"node_group_sizes"``, ``"cluster_weights"`` (HSR-B i2t,
          ``(B, N, M, R)``), ``"saf_global_gate"`` (``hsr="saf"``), ``"z"`` (readout vectors).
        """
        img, txt = self.encode_images(feats), self.encode_texts(ids, lengths)
        res = self._run(img, txt, trace=True)
        mask = txt["mask"]
        expl = Explanation(sims=res["fused"].detach(), mask=mask)
        expl.extras.update({"edge_masks": {}, "node_group_sizes": {}, "z": {}})
        for s in self.active_streams:
            out: HSROutput = res["hsr"][s]
            attn = res["attention"][s]
            if s == "t2i":
                attn = attn.masked_fill(~mask[None, :, :, None], 0.0)
            expl.attention[s] = attn.detach()
            expl.edges[s] = [e.detach() for e in out.edges]
            expl.gates[s] = [g.detach() for g in out.gates]
            expl.node_layout[s] = [name for name, _ in out.layout]
            expl.extras["node_group_sizes"][s] = [size for _, size in out.layout]
            expl.extras["edge_masks"][s] = out.edge_masks
            expl.extras["z"][s] = out.z.detach()
            expl.stream_scores[s] = res["scores"][s].detach()
            if "cluster_weights" in out.extras:
                expl.extras.setdefault("cluster_weights", {})[s] = out.extras["cluster_weights"].detach()
            if "global_gate" in out.extras:
                expl.extras.setdefault("saf_global_gate", {})[s] = out.extras["global_gate"].detach()
        expl.stream_scores["fused"] = res["fused"].detach()
        return expl

    # --- slow reference (parity tests) ------------------------------------------------------
    def reference_score_parts(self, img_emb: Embeddings, txt_emb: Embeddings) -> tuple[Tensor, dict[str, Tensor]]:
        """Slow per-caption reference of :meth:`score_parts`: valid words only, no masks, plain ops.

        Loops stream by stream, then caption by caption (as SGRAF's official loop), so that in train
        mode every gate BatchNorm is called once per caption in caption order: the semantics that
        the vectorised ``bn_stats="per_caption"`` statistics reproduce. For tests only.
        """
        regions, v_glob = img_emb["regions"], img_emb["global"]
        words, t_glob, lengths = txt_emb["words"], txt_emb["global"], txt_emb["lengths"]
        scores: dict[str, Tensor] = {}
        zs: dict[str, Tensor] = {}
        for s in self.active_streams:
            lam = self.config.lambda_t2i if s == "t2i" else self.config.lambda_i2t
            proj, head, hsr = self.streams[s].sim_tranloc_w, self.streams[s].sim_eval_w, self._hsr(s)
            col_scores, col_z = [], []
            for j in range(words.shape[0]):
                t = words[j, : int(lengths[j])]  # (n, D)
                c = F.leaky_relu(torch.einsum("brd,ld->brl", regions, t), 0.1)  # (B, R, n)
                if s == "t2i":
                    c = c / (c.pow(2).sum(dim=2, keepdim=True).sqrt() + 1e-8)  # over the words
                    a = torch.softmax(lam * c, dim=1)  # each word over the regions
                    ctx = l2norm(torch.einsum("brl,brd->bld", a, regions), dim=-1)  # (B, n, D)
                    local = l2norm(proj((ctx - t.unsqueeze(0)) ** 2), dim=-1)  # (B, n, S)
                else:
                    c = c / (c.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8)  # over the regions
                    b = torch.softmax(lam * c, dim=2)  # each region over the words
                    ctx = l2norm(torch.matmul(b, t), dim=-1)  # (B, R, D)
                    local = l2norm(proj((ctx - regions) ** 2), dim=-1)  # (B, R, S)
                glob = l2norm(self._glo_proj(s)((v_glob - t_glob[j]) ** 2), dim=-1)  # (B, S)
                z = _reference_reasoning(hsr, glob, local, s)
                col_z.append(z)
                col_scores.append(torch.sigmoid(head(z)).squeeze(-1))
            scores[s], zs[s] = torch.stack(col_scores, dim=1), torch.stack(col_z, dim=1)
        return self._fuse(scores, zs), scores


def _reference_reasoning(module: nn.Module, g: Tensor, x: Tensor, stream: str) -> Tensor:
    """Per-caption reasoning: ``g (B, S)``, valid local nodes ``x (B, n, S)`` -> readout ``(B, S)``."""
    if isinstance(module, MeanReadout):
        return l2norm(torch.cat([g.unsqueeze(1), x], dim=1).mean(dim=1), dim=-1)
    if isinstance(module, SAFReadout):
        nodes = torch.cat([g.unsqueeze(1), x], dim=1)
        e = module.saf.bn(module.saf.attn_sim_w(nodes).transpose(1, 2)).squeeze(1)  # BN over (B, 1, n+1)
        beta = l1norm(torch.sigmoid(e), dim=-1)
        return l2norm((beta.unsqueeze(-1) * nodes).sum(dim=1), dim=-1)
    if isinstance(module, FlatSGR):
        nodes = torch.cat([g.unsqueeze(1), x], dim=1)
        for step in module.steps:
            nodes, _ = step(nodes)
        return nodes[:, 0]
    if isinstance(module, HSRB):
        if stream == "t2i":
            contexts = [
                l2norm(torch.relu(conv(x.transpose(1, 2))).transpose(1, 2), dim=-1)
                for k, conv in zip(module.kernel_sizes, module.phrase_convs)
                if x.shape[1] >= k
            ]
        else:
            alpha = torch.softmax(torch.matmul(x, module.queries.t()), dim=1)  # (B, R, M), over regions
            contexts = [l2norm(torch.matmul(alpha.transpose(1, 2), x), dim=-1)]
        nodes = torch.cat([g.unsqueeze(1), *contexts, x], dim=1)
        for step in module.steps:
            nodes, _ = step(nodes)
        return nodes[:, 0]
    if isinstance(module, HSRA):
        contexts: list[Tensor] = []
        for h, level in enumerate(module.levels, start=1):
            gate = level.gate
            e = gate.attn_sim_w(x * g.unsqueeze(1) if module.conditioning else x)  # (B, n, 1)
            if gate.bn is not None:
                e = gate.bn(e.transpose(1, 2)).transpose(1, 2)  # one BatchNorm call over this caption's B x n
            beta = l1norm(torch.sigmoid(e.squeeze(-1)), dim=-1)
            contexts.append(l2norm((beta.unsqueeze(-1) * x).sum(dim=1), dim=-1))
            nodes, _ = level.sgr(torch.cat([g.unsqueeze(1), torch.stack(contexts, dim=1), x], dim=1))
            g, contexts, x = nodes[:, 0], list(nodes[:, 1 : 1 + h].unbind(1)), nodes[:, 1 + h :]
        if module.readout_w is None:
            return g
        return l2norm(module.readout_w(torch.cat([g, torch.stack(contexts, 1).mean(dim=1)], dim=-1)), dim=-1)
    raise TypeError(f"no reference for reasoning module {type(module).__name__}")
