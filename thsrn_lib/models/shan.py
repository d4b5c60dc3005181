"""SHAN: Step-wise Hierarchical Alignment Network (reconstruction).

Zhong Ji, Kexin Chen, Haoran Wang. "Step-Wise Hierarchical Alignment Network for Image-Text
Matching". IJCAI 2021. https://arxiv.org/abs/2106.06509

Only the abstract and a third-party note restating the key equations are available, so this is a
**reconstruction** (spec ``shan.md``); numbers it produces are re-implementation numbers.
Three alignment steps score each (image, caption) pair:

1. **L2L** (fragment level): regions attend to words (alpha) and words attend to regions (beta);
   fragment scores ``R_v(i) = cos(v_i, t*_i)``, ``R_t(j) = cos(t_j, v*_j)``.
2. **G2L** (context level): gated fusion of each fragment with its attended counterpart,
   pooled into *pair-dependent* contexts ``v_c``, ``t_c``; each context attends over the other
   modality's fragments; ``S_G2L = ½[cos(v_c, t*_c) + cos(t_c, v*_c)]``.
3. **G2G**: ``S_G2G = cos(v_c + t*_c, t_c + v*_c)``.

``S = Σ_k w_k S_k``. Every assumption of shan.md §8 is a :class:`SHANConfig` field (default =
the spec's value): word input (``word_init``, ``glove_path``), L2L temperatures
(``lambda_i2t``/``lambda_t2i``; the single-λ alternative is both = 9), L2L aggregation (``mu``),
fusion (``fusion_gate``), context scorer (``context_pool``, ``pool_dropout``), G2L form
(``lambda_g``, ``g2l_over``), final score (``step_weights``, ``score_reduce``, ``steps``),
variants (``variant``; the "Full = ensemble of T2I and I2T" reading is the registered builder
``"shan_ensemble"``), loss (``per_step_loss``).

Implementation notes:

- All B x N pairs are scored at once with masks; captions are processed in chunks of
  ``chunk_size`` only to bound memory (``(B, chunk, R or L, D)`` tensors).
- The fusion gates use the exact saving of shan.md §4: ``G[a; x*] = G_a a + Σ α (G_b x)``, with
  ``G_a``/``G_b`` applied once per item, so no ``2D -> D`` product is computed per pair.
- :meth:`SHAN.reference_scores` is a slow per-pair implementation (plain concatenation gates)
  used by the tests to prove the vectorised path equal in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError, DataError
from .base import Embeddings, Explanation, MatchingModel, ModelConfig
from .encoders import ImageEncoder
from .ensemble import Ensemble
from .glove import build_text_encoder, load_glove, resolve_word_init
from .layers import init_like_sgraf, l2norm, lengths_to_mask, masked_softmax
from .registry import create, register_builder, register_model

__all__ = ["SHANConfig", "SHAN", "SelfAttentionPool", "AdditivePool", "MeanPool", "shan_ensemble", "STEPS"]

STEPS = ("l2l", "g2l", "g2g")
VARIANTS = ("full", "t2i", "i2t")
CONTEXT_POOLS = ("sa", "mean", "additive")
_EPS = 1e-8  # cos(a, b) = a.b / max(|a||b|, eps)  (shan.md §2)


@dataclass
class SHANConfig(ModelConfig):
    """SHAN settings; defaults are shan.md's values. All model-specific fields are [ASSUMED] choices.

    Attributes:
        word_init: "auto" (default): frozen GloVe ⊕ learned when ``glove_path`` is set, else
            learned only, with a warning; resolved in :meth:`validate`, so the stored config says
            which was used. Or "learned" / "glove+learned" explicitly.
        glove_path: GloVe text file (e.g. glove.840B.300d.txt), read by ``prepare``.
        glove_dim: dimension of the GloVe vectors (the learned part is ``word_dim``).
        variant: "full" (both directions), "t2i" (mu = 0 and S_G2L = cos(t_c, v*_c)) or "i2t"
            (mu = 1 and S_G2L = cos(v_c, t*_c)); G2G is the same in all three.
        steps: steps summed into the score (non-empty subset of "l2l", "g2l", "g2g"). Steps left
            out are not scored; the L2L attentions are always computed (later steps need them).
        fusion_gate: gated fusion ``g*a + (1-g)*x*``; False = plain average ``(a + x*)/2``.
        context_pool: "sa" (SGRAF-style self-attention without BN), "mean", or "additive".
        pool_dropout: dropout inside the "sa" context scorer.
        g2l_over: G2L contexts attend over the "local" features (v_i, t_j) or the "fused" ones.
        lambda_i2t, lambda_t2i: L2L softmax temperatures (region->words, word->regions).
        lambda_g: G2L softmax temperature.
        mu: weight of the region side in S_L2L (variant "full" only).
        step_weights: weights of (l2l, g2l, g2g).
        score_reduce: "sum" of the weighted steps, or "mean" (divided by the active weights' sum).
        per_step_loss: also apply the ranking loss to each active step's score (weight 1).
        chunk_size: captions per chunk when scoring (memory only; results do not depend on it).
        grad_checkpoint: recompute each chunk in the backward pass (training memory only).
    """

    word_init: str = "auto"
    glove_path: str | None = None
    glove_dim: int = 300
    variant: str = "full"
    steps: tuple[str, ...] = STEPS
    fusion_gate: bool = True
    context_pool: str = "sa"
    pool_dropout: float = 0.4
    g2l_over: str = "local"
    lambda_i2t: float = 4.0
    lambda_t2i: float = 9.0
    lambda_g: float = 9.0
    mu: float = 0.5
    step_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    score_reduce: str = "sum"
    per_step_loss: bool = False
    chunk_size: int = 16
    grad_checkpoint: bool = False

    def validate(self) -> None:
        """Check every field; resolve ``word_init="auto"`` (idempotent)."""
        self.word_init = resolve_word_init(self.word_init, self.glove_path, "SHAN")
        self.steps = tuple(self.steps)
        self.step_weights = tuple(float(w) for w in self.step_weights)  # type: ignore[assignment]
        if self.variant not in VARIANTS:
            raise ConfigError(f"SHAN variant must be one of {VARIANTS}, got {self.variant!r}")
        if not self.steps or len(set(self.steps)) != len(self.steps) or any(s not in STEPS for s in self.steps):
            raise ConfigError(f"SHAN steps must be a non-empty subset of {STEPS} without repeats, got {self.steps}")
        self.steps = tuple(s for s in STEPS if s in self.steps)  # canonical order
        if self.context_pool not in CONTEXT_POOLS:
            raise ConfigError(f"SHAN context_pool must be one of {CONTEXT_POOLS}, got {self.context_pool!r}")
        if self.g2l_over not in ("local", "fused"):
            raise ConfigError(f"SHAN g2l_over must be 'local' or 'fused', got {self.g2l_over!r}")
        if self.score_reduce not in ("sum", "mean"):
            raise ConfigError(f"SHAN score_reduce must be 'sum' or 'mean', got {self.score_reduce!r}")
        if len(self.step_weights) != 3:
            raise ConfigError(f"SHAN step_weights needs 3 numbers (l2l, g2l, g2g), got {self.step_weights}")
        if self.score_reduce == "mean" and sum(w for s, w in zip(STEPS, self.step_weights) if s in self.steps) <= 0:
            raise ConfigError("SHAN score_reduce='mean' needs a positive sum of the active step_weights")
        if not 0.0 <= self.mu <= 1.0:
            raise ConfigError(f"SHAN mu must be in [0, 1], got {self.mu}")
        for name in ("lambda_i2t", "lambda_t2i", "lambda_g"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"SHAN {name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.pool_dropout < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("SHAN dropout and pool_dropout must be in [0, 1)")
        if self.chunk_size < 1:
            raise ConfigError(f"SHAN chunk_size must be >= 1, got {self.chunk_size}")
        if self.glove_dim < 1 or self.word_dim < 1 or self.embed_size < 1:
            raise ConfigError("SHAN glove_dim, word_dim and embed_size must be positive")


# --------------------------------------------------------------------------- context pooling
def _masked_avg(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``x (..., P, D)`` over P; ``mask`` broadcastable to ``(..., P)`` (None = all valid)."""
    if mask is None:
        return x.mean(dim=-2)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=-2) / m.sum(dim=-2).clamp_min(1.0)


