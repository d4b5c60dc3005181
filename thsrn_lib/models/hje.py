"""HJE: hierarchical joint embedding with lexically supervised local space (reconstruction).

Hao Sun, Xiaolin Qin, Xiaojing Liu. "Learning hierarchical embedding space for image-text
matching". Intelligent Data Analysis 28 (2024) 647-665. https://doi.org/10.3233/IDA-230214
("HJE" is this project's label, not the paper's.)

What the paper establishes (abstract and introduction only): two shared spaces learned together,
a **local** one supervised by similarity labels derived from the captions' words and a **global**
one; every image / sentence gets one **fixed** vector, the concatenation of its l2-normalised
local and global representations, so retrieval is a dot product. Everything else is a
reconstruction (spec ``hje.md`` §4) and numbers are re-implementation numbers.

Model (defaults of hje.md §6 in :class:`HJEConfig`):

- backbone: the shared region encoder and bi-GRU text encoder (``word_init``);
- global branch: ``g = l2n(pool(G x))`` (``global_pool``: mean / max / gpo);
- local branch: ``l = l2n(pool(φ x))``, text pooled over *content words* only (tokens with a
  concept; all valid words if a caption has none) (``local_pool``: max / mean / attention);
- labels: concept sets from the training captions (``concept_extractor``,
  ``concept_min_captions``), ``Y`` by ``label_mode`` (coverage / jaccard) as a multi-hot matmul;
- loss: ``L = L_glo + β L_loc`` with ``L_glo`` the criterion passed to :meth:`training_loss`
  (VSE++ hardest-negative triplet) and ``L_loc`` by ``local_loss`` (mse / soft_ce /
  concept_bce), optional ``intra_modal_loss`` and ``fused_triplet``;
- fixed vectors ``e = [√w l; √(1-w) g]`` so ``S = e_v · e_t = w cos_loc + (1-w) cos_glo``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import ConfigError, DataError
from ..text.concepts import (
    EXTRACTORS,
    LABEL_MODES,
    ConceptVocab,
    get_extractor,
    ids_to_multi_hot,
    label_matrix,
    vocab_words,
)
from .base import Embeddings, Explanation, MatchingModel, ModelConfig
from .encoders import ImageEncoder
from .glove import build_text_encoder, load_glove, resolve_word_init
from .layers import init_like_sgraf, l2norm, lengths_to_mask, masked_softmax
from .registry import register_model

__all__ = ["HJEConfig", "HJE", "GPO"]

BRANCHES = ("both", "global", "local")
GLOBAL_POOLS = ("mean", "max", "gpo")
LOCAL_POOLS = ("max", "mean", "attention")
LOCAL_LOSSES = ("mse", "soft_ce", "concept_bce")
CAPTIONS_PER_IMAGE = 5


@dataclass
class HJEConfig(ModelConfig):
    """HJE settings; defaults are hje.md's values. Every model-specific field is an [ASSUMED] choice.

    Attributes:
        word_init: "learned" (spec default), "glove+learned" (needs ``glove_path``), or "auto".
        glove_path, glove_dim: GloVe text file and its dimension (read by ``prepare``).
        branches: "both" (default), "global" (a plain VSE model) or "local".
        global_dim, local_dim: D_g and D_l (1024 each). With ``local_loss="concept_bce"`` the
            local vector has one entry per concept instead (``num_concepts``).
        global_pool: "mean", "max" or "gpo" (VSE∞ generalised pooling; ``gpo_pe_dim``,
            ``gpo_hidden``, ``gpo_temperature`` as in VSE∞: 32, 32, 0.1).
        local_pool: "max", "mean" or "attention" (additive attention scored on the encoder features).
        concept_extractor: "rules" (offline), "wordnet" or "spacy" (need downloaded data; a clear
            ConfigError otherwise, never a silent fallback). ``concept_pos``: POS classes kept by
            wordnet/spacy ("n", "v", "a"). ``concept_min_captions``: keep concepts in >= 5 captions.
        label_mode: "coverage" |K(I)∩K(T)|/|K(T)| or "jaccard".
        local_loss: "mse" (regress l_v·l_t to Y), "soft_ce" (Y-normalised targets against
            softmax(l_v·l_t/τ), τ = ``soft_ce_tau``) or "concept_bce" (local vector = sigmoid
            concept scores trained with BCE against the multi-hots).
        beta: weight of the local loss.
        intra_modal_loss: add MSE of l_v·l_v' and l_t·l_t' to Jaccard labels of the same modality.
        fused_triplet: add the ranking criterion on the fused score.
        fused_weight: w in e = [√w l; √(1-w) g], 0 < w < 1 (used with branches="both").
        num_concepts: K, set by ``prepare`` (0 = not prepared yet); recorded so that a model
            rebuilt from its config has the same shapes.
    """

    word_init: str = "learned"
    glove_path: str | None = None
    glove_dim: int = 300
    branches: str = "both"
    global_dim: int = 1024
    local_dim: int = 1024
    global_pool: str = "mean"
    gpo_pe_dim: int = 32
    gpo_hidden: int = 32
    gpo_temperature: float = 0.1
    local_pool: str = "max"
    concept_extractor: str = "rules"
    concept_pos: tuple[str, ...] = ("n",)
    concept_min_captions: int = 5
    label_mode: str = "coverage"
    local_loss: str = "mse"
    soft_ce_tau: float = 0.05
    beta: float = 1.0
    intra_modal_loss: bool = False
    fused_triplet: bool = False
    fused_weight: float = 0.5
    num_concepts: int = 0

    def validate(self) -> None:
        """Check every field (idempotent)."""
        self.word_init = resolve_word_init(self.word_init, self.glove_path, "HJE")
        self.concept_pos = tuple(self.concept_pos)
        choices = {
            "branches": BRANCHES,
            "global_pool": GLOBAL_POOLS,
            "local_pool": LOCAL_POOLS,
            "concept_extractor": EXTRACTORS,
            "label_mode": LABEL_MODES,
            "local_loss": LOCAL_LOSSES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"HJE {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.concept_pos or any(p not in ("n", "v", "a") for p in self.concept_pos):
            raise ConfigError(f"HJE concept_pos must be a non-empty subset of ('n', 'v', 'a'), got {self.concept_pos}")
        for name in ("global_dim", "local_dim", "gpo_pe_dim", "gpo_hidden", "concept_min_captions", "glove_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"HJE {name} must be >= 1, got {getattr(self, name)}")
        if self.gpo_pe_dim % 2:
            raise ConfigError(f"HJE gpo_pe_dim must be even (sine/cosine pairs), got {self.gpo_pe_dim}")
        if self.num_concepts < 0:
            raise ConfigError(f"HJE num_concepts must be >= 0 (0 = set by prepare), got {self.num_concepts}")
        if self.branches == "both" and not 0.0 < self.fused_weight < 1.0:
            raise ConfigError(
                f"HJE fused_weight must be strictly between 0 and 1 with branches='both', got {self.fused_weight}"
            )
        if self.soft_ce_tau <= 0 or self.gpo_temperature <= 0:
            raise ConfigError("HJE soft_ce_tau and gpo_temperature must be positive")
        if self.beta < 0:
            raise ConfigError(f"HJE beta must be >= 0, got {self.beta}")

    @property
    def uses_global(self) -> bool:
        return self.branches in ("both", "global")

    @property
    def uses_local(self) -> bool:
        return self.branches in ("both", "local")


# ------------------------------------------------------------------------------- pooling
def _sinusoid(length: int, dim: int, device: torch.device) -> Tensor:
    """``(length, dim)`` sine/cosine position codes (Transformer style)."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


def _rank_share(order: Tensor, rank_weights: Tensor) -> Tensor:
    """Per-position share of a pooled vector: weight of each position's rank, averaged over D.

    ``order (N, P, D)``: position holding rank r in dimension d; ``rank_weights (N, P)``.
    """
    share = torch.zeros(order.shape, dtype=rank_weights.dtype, device=order.device)
    share.scatter_(1, order, rank_weights.unsqueeze(-1).expand(order.shape).contiguous())
    return share.mean(-1)


class GPO(nn.Module):
    """Generalised pooling operator of VSE∞ (Chen et al., CVPR 2021, https://github.com/woodfrog/vse_infty).

    Each feature dimension is sorted over the set (descending) and pooled with weights over the
    *ranks*; the weights come from a bi-GRU (directions averaged) over sinusoidal codes of the
    ranks followed by a bias-free linear score, ``softmax(score / temperature)`` over the valid
    ranks. Weights depend only on the set size, so padding never changes the result.
    ``forward(x (N, P, D), mask (N, P) prefix mask | None) -> (pooled (N, D), share (N, P))``.
    """

    def __init__(self, pe_dim: int = 32, hidden: int = 32, temperature: float = 0.1) -> None:
        super().__init__()
        self.pe_dim, self.hidden, self.temperature = pe_dim, hidden, temperature
        self.gru = nn.GRU(pe_dim, hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(hidden, 1, bias=False)

    def rank_weights(self, lengths: Tensor, size: int) -> Tensor:
        """``(N, size)`` pooling weights over ranks for sets of ``lengths`` (zero beyond each length)."""
        n = lengths.shape[0]
        codes = _sinusoid(size, self.pe_dim, lengths.device).unsqueeze(0).expand(n, size, self.pe_dim)
        packed = pack_padded_sequence(codes, lengths.detach().cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=size)
        out = (out[..., : self.hidden] + out[..., self.hidden :]) / 2
        scores = self.linear(out).squeeze(-1).float() / self.temperature
        return masked_softmax(scores, lengths_to_mask(lengths, size), dim=-1)

    def forward(self, x: Tensor, mask: Tensor | None, want_share: bool = False) -> tuple[Tensor, Tensor | None]:
        n, size, _ = x.shape
        if mask is None:
            mask = torch.ones(n, size, dtype=torch.bool, device=x.device)
        weights = self.rank_weights(mask.sum(1), size)  # (N, P)
        filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        ranked, order = filled.sort(dim=1, descending=True)  # padded positions sort last
        ranked = ranked.masked_fill(~mask.unsqueeze(-1), 0.0)  # ranks >= length (mask is a prefix mask)
        pooled = torch.einsum("np,npd->nd", weights.to(x.dtype), ranked)
        return pooled, (_rank_share(order, weights) if want_share else None)


class AttentionPool(nn.Module):
    """Additive attention over positions (local_pool="attention"), scored on the encoder features.

    ``forward(x (N, P, Dout), feats (N, P, D), mask | None) -> (Σ_p a_p x_p (N, Dout), a (N, P))``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1)

    def forward(self, x: Tensor, feats: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.score(torch.tanh(self.proj(feats))).squeeze(-1).float()
        weights = torch.softmax(logits, -1) if mask is None else masked_softmax(logits, mask, -1)
        return torch.einsum("np,npd->nd", weights.to(x.dtype), x), weights


def _max_pool(x: Tensor, mask: Tensor | None, want_share: bool) -> tuple[Tensor, Tensor | None]:
    if mask is not None:
        x = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    pooled, arg = x.max(dim=1)  # (N, D)
    if not want_share:
        return pooled, None
    share = torch.zeros(x.shape, dtype=torch.float32, device=x.device).scatter_(1, arg.unsqueeze(1), 1.0).mean(-1)
    return pooled, share


def _mean_pool(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    n, size, _ = x.shape
    m = torch.ones(n, size, device=x.device) if mask is None else mask.float()
    weights = m / m.sum(1, keepdim=True).clamp_min(1.0)
    return torch.einsum("np,npd->nd", weights.to(x.dtype), x), weights


# ----------------------------------------------------------------------------------- model
@register_model("hje")
class HJE(MatchingModel):
    """HJE (Sun, Qin, Liu, Intelligent Data Analysis 2024, https://doi.org/10.3233/IDA-230214), reconstructed from hje.md.

    A joint-embedding model: ``encode_images -> {"emb": (B, E)}``, ``encode_texts -> {"emb": (N, E),
    "mask", "lengths"}`` with ``E = D_l + D_g`` (one branch only: that branch's size), and
    ``score`` is one matrix product. ``score_parts`` also returns ``{"local": cos_loc,
    "global": cos_glo}`` (or the single branch). :meth:`global_image_vectors` /
    :meth:`global_text_vectors` return the fixed vectors (the fast first stage of two-stage
    retrieval).

    Call :meth:`prepare` with the training set before training (it builds the concept vocabulary
    and, for ``local_loss="concept_bce"``, the concept heads: build the optimizer afterwards).

    Assumptions (switches in :class:`HJEConfig`, defaults = hje.md §6): learned word input
    (``word_init``); Linear + mean pool + l2n global branch (``global_pool``); Linear + max
    pool over content words + l2n local branch (``local_pool``); offline rules extractor with
    min count 5 (``concept_extractor``, ``concept_min_captions``); coverage labels
    (``label_mode``); MSE local loss (``local_loss``); β = 1 (``beta``); no intra-modal terms
    (``intra_modal_loss``); w = 0.5 (``fused_weight``); no fused triplet (``fused_triplet``);
    D_l = D_g = 1024 (``local_dim``, ``global_dim``); both branches (``branches``).

    ``explain`` has no cross-attention maps (the model has none). ``stream_scores``: the parts;
    ``extras``: ``"content_mask"`` ``(N, L)``, and each pooling's per-position share of the pooled
    vector (rows sum to 1 over pooled positions): ``"local_region_share"`` ``(B, R)``,
    ``"local_word_share"`` ``(N, L)``, ``"global_region_share"``, ``"global_word_share"``; for
    max/GPO pooling a position's share is the (rank) weight it receives averaged over dimensions.
    """

    name = "hje"
    config_class = HJEConfig
    is_embedding_model = True

    def __init__(self, config: HJEConfig) -> None:
        config.validate()
        super().__init__(config)
        cfg = config
        dim = cfg.embed_size
        self.img_enc = ImageEncoder(cfg.img_dim, dim, cfg.no_imgnorm)
        self.txt_enc = build_text_encoder(cfg)
        self.glo_v: nn.Linear | None = None
        self.glo_t: nn.Linear | None = None
        self.gpo_v: GPO | None = None
        self.gpo_t: GPO | None = None
        if cfg.uses_global:
            self.glo_v, self.glo_t = nn.Linear(dim, cfg.global_dim), nn.Linear(dim, cfg.global_dim)
            init_like_sgraf(self.glo_v)
            init_like_sgraf(self.glo_t)
            if cfg.global_pool == "gpo":
                self.gpo_v = GPO(cfg.gpo_pe_dim, cfg.gpo_hidden, cfg.gpo_temperature)
                self.gpo_t = GPO(cfg.gpo_pe_dim, cfg.gpo_hidden, cfg.gpo_temperature)
        self.loc_v: nn.Linear | None = None
        self.loc_t: nn.Linear | None = None
        self.att_v: AttentionPool | None = None
        self.att_t: AttentionPool | None = None
        if cfg.uses_local:
            if cfg.local_loss != "concept_bce" or cfg.num_concepts > 0:
                self._build_local_heads()
            if cfg.local_pool == "attention":
                self.att_v, self.att_t = AttentionPool(dim), AttentionPool(dim)
                init_like_sgraf(self.att_v)
                init_like_sgraf(self.att_t)
        # vocab id -> concept id (-1: no concept); saved with the model so that content words and
        # labels are recovered from ids without the training captions.
        self.register_buffer("vocab_to_concept", torch.full((cfg.vocab_size,), -1, dtype=torch.long))
        # Training-set image multi-hots (n_images, K): rebuilt by prepare, never saved.
        self.register_buffer("image_concepts", None, persistent=False)
        self.concept_vocab: ConceptVocab | None = None

    def _build_local_heads(self) -> None:
        cfg = self.config
        out = cfg.num_concepts if cfg.local_loss == "concept_bce" else cfg.local_dim
        device = self.img_enc.fc.weight.device
        self.loc_v = nn.Linear(cfg.embed_size, out).to(device)
        self.loc_t = nn.Linear(cfg.embed_size, out).to(device)
        init_like_sgraf(self.loc_v)
        init_like_sgraf(self.loc_t)

    @property
    def local_out_dim(self) -> int:
        cfg = self.config
        return cfg.num_concepts if cfg.local_loss == "concept_bce" else cfg.local_dim

    # ------------------------------------------------------------------------- prepare
    def prepare(self, train_dataset: Any) -> None:
        """Build the concept vocabulary and label tables from the training set (and load GloVe).

        ``train_dataset``: ``.captions`` (list[str]), ``.n_images`` (caption k belongs to image
        k // 5), ``.vocab`` (``.idx2word``) and optionally ``.caption_ids(k)`` (the token ids the
        model is trained on, e.g. :class:`~thsrn_lib.data.precomp.PrecompDataset`; without it the
        captions are tokenised and mapped through the vocab here). Concepts come from the ids the
        model sees (out-of-vocab tokens carry none), so ground-truth coverage labels are 1 by
        construction.
        """
        cfg = self.config
        extractor = get_extractor(cfg.concept_extractor, cfg.concept_pos)  # ConfigError if unavailable
        if getattr(train_dataset, "vocab", None) is None:
            raise DataError(
                "HJE.prepare needs the training set's vocab (train_dataset.vocab is None); build it with a vocab"
            )
        words = vocab_words(train_dataset.vocab)
        if len(words) != cfg.vocab_size:
            raise ConfigError(
                f"the training vocab has {len(words)} words but HJE was built with vocab_size={cfg.vocab_size}; "
                "set vocab_size to the vocab's size"
            )
        if cfg.word_init == "glove+learned":
            load_glove(self.txt_enc, cfg.glove_path, words)
        captions = list(train_dataset.captions)
        n_images = int(train_dataset.n_images)
        if len(captions) != CAPTIONS_PER_IMAGE * n_images:
            raise DataError(
                f"HJE.prepare: the training set has {len(captions)} captions for {n_images} images; "
                f"expected {CAPTIONS_PER_IMAGE} captions per image (caption k -> image k // {CAPTIONS_PER_IMAGE})"
            )
        token_ids = _caption_token_ids(train_dataset, captions, words)
        vocab = ConceptVocab.build(
            ([words[i] for i in ids] for ids in token_ids), cfg.concept_min_captions, extractor, cfg.concept_pos
        )
        if len(vocab) == 0:
            raise DataError(
                f"HJE.prepare: no concept occurs in >= {cfg.concept_min_captions} training captions; "
                "lower concept_min_captions or check the captions"
            )
        mapping = vocab.token_map(words, extractor)
        if cfg.num_concepts not in (0, len(vocab)):
            raise ConfigError(
                f"HJE was built for num_concepts={cfg.num_concepts} but this training set gives {len(vocab)} "
                "concepts; use the training set the model was built with, or num_concepts=0 for a new model"
            )
        current = self.vocab_to_concept.cpu()
        if bool((current >= 0).any()) and not torch.equal(current, mapping):
            raise ConfigError(
                "HJE.prepare: this model already holds a different concept map (from an earlier prepare or a "
                "checkpoint); prepare it with the same training set and extractor settings"
            )
        cfg.num_concepts = len(vocab)
        if cfg.uses_local and self.loc_v is None:
            self._build_local_heads()
        # Per-image multi-hot: union over all 5 captions of each image (one scatter, no loop per caption).
        flat = torch.tensor([i for ids in token_ids for i in ids], dtype=torch.long)
        caption_of = torch.repeat_interleave(torch.arange(len(token_ids)), torch.tensor([len(x) for x in token_ids]))
        concept = mapping[flat]
        keep = concept >= 0
        hot = torch.zeros(n_images, len(vocab), dtype=torch.bool)
        hot[caption_of[keep] // CAPTIONS_PER_IMAGE, concept[keep]] = True
        device = self.vocab_to_concept.device
        self.vocab_to_concept.copy_(mapping.to(device))
        self.image_concepts = hot.to(device)
        self.concept_vocab = vocab

    # ------------------------------------------------------------------------ encoding
    def _pool_local(
        self, x: Tensor, feats: Tensor, mask: Tensor | None, att: AttentionPool | None, want_share: bool
    ) -> tuple[Tensor, Tensor | None]:
        kind = self.config.local_pool
        if kind == "max":
            return _max_pool(x, mask, want_share)
        if kind == "mean":
            return _mean_pool(x, mask)
        assert att is not None
        return att(x, feats, mask)

    def _pool_global(
        self, x: Tensor, mask: Tensor | None, gpo: GPO | None, want_share: bool
    ) -> tuple[Tensor, Tensor | None]:
        kind = self.config.global_pool
        if kind == "max":
            return _max_pool(x, mask, want_share)
        if kind == "mean":
            return _mean_pool(x, mask)
        assert gpo is not None
        return gpo(x, mask, want_share)

    def _branches(
        self, feats: Tensor, mask: Tensor | None, local_mask: Tensor | None, side: str, want_share: bool = False
    ) -> dict[str, Tensor]:
        """``feats (N, P, D)`` -> ``l``/``logits`` (local), ``g`` (global), shares if asked."""
        out: dict[str, Tensor] = {}
        if self.config.uses_global:
            lin, gpo = (self.glo_v, self.gpo_v) if side == "img" else (self.glo_t, self.gpo_t)
            assert lin is not None
            pooled, share = self._pool_global(lin(feats), mask, gpo, want_share)
            out["g"] = l2norm(pooled, dim=-1)
            if share is not None:
                out["global_share"] = share
        if self.config.uses_local:
            lin, att = (self.loc_v, self.att_v) if side == "img" else (self.loc_t, self.att_t)
            if lin is None:
                raise ConfigError(
                    "HJE with local_loss='concept_bce' has no concept heads yet: call model.prepare(train_dataset) "
                    "first (or build it with num_concepts set)"
                )
            pooled, share = self._pool_local(lin(feats), feats, local_mask, att, want_share)
            if self.config.local_loss == "concept_bce":
                out["logits"] = pooled
                pooled = torch.sigmoid(pooled)
            out["l"] = l2norm(pooled, dim=-1)
            if share is not None:
                out["local_share"] = share
        return out

    def _image_branches(self, feats: Tensor, want_share: bool = False) -> dict[str, Tensor]:
        return self._branches(self.img_enc(feats), None, None, "img", want_share)

    def content_mask(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``(N, L)`` positions of words with a concept; captions without any fall back to all valid words."""
        content = mask & (self.vocab_to_concept[ids] >= 0)
        return torch.where(content.any(1, keepdim=True), content, mask)

    def _text_branches(
        self, ids: Tensor, lengths: Tensor, want_share: bool = False
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        lengths = lengths.to(device=ids.device, dtype=torch.long)
        mask = lengths_to_mask(lengths, ids.shape[1])
        feats = self.txt_enc(ids, lengths)
        out = self._branches(feats, mask, self.content_mask(ids, mask), "txt", want_share)
        return out, mask, lengths

    def _fixed(self, parts: dict[str, Tensor]) -> Tensor:
        """``[√w l; √(1-w) g]`` (or the single branch's vector)."""
        cfg = self.config
        if cfg.branches == "global":
            return parts["g"]
        if cfg.branches == "local":
            return parts["l"]
        w = cfg.fused_weight
        return torch.cat([math.sqrt(w) * parts["l"], math.sqrt(1.0 - w) * parts["g"]], dim=-1)

    def encode_images(self, feats: Tensor) -> Embeddings:
        return {"emb": self._fixed(self._image_branches(feats))}

    def encode_texts(self, ids: Tensor, lengths: Tensor) -> Embeddings:
        parts, mask, lengths = self._text_branches(ids, lengths)
        return {"emb": self._fixed(parts), "mask": mask, "lengths": lengths}

    def global_image_vectors(self, img_emb: Embeddings) -> Tensor:
        return img_emb["emb"]

    def global_text_vectors(self, txt_emb: Embeddings) -> Tensor:
        return txt_emb["emb"]

    # ------------------------------------------------------------------------- scoring
    def score(self, img_emb: Embeddings, txt_emb: Embeddings) -> Tensor:
        """``(B, N)`` = ``e_v @ e_tᵀ`` (= w cos_loc + (1-w) cos_glo): one matrix product."""
        return img_emb["emb"] @ txt_emb["emb"].T

    def score_parts(self, img_emb: Embeddings, txt_emb: Embeddings) -> tuple[Tensor, dict[str, Tensor]]:
        e_v, e_t = img_emb["emb"], txt_emb["emb"]
        sims = e_v @ e_t.T
        cfg = self.config
        if cfg.branches != "both":
            return sims, {cfg.branches: sims}
        k, w = self.local_out_dim, cfg.fused_weight
        cos_loc = (e_v[:, :k] @ e_t[:, :k].T) / w
        cos_glo = (e_v[:, k:] @ e_t[:, k:].T) / (1.0 - w)
        return sims, {"local": cos_loc, "global": cos_glo}

    # ------------------------------------------------------------------------ training
    def training_loss(self, batch: Any, criterion: Callable[..., Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``L = L_glo + β L_loc`` (+ optional intra-modal and fused-triplet terms); needs :meth:`prepare`."""
        cfg = self.config
        if self.image_concepts is None:
            raise ConfigError(
                "HJE.training_loss needs the concept labels of the training set: call model.prepare(train_dataset) "
                "once before training"
            )
        img = self._image_branches(batch.images)
        txt, mask, _ = self._text_branches(batch.ids, batch.lengths)
        image_index = batch.image_index.to(self.image_concepts.device)
        total = torch.zeros((), dtype=torch.float32, device=image_index.device)
        logs: dict[str, Tensor] = {}
        if cfg.uses_global:
            l_glo = criterion(img["g"] @ txt["g"].T, image_index)
            logs["loss_global"] = l_glo.detach()
            total = total + l_glo
        if cfg.uses_local:
            k = cfg.num_concepts
            h_img = self.image_concepts[image_index]  # (b, K): all 5 captions of each image
            h_txt = ids_to_multi_hot(self.vocab_to_concept[batch.ids], k, mask)  # (b, K)
            positives = image_index.unsqueeze(1) == image_index.unsqueeze(0)  # caption b belongs to image a
            l_loc = self._local_loss(img, txt, h_img, h_txt, positives)
            if cfg.intra_modal_loss:
                same = torch.eye(len(image_index), dtype=torch.bool, device=positives.device)
                y_ii = label_matrix(h_img, h_img, "jaccard", positives)
                y_tt = label_matrix(h_txt, h_txt, "jaccard", same)
                intra = F.mse_loss((img["l"] @ img["l"].T).float(), y_ii) + F.mse_loss(
                    (txt["l"] @ txt["l"].T).float(), y_tt
                )
                logs["loss_intra"] = intra.detach()
                l_loc = l_loc + intra
            logs["loss_local"] = l_loc.detach()
            total = total + cfg.beta * l_loc
        if cfg.fused_triplet:
            fused = self._fixed(img) @ self._fixed(txt).T
            l_fused = criterion(fused, image_index)
            logs["loss_fused"] = l_fused.detach()
            total = total + l_fused
        return total, logs

    def _local_loss(
        self, img: dict[str, Tensor], txt: dict[str, Tensor], h_img: Tensor, h_txt: Tensor, positives: Tensor
    ) -> Tensor:
        cfg = self.config
        if cfg.local_loss == "concept_bce":
            return F.binary_cross_entropy_with_logits(
                img["logits"].float(), h_img.float()
            ) + F.binary_cross_entropy_with_logits(txt["logits"].float(), h_txt.float())
        y = label_matrix(h_img, h_txt, cfg.label_mode, positives)  # (b, b)
        sims = (img["l"] @ txt["l"].T).float()
        if cfg.local_loss == "mse":
            return F.mse_loss(sims, y)
        # soft_ce: Y normalised per row (image -> captions) and per column (caption -> images).
        logits = sims / cfg.soft_ce_tau
        loss_rows = -(_targets(y, positives, 1) * logits.log_softmax(1)).sum(1).mean()
        loss_cols = -(_targets(y, positives, 0) * logits.log_softmax(0)).sum(0).mean()
        return loss_rows + loss_cols

    # ------------------------------------------------------------------------- explain
    @torch.no_grad()
    def explain(self, feats: Tensor, ids: Tensor, lengths: Tensor) -> Explanation:
        img = self._image_branches(feats, want_share=True)
        txt, mask, _ = self._text_branches(ids, lengths, want_share=True)
        sims, parts = self.score_parts({"emb": self._fixed(img)}, {"emb": self._fixed(txt)})
        out = Explanation(sims=sims, mask=mask, stream_scores=dict(parts))
        out.extras["content_mask"] = self.content_mask(ids, mask)
        for key in ("local", "global"):
            if f"{key}_share" in img:
                out.extras[f"{key}_region_share"] = img[f"{key}_share"]
                out.extras[f"{key}_word_share"] = txt[f"{key}_share"]
        return out


def _caption_token_ids(dataset: Any, captions: list[str], words: list[str]) -> list[list[int]]:
    """Token ids of every caption: the dataset's own (cached) ids if it has them, else tokenised here."""
    get_ids = getattr(dataset, "caption_ids", None)
    if callable(get_ids):
        return [list(get_ids(k)) for k in range(len(captions))]
    from ..data.tokenizer import tokenize

    word2idx: dict[str, int] = {}
    for i, w in enumerate(words):
        word2idx.setdefault(w, i)
    return [[word2idx[t] for t in tokenize(c) if t in word2idx] for c in captions]


def _targets(y: Tensor, positives: Tensor, dim: int) -> Tensor:
    """``y`` normalised to sum 1 along ``dim``; all-zero slices use the ground-truth positives instead."""
    empty = y.sum(dim, keepdim=True) == 0
    y = torch.where(empty, positives.to(y.dtype), y)
    return y / y.sum(dim, keepdim=True).clamp_min(1e-12)