def _pool_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    return torch.softmax(logits, dim=-1) if mask is None else masked_softmax(logits, mask, dim=-1)


class SelfAttentionPool(nn.Module):
    """SGRAF-style self-attention pooling without BatchNorm (context_pool="sa").

    ``forward(x (..., P, D), mask (..., P) | None) -> (context (..., D), weights (..., P))`` with
    ``a = softmax_p(w · (Drop(tanh(W_l x_p)) ⊙ Drop(tanh(W_g m))) + b)``, ``m`` = masked mean.
    """

    def __init__(self, dim: int, dropout: float = 0.4) -> None:
        super().__init__()
        self.loc = nn.Linear(dim, dim)
        self.glo = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        loc = self.drop(torch.tanh(self.loc(x)))  # (..., P, D): the dominant per-pair cost
        glo = self.drop(torch.tanh(self.glo(_masked_avg(x, mask))))  # (..., D)
        # w · (l ⊙ g) = l · (w ⊙ g): folding w into the per-context vector saves a (..., P, D) product.
        logits = torch.einsum("...pd,...d->...p", loc, glo * self.score.weight[0]) + self.score.bias
        weights = _pool_softmax(logits, mask)
        return torch.einsum("...p,...pd->...d", weights.to(x.dtype), x), weights


class AdditivePool(nn.Module):
    """Additive attention pooling (context_pool="additive"): ``a = softmax_p(w · tanh(W x_p + b))``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1)

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.score(torch.tanh(self.proj(x))).squeeze(-1)
        weights = _pool_softmax(logits, mask)
        return torch.einsum("...p,...pd->...d", weights.to(x.dtype), x), weights


class MeanPool(nn.Module):
    """Masked mean (context_pool="mean"); the weights are uniform over valid positions."""

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if mask is None:
            weights = x.new_full(x.shape[:-1], 1.0 / x.shape[-2])
        else:
            m = mask.to(x.dtype).expand(x.shape[:-1])
            weights = m / m.sum(dim=-1, keepdim=True).clamp_min(1.0)
        return torch.einsum("...p,...pd->...d", weights, x), weights


def _make_pool(kind: str, dim: int, dropout: float) -> nn.Module:
    if kind == "sa":
        return SelfAttentionPool(dim, dropout)
    if kind == "additive":
        return AdditivePool(dim)
    return MeanPool()


def _l2n_safe(x: Tensor) -> Tensor:
    """``x / (|x| + 1e-8)`` like :func:`~thsrn_lib.models.layers.l2norm`, with a finite gradient at x = 0.

    Padded word rows are exactly 0 when projected (P_t has no bias); the ``sqrt`` backward of
    ``l2norm`` is inf there and ``0 * inf`` poisons P_t's gradient with NaN. ``vector_norm``
    defines the gradient at 0 as 0.
    """
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + _EPS)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last axis (broadcasting), ``a.b / max(|a||b|, 1e-8)``."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(_EPS)


def _cos_from_dot(dot: Tensor, norm_a: Tensor, norm_b: Tensor) -> Tensor:
    return dot / (norm_a * norm_b).clamp_min(_EPS)


# ------------------------------------------------------------------------------------ model
@register_model("shan")
class SHAN(MatchingModel):
    """SHAN (Ji, Chen, Wang, IJCAI 2021, https://arxiv.org/abs/2106.06509), reconstructed from shan.md.

    Embeddings: images ``{"regions": (B, R, D)}``; captions ``{"words": (N, L, D), "mask",
    "lengths"}``. There is no per-item global vector (the contexts depend on the pair), so
    :meth:`global_image_vectors` returns None.

    Assumptions and their switches (all in :class:`SHANConfig`, defaults = shan.md §8):
    word input (``word_init``: frozen GloVe ⊕ learned when ``glove_path`` is set, else learned
    with a warning); P_v/P_t D x D without bias and l2n before the product; λ_i2t = 4,
    λ_t2i = 9 (``lambda_i2t``, ``lambda_t2i``); μ = 0.5 (``mu``); separate gates G_v, G_t
    (``fusion_gate`` to replace them by an average); SGRAF-style self-attention context scorer
    with dropout 0.4 (``context_pool``, ``pool_dropout``); mirrored G2L attention with λ_g = 9
    over the local features (``lambda_g``, ``g2l_over``); unit step weights summed
    (``step_weights``, ``score_reduce``, ``steps``); Full = one model using both directions
    (``variant``; builder ``"shan_ensemble"`` for the ensemble reading); per-step losses off
    (``per_step_loss``). Numbers are re-implementation numbers.

    ``explain`` returns: ``attention["t2i"]`` beta ``(B, N, L, R)`` (each word over regions),
    ``attention["i2t"]`` alpha ``(B, N, R, L)`` (each region over words),
    ``attention["g2l_t2i"]`` ``(B, N, R)`` (the caption context over regions, giving v*_c),
    ``attention["g2l_i2t"]`` ``(B, N, L)`` (the image context over words, giving t*_c);
    ``gates["i2t"]`` = [context-pooling weights over regions ``(B, N, R)``], ``gates["t2i"]`` =
    [over words ``(B, N, L)``]; ``stream_scores`` ``"l2l"``, ``"g2l"``, ``"g2g"`` (every computed
    step, used in the score or not); ``extras``: ``"fusion_gate_v"`` ``(B, N, R)`` and
    ``"fusion_gate_t"`` ``(B, N, L)`` (gates averaged over D), ``"r_v"`` ``(B, N, R)`` and
    ``"r_t"`` ``(B, N, L)`` (fragment scores), ``"g2l_i2t"``/``"g2l_t2i"`` ``(B, N)``.
    """

    name = "shan"
    config_class = SHANConfig

    def __init__(self, config: SHANConfig) -> None:
        config.validate()
        super().__init__(config)
        cfg = config
        dim = cfg.embed_size
        self.img_enc = ImageEncoder(cfg.img_dim, dim, cfg.no_imgnorm)
        self.txt_enc = build_text_encoder(cfg)
        self.proj_v = nn.Linear(dim, dim, bias=False)
        self.proj_t = nn.Linear(dim, dim, bias=False)
        init_like_sgraf(self.proj_v)
        init_like_sgraf(self.proj_t)
        # Steps 2 and 3 share the contexts; without them the gates and pools are not built at all
        # (so every parameter of a model is used by its score).
        self.uses_context = any(s in cfg.steps for s in ("g2l", "g2g"))
        self.gate_v: nn.Linear | None = None
        self.gate_t: nn.Linear | None = None
        self.pool_v: nn.Module | None = None
        self.pool_t: nn.Module | None = None
        if self.uses_context:
            if cfg.fusion_gate:
                self.gate_v = nn.Linear(2 * dim, dim)  # input [v_i; t*_i]
                self.gate_t = nn.Linear(2 * dim, dim)  # input [t_j; v*_j]
                init_like_sgraf(self.gate_v)
                init_like_sgraf(self.gate_t)
            self.pool_v = _make_pool(cfg.context_pool, dim, cfg.pool_dropout)
            self.pool_t = _make_pool(cfg.context_pool, dim, cfg.pool_dropout)
            init_like_sgraf(self.pool_v)
            init_like_sgraf(self.pool_t)
        # mu of the L2L step as the variant implies (shan.md §2.5).
        self._mu = {"t2i": 0.0, "i2t": 1.0}.get(cfg.variant, cfg.mu)

    # ---------------------------------------------------------------------------- encoding
    def encode_images(self, feats: Tensor) -> Embeddings:
        return {"regions": self.img_enc(feats)}

    def encode_texts(self, ids: Tensor, lengths: Tensor) -> Embeddings:
        lengths = lengths.to(device=ids.device, dtype=torch.long)
        words = self.txt_enc(ids, lengths)
        return {"words": words, "mask": lengths_to_mask(lengths, ids.shape[1]), "lengths": lengths}

    def prepare(self, train_dataset: Any) -> None:
        """Load the frozen GloVe vectors for the dataset's vocab (only for word_init="glove+learned")."""
        if self.config.word_init == "glove+learned":
            from ..text.concepts import vocab_words

            if getattr(train_dataset, "vocab", None) is None:
                raise DataError("SHAN.prepare needs the training set's vocab to look up GloVe vectors (vocab is None)")
            load_glove(self.txt_enc, self.config.glove_path, vocab_words(train_dataset.vocab))

    def aux_loss_weight(self) -> float:
        return 1.0 if self.config.per_step_loss else 0.0

    # --------------------------------------------------------------------- per-item terms
    def _image_terms(self, regions: Tensor) -> dict[str, Tensor]:
        """Everything that depends on the image only: computed once per call, not per pair."""
        terms = {"v": regions, "proj": _l2n_safe(self.proj_v(regions))}
        if self.gate_v is not None and self.gate_t is not None:
            d = regions.shape[-1]
            terms["gate_self"] = F.linear(regions, self.gate_v.weight[:, :d], self.gate_v.bias)  # G_v,a v + b
            terms["gate_cross"] = F.linear(regions, self.gate_t.weight[:, d:])  # G_t,b v (for v* = Σ β v)
        return terms

    def _text_terms(self, words: Tensor, mask: Tensor) -> dict[str, Tensor]:
        terms = {"t": words, "mask": mask, "proj": _l2n_safe(self.proj_t(words))}
        if self.gate_v is not None and self.gate_t is not None:
            d = words.shape[-1]
            terms["gate_self"] = F.linear(words, self.gate_t.weight[:, :d], self.gate_t.bias)  # G_t,a t + b'
            terms["gate_cross"] = F.linear(words, self.gate_v.weight[:, d:])  # G_v,b t (for t* = Σ α t)
        return terms

    # ------------------------------------------------------------------------ pair block
    def _pairs(
        self, img: dict[str, Tensor], txt: dict[str, Tensor], maps: bool
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Scores ``(Bi, c)`` of every step for Bi images x c captions, and (optionally) the maps."""
        cfg = self.config
        v, t, mask = img["v"], txt["t"], txt["mask"]  # (Bi, k, D), (c, n, D), (c, n)
        word_mask = mask[None, :, None, :]  # (1, c, 1, n)
        # ---- step 1: L2L
        affinity = torch.einsum("ikd,cnd->ickn", img["proj"], txt["proj"])  # (Bi, c, k, n)
        alpha = masked_softmax(cfg.lambda_i2t * affinity, word_mask, dim=-1)  # each region over valid words
        # Each word over regions; padded words are zeroed *after* the softmax (masking before it
        # would give all -inf rows).
        beta = torch.softmax(cfg.lambda_t2i * affinity, dim=2).masked_fill(~word_mask, 0.0)
        alpha_x, beta_x = alpha.to(t.dtype), beta.to(v.dtype)
        t_star = torch.einsum("ickn,cnd->ickd", alpha_x, t)  # (Bi, c, k, D) attended words per region
        v_star = torch.einsum("ickn,ikd->icnd", beta_x, v)  # (Bi, c, n, D) attended regions per word
        norm_v, norm_t = v.norm(dim=-1), t.norm(dim=-1)  # (Bi, k), (c, n)
        r_v = _cos_from_dot(torch.einsum("ikd,ickd->ick", v, t_star), norm_v[:, None], t_star.norm(dim=-1))
        r_t = _cos_from_dot(torch.einsum("cnd,icnd->icn", t, v_star), norm_t[None], v_star.norm(dim=-1))
        valid = mask[None].to(r_t.dtype)  # (1, c, n)
        r_t = r_t * valid
        s_l2l = self._mu * r_v.mean(-1) + (1.0 - self._mu) * r_t.sum(-1) / valid.sum(-1)
        scores = {"l2l": s_l2l}
        out_maps: dict[str, Tensor] = {}
        if maps:
            out_maps.update(alpha=alpha, beta=beta, r_v=r_v, r_t=r_t)
        if not self.uses_context:
            return scores, out_maps
        # ---- step 2a: fusion, u = g*a + (1-g)*x* = x* + g*(a - x*)
        if self.gate_v is not None:
            # G[a; x*] = G_a a + G_b Σ α x = G_a a + Σ α (G_b x): the per-item terms carry G_a, G_b.
            g_v = torch.sigmoid(img["gate_self"][:, None] + torch.einsum("ickn,cnd->ickd", alpha_x, txt["gate_cross"]))
            g_t = torch.sigmoid(txt["gate_self"][None] + torch.einsum("ickn,ikd->icnd", beta_x, img["gate_cross"]))
            fused_v = t_star + g_v * (v[:, None] - t_star)  # (Bi, c, k, D)
            fused_t = v_star + g_t * (t[None] - v_star)  # (Bi, c, n, D); padded rows stay 0
        else:
            g_v = g_t = None
            fused_v = 0.5 * (v[:, None] + t_star)
            fused_t = 0.5 * (t[None] + v_star)
        # ---- step 2b: pair-dependent contexts (never cache these per item)
        assert self.pool_v is not None and self.pool_t is not None
        v_c, pool_w_v = self.pool_v(fused_v, None)  # (Bi, c, D), (Bi, c, k)
        t_c, pool_w_t = self.pool_t(fused_t, mask[None])  # (Bi, c, D), (Bi, c, n)
        # ---- step 2c: G2L, each context attends over the other side's fragments
        norm_vc, norm_tc = v_c.norm(dim=-1), t_c.norm(dim=-1)  # (Bi, c)
        if cfg.g2l_over == "local":
            cos_ct = _cos_from_dot(torch.einsum("icd,cnd->icn", v_c, t), norm_vc[..., None], norm_t[None])
            cos_cv = _cos_from_dot(torch.einsum("icd,ikd->ick", t_c, v), norm_tc[..., None], norm_v[:, None])
        else:
            cos_ct = _cos_from_dot(
                torch.einsum("icd,icnd->icn", v_c, fused_t), norm_vc[..., None], fused_t.norm(dim=-1)
            )
            cos_cv = _cos_from_dot(
                torch.einsum("icd,ickd->ick", t_c, fused_v), norm_tc[..., None], fused_v.norm(dim=-1)
            )
        w_ct = masked_softmax(cfg.lambda_g * cos_ct, mask[None], dim=-1)  # image context over words (Bi, c, n)
        w_cv = torch.softmax(cfg.lambda_g * cos_cv, dim=-1)  # caption context over regions (Bi, c, k)
        if cfg.g2l_over == "local":
            t_c_star = torch.einsum("icn,cnd->icd", w_ct.to(t.dtype), t)
            v_c_star = torch.einsum("ick,ikd->icd", w_cv.to(v.dtype), v)
        else:
            t_c_star = torch.einsum("icn,icnd->icd", w_ct.to(fused_t.dtype), fused_t)
            v_c_star = torch.einsum("ick,ickd->icd", w_cv.to(fused_v.dtype), fused_v)
        g2l_i2t = _cos(v_c, t_c_star)
        g2l_t2i = _cos(t_c, v_c_star)
        if cfg.variant == "t2i":
            scores["g2l"] = g2l_t2i
        elif cfg.variant == "i2t":
            scores["g2l"] = g2l_i2t
        else:
            scores["g2l"] = 0.5 * (g2l_i2t + g2l_t2i)
        # ---- step 3: G2G
        scores["g2g"] = _cos(v_c + t_c_star, t_c + v_c_star)
        if maps:
            out_maps.update(
                w_ct=w_ct, w_cv=w_cv, pool_w_v=pool_w_v, pool_w_t=pool_w_t, g2l_i2t=g2l_i2t, g2l_t2i=g2l_t2i
            )
            if g_v is not None and g_t is not None:
                out_maps.update(gate_v=g_v.mean(-1), gate_t=g_t.mean(-1) * valid)
        return scores, out_maps

    def _pairs_scores(self, img: dict[str, Tensor], txt: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._pairs(img, txt, maps=False)[0]

    def _combine(self, steps: dict[str, Tensor]) -> Tensor:
        weights = dict(zip(STEPS, self.config.step_weights))
        active = self.config.steps
        sims = sum(weights[s] * steps[s] for s in active)
        if self.config.score_reduce == "mean":
            sims = sims / sum(weights[s] for s in active)
        return sims  # type: ignore[return-value]

    def _chunks(self, lengths: Tensor) -> list[tuple[int, int, int]]:
        """``(start, end, max_length)`` per caption chunk (one host sync for all chunks)."""
        n, size = lengths.shape[0], self.config.chunk_size
        lens = lengths.tolist()
        return [(s, min(s + size, n), int(max(lens[s : s + size]))) for s in range(0, n, size)]

    # ----------------------------------------------------------------------------- scoring
    def score_parts(self, img_emb: Embeddings, txt_emb: Embeddings) -> tuple[Tensor, dict[str, Tensor]]:
        img = self._image_terms(img_emb["regions"])
        txt_all = self._text_terms(txt_emb["words"], txt_emb["mask"])
        use_ckpt = self.config.grad_checkpoint and self.training and torch.is_grad_enabled()
        outs: list[dict[str, Tensor]] = []
        for start, end, max_len in self._chunks(txt_emb["lengths"]):
            # Trimming to the chunk's longest caption only drops padded (masked) positions.
            txt = {k: v[start:end, :max_len] for k, v in txt_all.items()}
            if use_ckpt:
                outs.append(checkpoint(self._pairs_scores, img, txt, use_reentrant=False))
            else:
                outs.append(self._pairs_scores(img, txt))
        if not outs:
            empty = img["v"].new_zeros(img["v"].shape[0], 0)
            return empty, {s: empty for s in self.config.steps}
        steps = {k: torch.cat([o[k] for o in outs], dim=1) for k in outs[0]}
        parts = {s: steps[s] for s in self.config.steps}
        return self._combine(steps), parts

    # ---------------------------------------------------------------------- slow reference
    def _reference_pair(self, v: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Step scores of one pair: ``v (k, D)`` regions, ``t (n, D)`` valid words only."""
        cfg = self.config
        affinity = l2norm(self.proj_v(v), dim=-1) @ l2norm(self.proj_t(t), dim=-1).T  # (k, n); the plain l2norm
        alpha = torch.softmax(cfg.lambda_i2t * affinity, dim=1)
        beta = torch.softmax(cfg.lambda_t2i * affinity, dim=0)
        t_star, v_star = alpha @ t, beta.T @ v  # (k, D), (n, D)
        s_l2l = self._mu * _cos(v, t_star).mean() + (1 - self._mu) * _cos(t, v_star).mean()
        out = {"l2l": s_l2l}
        if not self.uses_context:
            return out
        if self.gate_v is not None and self.gate_t is not None:
            g_v = torch.sigmoid(self.gate_v(torch.cat([v, t_star], dim=-1)))
            g_t = torch.sigmoid(self.gate_t(torch.cat([t, v_star], dim=-1)))
            u_v, u_t = g_v * v + (1 - g_v) * t_star, g_t * t + (1 - g_t) * v_star
        else:
            u_v, u_t = (v + t_star) / 2, (t + v_star) / 2
        assert self.pool_v is not None and self.pool_t is not None
        v_c, _ = self.pool_v(u_v, None)
        t_c, _ = self.pool_t(u_t, None)
        over_t, over_v = (t, v) if cfg.g2l_over == "local" else (u_t, u_v)
        t_c_star = torch.softmax(cfg.lambda_g * _cos(v_c[None], over_t), dim=0) @ over_t
        v_c_star = torch.softmax(cfg.lambda_g * _cos(t_c[None], over_v), dim=0) @ over_v
        i2t, t2i = _cos(v_c, t_c_star), _cos(t_c, v_c_star)
        out["g2l"] = {"t2i": t2i, "i2t": i2t}.get(cfg.variant, 0.5 * (i2t + t2i))
        out["g2g"] = _cos(v_c + t_c_star, t_c + v_c_star)
        return out

    def reference_scores(self, img_emb: Embeddings, txt_emb: Embeddings) -> tuple[Tensor, dict[str, Tensor]]:
        """Slow per-pair scores (Python loops, plain concatenation gates); same outputs as :meth:`score_parts`."""
        regions, words = img_emb["regions"], txt_emb["words"]
        lengths = txt_emb["lengths"].tolist()
        rows = [
            [self._reference_pair(regions[i], words[j, : lengths[j]]) for j in range(len(lengths))]
            for i in range(regions.shape[0])
        ]
        steps = {k: torch.stack([torch.stack([pair[k] for pair in row]) for row in rows]) for k in rows[0][0]}
        return self._combine(steps), {s: steps[s] for s in self.config.steps}

    # ---------------------------------------------------------------------------- explain
    @torch.no_grad()
    def explain(self, feats: Tensor, ids: Tensor, lengths: Tensor) -> Explanation:
        img_emb, txt_emb = self.encode_images(feats), self.encode_texts(ids, lengths)
        img = self._image_terms(img_emb["regions"])
        txt_all = self._text_terms(txt_emb["words"], txt_emb["mask"])
        n = ids.shape[0]
        size = self.config.chunk_size
        chunks = [
            self._pairs(img, {k: v[s : s + size] for k, v in txt_all.items()}, maps=True) for s in range(0, n, size)
        ]

        def cat(key: str, src: int) -> Tensor:
            return torch.cat([c[src][key] for c in chunks], dim=1)

        steps = {k: cat(k, 0) for k in chunks[0][0]}
        out = Explanation(sims=self._combine(steps).detach(), mask=txt_emb["mask"])
        out.attention["t2i"] = cat("beta", 1).transpose(2, 3).contiguous()  # (B, N, L, R)
        out.attention["i2t"] = cat("alpha", 1)  # (B, N, R, L)
        out.stream_scores = dict(steps)
        out.extras["r_v"], out.extras["r_t"] = cat("r_v", 1), cat("r_t", 1)
        if self.uses_context:
            out.attention["g2l_t2i"] = cat("w_cv", 1)
            out.attention["g2l_i2t"] = cat("w_ct", 1)
            out.gates["i2t"] = [cat("pool_w_v", 1)]
            out.gates["t2i"] = [cat("pool_w_t", 1)]
            out.extras["g2l_i2t"], out.extras["g2l_t2i"] = cat("g2l_i2t", 1), cat("g2l_t2i", 1)
            if self.gate_v is not None:
                out.extras["fusion_gate_v"], out.extras["fusion_gate_t"] = cat("gate_v", 1), cat("gate_t", 1)
        return out


def shan_ensemble(**config: Any) -> Ensemble:
    """SHAN-Full read as an ensemble (shan.md §2.5, ``full_mode="ensemble"``): the average of the
    S matrices of a SHAN-T2I and a SHAN-I2T model, trained separately (untrained members here)."""
    if "variant" in config:
        raise ConfigError("shan_ensemble fixes the members' variants (t2i and i2t); do not pass 'variant'")
    return Ensemble(
        [create("shan", variant="t2i", **config), create("shan", variant="i2t", **config)],
        names=["shan_t2i", "shan_i2t"],
    )


register_builder("shan_ensemble", shan_ensemble)
