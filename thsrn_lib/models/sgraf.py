"""SGRAF: Similarity Graph Reasoning (SGR) and Attention Filtration (SAF), exactly as the official code.

Paper: Diao, Zhang, Ma, Lu, "Similarity Reasoning and Filtration for Image-Text Matching",
AAAI 2021, https://arxiv.org/abs/2101.01368. Official code (behaviour reference only):
https://github.com/Paranioar/SGRAF. "SGRAF" itself is the score average of an SGR and an SAF model
(``thsrn_lib.models.create("sgraf")``, see :mod:`thsrn_lib.models.ensemble`).

The scoring is vectorised over a block of B images x N captions with word masks; the official
per-caption loop is kept as :func:`reference_scores` and tests prove the two equal in eval mode.
Submodule and parameter names equal the official state dicts (``img_enc``, ``txt_enc``,
``sim_enc``), so official checkpoints load with an identity key map
(:func:`from_official_checkpoint`).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, DataError
from .base import Embeddings, Explanation, MatchingModel, ModelConfig, select
from .encoders import ImageEncoder, TextEncoder
from .layers import init_like_sgraf, l1norm, l2norm, lengths_to_mask, masked_mean
from .registry import register_model
from .selfattn import TextSA, VisualSA
from .similarity import (
    BN_STATS,
    GatedPooling,
    PackedWords,
    SGRStep,
    attended_context,
    fast_path_allowed,
    fast_tile,
    global_similarity,
    length_groups,
    packed_cross_logits,
    packed_t2i_attention,
    packed_t2i_similarity,
    similarity_vectors,
    t2i_attention,
)

__all__ = [
    "SGRAFConfig",
    "SAFConfig",
    "SimilarityEncoder",
    "SGRAF",
    "SGRModel",
    "SAFModel",
    "reference_scores",
    "reference_similarity",
    "OfficialCheckpoint",
    "load_official_checkpoint",
    "from_official_checkpoint",
    "convert_official_checkpoint",
    "load_converted",
    "CONVERTED_FORMAT",
]

MODULE_NAMES = ("SGR", "SAF")
CONVERTED_FORMAT = "thsrn-model"


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class SGRAFConfig(ModelConfig):
    """SGRAF options (defaults = the official ones, spec ``sgraf.md`` §1).

    Attributes:
        sim_dim: S, size of the similarity vectors (256).
        module_name: ``"SGR"`` (graph reasoning) or ``"SAF"`` (attention filtration).
        sgr_step: number of independent SGR layers (3; unused by SAF).
        smooth: attention inverse temperature lambda (9.0, hard-coded in the official code).
        saf_bn_stats: train-mode statistics of SAF's BatchNorm: ``"per_caption"`` (official: one
            BatchNorm call per caption) or ``"pooled"`` (one call over the whole block; a
            library option, not official).
    """

    sim_dim: int = 256
    module_name: str = "SGR"
    sgr_step: int = 3
    smooth: float = 9.0
    saf_bn_stats: str = "per_caption"

    def validate(self) -> None:
        if self.module_name not in MODULE_NAMES:
            raise ConfigError(f"module_name must be one of {MODULE_NAMES}, got {self.module_name!r}")
        if self.saf_bn_stats not in BN_STATS:
            raise ConfigError(f"saf_bn_stats must be one of {BN_STATS}, got {self.saf_bn_stats!r}")
        positive = {
            "vocab_size": self.vocab_size,
            "img_dim": self.img_dim,
            "word_dim": self.word_dim,
            "embed_size": self.embed_size,
            "num_regions": self.num_regions,
            "num_layers": self.num_layers,
            "sim_dim": self.sim_dim,
            "sgr_step": self.sgr_step,
        }
        bad = {k: v for k, v in positive.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad:
            raise ConfigError(f"these SGRAF options must be positive integers: {bad}")
        if not self.smooth > 0:
            raise ConfigError(f"smooth (attention lambda) must be > 0, got {self.smooth}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class SAFConfig(SGRAFConfig):
    """:class:`SGRAFConfig` whose default module is SAF (the config of the registered ``"saf"``)."""

    module_name: str = "SAF"


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------
class SimilarityEncoder(nn.Module):
    """SGRAF's ``sim_enc``: global self-attention, similarity heads and the SGR or SAF module.

    Holds the parameters under their official names; the block computation lives in
    :meth:`SGRAF.score_parts`.
    """

    def __init__(self, cfg: SGRAFConfig) -> None:
        super().__init__()
        d, s = cfg.embed_size, cfg.sim_dim
        self.module_name = cfg.module_name
        self.v_global_w = VisualSA(d, cfg.num_regions, cfg.dropout)
        self.t_global_w = TextSA(d, cfg.dropout)
        self.sim_tranloc_w = nn.Linear(d, s)
        self.sim_tranglo_w = nn.Linear(d, s)
        self.sim_eval_w = nn.Linear(s, 1)
        if cfg.module_name == "SGR":
            self.SGR_module = nn.ModuleList(SGRStep(s) for _ in range(cfg.sgr_step))
        else:
            self.SAF_module = GatedPooling(s, bn_stats=cfg.saf_bn_stats)
        init_like_sgraf(self)


class SGRAF(MatchingModel):
    """SGR / SAF image-text matching model (Diao et al., AAAI 2021, https://arxiv.org/abs/2101.01368).

    Implemented exactly as the official code (``sgraf.md``); there are no [ASSUMED] choices.
    Library switches, all defaulting to the official behaviour: ``smooth`` (lambda, official 9),
    ``num_regions`` (official 36; other values cannot load official weights) and
    ``saf_bn_stats`` (official ``"per_caption"``).

    Embeddings: images ``{"regions": (B, R, D), "global": (B, D)}``; the global vector is the
    visual self-attention over the images of the :meth:`encode_images` call (its BatchNorms use
    that call's statistics in train mode, so a training call needs B >= 2). Texts
    ``{"words": (N, L, D), "global": (N, D), "mask": (N, L), "lengths": (N,)}``.

    Train-mode notes: dropout 0.4 is active in the word embeddings and both self-attentions;
    SAF's BatchNorm uses per-caption statistics (as the official per-caption loop), so training
    scores depend on the batch. Evaluation must run in eval mode, where every score depends only
    on its own pair.
    """

    config_class = SGRAFConfig
    module_name = ""  # set by the registered subclasses

    def __init__(self, config: SGRAFConfig) -> None:
        if not isinstance(config, SGRAFConfig):
            raise ConfigError(f"{type(self).__name__} needs an SGRAFConfig, got {type(config).__name__}")
        config.validate()
        if self.module_name and config.module_name != self.module_name:
            raise ConfigError(
                f"model {self.name!r} needs module_name={self.module_name!r}, got {config.module_name!r}; "
                f"create the {'sgr' if config.module_name == 'SGR' else 'saf'!r} model instead"
            )
        super().__init__(config)
        self.img_enc = ImageEncoder(config.img_dim, config.embed_size, config.no_imgnorm)
        self.txt_enc = TextEncoder(
            config.vocab_size,
            config.word_dim,
            config.embed_size,
            config.num_layers,
            config.bi_gru,
            config.no_txtnorm,
            config.dropout,
        )
        self.sim_enc = SimilarityEncoder(config)

    # --- encoding ---------------------------------------------------------------------------
    def encode_images(self, feats: Tensor) -> Embeddings:
        """``feats (B, R, F)`` -> ``{"regions": (B, R, D), "global": (B, D)}``."""
        cfg = self.config
        if feats.dim() != 3 or feats.shape[1] != cfg.num_regions or feats.shape[2] != cfg.img_dim:
            raise DataError(
                f"image features must be (B, {cfg.num_regions}, {cfg.img_dim}) for this model (the visual "
                f"self-attention has a BatchNorm over exactly {cfg.num_regions} region slots), got "
                f"{tuple(feats.shape)}; use features with that many regions or build the model with "
                f"num_regions={feats.shape[1] if feats.dim() == 3 else '?'}"
            )
        if self.training and feats.shape[0] < 2:
            raise DataError(
                "SGRAF in train mode needs at least 2 images per call: the visual self-attention's "
                "BatchNorm1d over features normalises across the images of the call. Drop a final "
                "training batch of size 1, or call model.eval() for inference"
            )
        regions = self.img_enc(feats)
        return {"regions": regions, "global": self.sim_enc.v_global_w(regions, regions.mean(dim=1))}

    def encode_texts(self, ids: Tensor, lengths: Tensor) -> Embeddings:
        """``ids (N, L)``, ``lengths (N,)`` -> ``{"words", "global", "mask", "lengths"}`` (see class doc)."""
        if ids.dim() != 2:
            raise DataError(f"caption ids must be (N, L), got shape {tuple(ids.shape)}")
        lengths = torch.as_tensor(lengths).to(device=ids.device, dtype=torch.long)
        if lengths.shape != ids.shape[:1]:
            raise DataError(f"lengths must be (N,) = ({ids.shape[0]},), got {tuple(lengths.shape)}")
        lens_cpu = lengths.detach().cpu()
        if len(lens_cpu) and (int(lens_cpu.min()) < 1 or int(lens_cpu.max()) > ids.shape[1]):
            raise DataError(
                f"caption lengths must lie in [1, L={ids.shape[1]}] (they count <start> and <end>), got "
                f"min {int(lens_cpu.min())}, max {int(lens_cpu.max())}"
            )
        mask = lengths_to_mask(lengths, ids.shape[1])
        # Padded rows are zero in float32; the masked_fill also guards reduced-precision runs
        # where 0 / (0 + 1e-8) can become NaN, so nothing non-finite reaches the masked products.
        words = self.txt_enc(ids, lengths).masked_fill(~mask.unsqueeze(-1), 0.0)
        glob = self.sim_enc.t_global_w(words, masked_mean(words, mask, dim=1), mask)
        return {"words": words, "global": glob, "mask": mask, "lengths": lengths}

    # --- scoring ----------------------------------------------------------------------------
    def score_parts(self, img_emb: Embeddings, txt_emb: Embeddings) -> tuple[Tensor, dict[str, Tensor]]:
        """Similarity matrix ``(B, N)`` of the block; SGRAF has no partial scores (empty dict).

        Inference (eval mode, no autograd) takes :meth:`_fast_scores`: packed words (no padding in
        any D-sized tensor), cache-sized tiles, fused in-place element-wise passes. Otherwise the
        plain vectorised :meth:`_block` runs, with captions in up to :attr:`max_length_buckets`
        groups of similar length, each trimmed to its own longest caption (exact because every
        score depends only on its pair; skipped for SAF in train mode, whose per-caption BatchNorm
        updates its running statistics in caption order).
        """
        lens = txt_emb["lengths"].detach().cpu()  # one host sync per block
        b, n = img_emb["regions"].shape[0], lens.shape[0]
        if n == 0 or b == 0:
            return img_emb["regions"].new_zeros(b, n), {}
        if self._use_fast_path(img_emb, txt_emb):
            return self._fast_scores(img_emb, txt_emb, lens), {}
        order, chunks = self._length_groups(lens)
        if len(chunks) == 1:
            return self._block(img_emb, txt_emb, used_len=int(lens.max()), keep_maps=False)["sims"], {}
        device = txt_emb["lengths"].device
        cols = [
            self._block(img_emb, select(txt_emb, idx.to(device)), used_len=int(lens[idx].max()), keep_maps=False)[
                "sims"
            ]
            for idx in chunks
        ]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n)
        return torch.cat(cols, dim=1)[:, inverse.to(device)], {}

    #: Upper bound on the caption-length groups of the plain path (1 disables grouping).
    max_length_buckets: int = 4
    _MIN_BUCKET = 8
    #: Fast-path tile: images x captions scored together (chosen with ``benchmarks/scoring.py --tile``;
    #: see :meth:`preferred_block`). The captions of a block are length-sorted before tiling.
    #: None: :func:`~thsrn_lib.models.similarity.fast_tile` of 4 x 32 for the embedding size
    #: (at the papers' sizes 4 x 32 was 4-18 % faster than 8 x 32 in three of six sweeps and
    #: within 3 % either way in the others, ``benchmarks/README.md``).
    tile_images: int | None = None
    tile_captions: int | None = None
    #: Set False to force the plain vectorised path (tests compare the two).
    use_fast_path: bool = True

    def preferred_block(self) -> tuple[int, int]:
        """``(images, captions)`` per :meth:`score` call that the fast path scores best.

        Any block is exact and is tiled internally; larger blocks only amortise the per-call
        length sort. Memory per call is bounded by the tile, not the block.
        """
        return 128, 1024

    def _use_fast_path(self, img_emb: Embeddings, txt_emb: Embeddings) -> bool:
        return fast_path_allowed(self, img_emb, txt_emb)

    def _length_groups(self, lens: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Caption order sorted by length and its split into groups (one group when that is as cheap)."""
        identity = torch.arange(lens.shape[0])
        groups = None if (self.training and self.config.module_name == "SAF") else (
            length_groups(lens, self.max_length_buckets, self._MIN_BUCKET)
        )
        return groups if groups is not None else (identity, [identity])

    def _fast_scores(self, img_emb: Embeddings, txt_emb: Embeddings, lens: Tensor) -> Tensor:
        """Inference scores ``(B, N)``, tile by tile (see :mod:`.similarity`, packed fast path).

        Captions are length-sorted and cut into tiles of :attr:`tile_captions`; images into tiles of
        :attr:`tile_images`. Per tile: one GEMM for all region-word logits, segment-normalised
        attention, one bmm for the contexts, a fused normalise-subtract-square pass, one GEMM for
        the local projection, then the graph over ``[global; words]`` padded to the tile's longest
        caption only.
        """
        sim, cfg = self.sim_enc, self.config
        regions, img_glob = img_emb["regions"], img_emb["global"]
        words, txt_glob, mask = txt_emb["words"], txt_emb["global"], txt_emb["mask"]
        b, n = regions.shape[0], words.shape[0]
        device = regions.device
        out = regions.new_empty(b, n)
        order = torch.argsort(lens, stable=True)
        tile_i, tile_c = fast_tile((4, 32), regions.shape[-1], (self.tile_images, self.tile_captions))
        for c_idx_cpu in order.split(tile_c):
            c_idx = c_idx_cpu.to(device)
            used = int(lens[c_idx_cpu].max())
            t_mask = mask.index_select(0, c_idx)[:, :used]
            packed = PackedWords.from_padded(words.index_select(0, c_idx)[:, :used], t_mask)
            t_glob = txt_glob.index_select(0, c_idx)
            node_mask = F.pad(t_mask, (1, 0), value=True)  # (n, 1 + L): node 0 = global
            for i0 in range(0, b, tile_i):
                reg = regions[i0 : i0 + tile_i]
                attn = packed_t2i_attention(packed_cross_logits(reg, packed), packed, cfg.smooth)
                local = packed_t2i_similarity(attn, reg, packed, sim.sim_tranloc_w)  # (b, T, S)
                nodes = packed.unpack(local, lead=1)  # (b, n, 1 + L, S)
                nodes[:, :, 0] = global_similarity(img_glob[i0 : i0 + tile_i], t_glob, sim.sim_tranglo_w)
                if cfg.module_name == "SGR":
                    steps = list(sim.SGR_module)
                    for k, step in enumerate(steps):
                        nodes, _ = step(nodes, node_mask, num_queries=1 if k == len(steps) - 1 else None)
                    z = nodes[:, :, 0]
                else:
                    z, _ = sim.SAF_module(nodes, node_mask)
                out[i0 : i0 + tile_i, c_idx] = torch.sigmoid(sim.sim_eval_w(z)).squeeze(-1)
        return out

    def _block(self, img_emb: Embeddings, txt_emb: Embeddings, used_len: int | None, keep_maps: bool) -> dict[str, Any]:
        """Vectorised §3.11 computation for all B x N pairs; optionally keeps the maps for explain.

        ``used_len``: trim the word axis to this length (the block's longest caption); trailing
        all-pad columns never change a score and the cost is linear in L. None keeps L.
        """
        sim, cfg = self.sim_enc, self.config
        regions, img_glob = img_emb["regions"], img_emb["global"]  # (B, R, D), (B, D)
        words, txt_glob, mask = txt_emb["words"], txt_emb["global"], txt_emb["mask"]  # (N, L, D), (N, D), (N, L)
        if used_len is not None:
            words, mask = words[:, :used_len], mask[:, :used_len]
        b, n = regions.shape[0], words.shape[0]
        attn = t2i_attention(regions, words, mask, cfg.smooth)  # (B, N, L, R)
        ctx = attended_context(attn, regions, "t2i")  # (B, N, L, D)
        loc = similarity_vectors(ctx, words, sim.sim_tranloc_w, "t2i")  # (B, N, L, S)
        del ctx
        glo = global_similarity(img_glob, txt_glob, sim.sim_tranglo_w)  # (B, N, S)
        nodes = torch.cat([glo.unsqueeze(2), loc], dim=2)  # (B, N, L+1, S); node 0 = global
        del loc
        node_mask = torch.cat([mask.new_ones(n, 1), mask], dim=1)  # (N, L+1)
        out: dict[str, Any] = {}
        if cfg.module_name == "SGR":
            edges = []
            steps = list(sim.SGR_module)
            for k, step in enumerate(steps):
                # Only node 0 is read out after the last step: skip the other query rows there.
                last_readout = k == len(steps) - 1 and not keep_maps
                nodes, e = step(nodes, node_mask, num_queries=1 if last_readout else None)
                edges.append(e)
            z = nodes[..., 0, :]  # (B, N, S)
            if keep_maps:
                out["edges"] = edges
        else:
            z, beta = sim.SAF_module(nodes, node_mask)
            if keep_maps:
                out["beta"] = beta  # (B, N, L+1)
        out["sims"] = torch.sigmoid(sim.sim_eval_w(z)).squeeze(-1).view(b, n)
        if keep_maps:
            out["attention"] = attn
        return out

    # --- interpretability -------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, feats: Tensor, ids: Tensor, lengths: Tensor) -> Explanation:
        """Maps of the block (use eval mode). Keys:

        * ``attention["t2i"]`` ``(B, N, L, R)``: each word's weights over regions.
        * SGR: ``edges["t2i"]``: ``sgr_step`` tensors ``(B, N, L+1, L+1)``, node 0 = global node,
          node ``1 + l`` = word ``l``.
        * SAF: ``gates["t2i"]``: ``[beta (B, N, L)]`` over the word nodes; ``extras["beta_with_global"]``
          ``(B, N, L+1)`` includes the global node at index 0 (together they sum to 1).
        """
        img = self.encode_images(feats)
        txt = self.encode_texts(ids, lengths)
        maps = self._block(img, txt, used_len=None, keep_maps=True)
        out = Explanation(sims=maps["sims"], mask=txt["mask"])
        out.attention["t2i"] = maps["attention"]
        out.stream_scores["t2i"] = maps["sims"]
        out.node_layout["t2i"] = ["global", "local"]
        if "edges" in maps:
            out.edges["t2i"] = maps["edges"]
        if "beta" in maps:
            out.gates["t2i"] = [maps["beta"][..., 1:]]
            out.extras["beta_with_global"] = maps["beta"]
        return out

    # --- first stage --------------------------------------------------------------------------
    def global_image_vectors(self, img_emb: Embeddings) -> Tensor:
        """``(B, D)`` self-attention global image vectors (unit norm)."""
        return img_emb["global"]

    def global_text_vectors(self, txt_emb: Embeddings) -> Tensor:
        """``(N, D)`` self-attention global caption vectors (unit norm)."""
        return txt_emb["global"]


@register_model("sgr")
class SGRModel(SGRAF):
    """SGRAF with similarity graph reasoning (``module_name="SGR"``); see :class:`SGRAF`."""

    name = "sgr"
    module_name = "SGR"
    config_class = SGRAFConfig


@register_model("saf")
class SAFModel(SGRAF):
    """SGRAF with similarity attention filtration (``module_name="SAF"``); see :class:`SGRAF`."""

    name = "saf"
    module_name = "SAF"
    config_class = SAFConfig


_CLASSES: dict[str, type[SGRAF]] = {"SGR": SGRModel, "SAF": SAFModel}


# ------------------------------------------------------------------------------------------------
# readable reference (official per-caption loop, §3.10)
# ------------------------------------------------------------------------------------------------
def reference_scores(model: SGRAF, feats: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
    """The official computation order, one caption at a time, on valid words only (no masks).

    Slow and readable: the ground truth for the vectorised :meth:`SGRAF.score_parts` in tests
    (eval mode), and for SAF's BatchNorm in train mode (its ``bn`` is called once per caption,
    exactly as in the official loop). Returns ``(B, N)``.
    """
    return reference_similarity(model, model.img_enc(feats), model.txt_enc(ids, lengths), lengths)


def reference_similarity(model: SGRAF, regions: Tensor, words_all: Tensor, lengths: Tensor) -> Tensor:
    """The similarity part of :func:`reference_scores`, from encoded regions ``(B, R, D)`` and words ``(N, L, D)``.

    This is how the official evaluation scores a shard (encoders run once, then the similarity
    encoder loops over captions); the benchmarks time it as the "lean per-caption" baseline
    (``benchmarks/baselines.py`` has the official-style one).
    """
    sim, cfg = model.sim_enc, model.config
    b = regions.shape[0]
    img_glob = sim.v_global_w(regions, regions.mean(dim=1))  # once, over the B images
    columns = []
    for j in range(words_all.shape[0]):
        n = int(lengths[j])
        words = words_all[j : j + 1, :n]  # (1, n, D)
        txt_glob = sim.t_global_w(words, words.mean(dim=1), torch.ones(1, n, dtype=torch.bool, device=words_all.device))
        query = words.expand(b, n, words.shape[-1])  # the official code repeats the caption B times
        # SCAN t2i attention: leaky dot products, l2n over the words per region, softmax over regions.
        c = F.leaky_relu(torch.bmm(regions, query.transpose(1, 2)), 0.1)  # (B, R, n)
        c = l2norm(c, dim=2)
        a = torch.softmax(c.transpose(1, 2) * cfg.smooth, dim=2)  # (B, n, R)
        ctx = l2norm(torch.bmm(a, regions), dim=-1)  # (B, n, D)
        loc = l2norm(sim.sim_tranloc_w((ctx - query) ** 2), dim=-1)  # (B, n, S)
        glo = l2norm(sim.sim_tranglo_w((img_glob - txt_glob) ** 2), dim=-1)  # (B, S)
        x = torch.cat([glo.unsqueeze(1), loc], dim=1)  # (B, n+1, S)
        if cfg.module_name == "SGR":
            for step in sim.SGR_module:
                edges = torch.softmax(torch.bmm(step.graph_query_w(x), step.graph_key_w(x).transpose(1, 2)), dim=-1)
                x = torch.relu(step.sim_graph_w(torch.bmm(edges, x)))
            z = x[:, 0]
        else:
            saf = sim.SAF_module
            e = saf.bn(saf.attn_sim_w(x).transpose(1, 2))  # (B, 1, n+1): one BatchNorm call per caption
            beta = l1norm(torch.sigmoid(e), dim=-1)
            z = l2norm(torch.bmm(beta, x).squeeze(1), dim=-1)
        columns.append(torch.sigmoid(sim.sim_eval_w(z)))  # (B, 1)
    return torch.cat(columns, dim=1)


# ------------------------------------------------------------------------------------------------
# official checkpoints (§10)
# ------------------------------------------------------------------------------------------------
_PARTS = ("img_enc", "txt_enc", "sim_enc")


@dataclass
class OfficialCheckpoint:
    """An official SGRAF checkpoint after strict loading.

    Attributes:
        model: the model in eval mode; config: its inferred config; opt: the pickled options as
        a dict; epoch / best_rsum / eiters: training bookkeeping (None if absent); vocab: the
        checked vocabulary (None if none was given or found) and vocab_path its file.
    """

    model: SGRAF
    config: SGRAFConfig
    opt: dict[str, Any]
    epoch: int | None
    best_rsum: float | None
    eiters: int | None
    vocab: Any = None
    vocab_path: Path | None = None


def _torch_load_trusted_layout(path: Path, map_location: Any) -> Any:
    """``torch.load`` that only unpickles tensors, plain data and ``argparse.Namespace``."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Weights only load failed" in msg or "GLOBAL" in msg:
            found = re.search(r"GLOBAL ([\w.]+)", msg)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint {path} pickles an object that is not a tensor, plain data or argparse.Namespace"
                f"{what}; it was refused without running it. Official SGRAF checkpoints contain only those; "
                f"if this file is yours, re-save it with tensors and plain data only"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({msg.splitlines()[0] if msg else 'unpickling failed'}); "
            f"download or copy it again"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt files fail in many ways inside torch.load
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} could not be read: it is truncated, corrupt or not a PyTorch file ({detail}); "
            f"download or copy it again"
        ) from None


def _container(path: Path, obj: Any) -> tuple[list[Mapping[str, Tensor]], dict[str, Any]]:
    fix = "an official SGRAF checkpoint is a dict with 'model' = [img_enc, txt_enc, sim_enc] state dicts and 'opt'"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict; {fix}")
    missing = [k for k in ("model", "opt") if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the key(s) {missing} (has {sorted(map(str, obj))}); {fix}")
    sds = obj["model"]
    if not isinstance(sds, (list, tuple)) or len(sds) != 3:
        got = f"a {len(sds)}-element {type(sds).__name__}" if isinstance(sds, (list, tuple)) else type(sds).__name__
        raise CheckpointError(f"checkpoint {path}: 'model' must be a list of 3 state dicts, got {got}; {fix}")
    for part, sd in zip(_PARTS, sds):
        if not isinstance(sd, Mapping):
            raise CheckpointError(
                f"checkpoint {path}: the {part} entry of 'model' is a {type(sd).__name__}, not a state dict; {fix}"
            )
        bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
        if bad:
            raise CheckpointError(f"checkpoint {path}: {part} has non-tensor entries {bad[:3]}; {fix}")
    opt = obj["opt"]
    if isinstance(opt, argparse.Namespace):
        opt = vars(opt)
    if not isinstance(opt, Mapping):
        raise CheckpointError(f"checkpoint {path}: 'opt' is a {type(opt).__name__}, expected argparse.Namespace; {fix}")
    return list(sds), dict(opt)


def _need(path: Path, sd: Mapping[str, Tensor], part: str, key: str, ndim: int) -> Tensor:
    if key not in sd:
        raise CheckpointError(
            f"checkpoint {path}: {part} lacks {key!r}, needed to infer the model size; "
            f"the file is not an SGRAF checkpoint"
        )
    t = sd[key]
    if t.dim() != ndim:
        raise CheckpointError(f"checkpoint {path}: {part}.{key} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def _infer_config(path: Path, sds: list[Mapping[str, Tensor]], opt: Mapping[str, Any]) -> SGRAFConfig:
    img, txt, sim = sds
    embed_size, img_dim = _need(path, img, "img_enc", "fc.weight", 2).shape
    vocab_size, word_dim = _need(path, txt, "txt_enc", "embed.weight", 2).shape
    bi_gru = any(k.endswith("_reverse") for k in txt)
    layer_ids = [int(m.group(1)) for k in txt if (m := re.fullmatch(r"cap_rnn\.weight_ih_l(\d+)(_reverse)?", k))]
    if not layer_ids:
        raise CheckpointError(
            f"checkpoint {path}: txt_enc has no 'cap_rnn.weight_ih_l0'; the file is not an SGRAF checkpoint"
        )
    sim_dim = _need(path, sim, "sim_enc", "sim_tranloc_w.weight", 2).shape[0]
    num_regions = _need(path, sim, "sim_enc", "v_global_w.embedding_local.1.weight", 1).shape[0]
    has_sgr = any(k.startswith("SGR_module.") for k in sim)
    has_saf = any(k.startswith("SAF_module.") for k in sim)
    if has_sgr == has_saf:
        raise CheckpointError(
            f"checkpoint {path}: sim_enc must hold exactly one of SGR_module.* and SAF_module.* keys "
            f"(found {'both' if has_sgr else 'neither'})"
        )
    module_name = "SGR" if has_sgr else "SAF"
    values: dict[str, Any] = {
        "vocab_size": int(vocab_size),
        "img_dim": int(img_dim),
        "word_dim": int(word_dim),
        "embed_size": int(embed_size),
        "num_regions": int(num_regions),
        "num_layers": max(layer_ids) + 1,
        "bi_gru": bi_gru,
        "sim_dim": int(sim_dim),
        "module_name": module_name,
    }
    if has_sgr:
        values["sgr_step"] = 1 + max(int(m.group(1)) for k in sim if (m := re.match(r"SGR_module\.(\d+)\.", k)))
    # Cross-check every option the tensors determine against the pickled options.
    checked = ["vocab_size", "img_dim", "word_dim", "embed_size", "num_layers", "bi_gru", "sim_dim", "module_name"]
    if has_sgr:
        checked.append("sgr_step")
    for key in checked:
        if key in opt and opt[key] != values[key]:
            raise CheckpointError(
                f"checkpoint {path}: opt.{key} = {opt[key]!r} but the tensors give {key} = {values[key]!r}; "
                f"the file is inconsistent (re-export it from the training run that produced the weights)"
            )
    for key in ("no_imgnorm", "no_txtnorm"):  # not visible in the tensors: taken from opt
        if key in opt:
            if not isinstance(opt[key], bool):
                raise CheckpointError(f"checkpoint {path}: opt.{key} must be a bool, got {opt[key]!r}")
            values[key] = opt[key]
    try:
        cfg = (SGRAFConfig if module_name == "SGR" else SAFConfig)(**values)
        cfg.validate()
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: inferred an invalid configuration: {exc}") from None
    return cfg


def _load_strict(path: Path, model: SGRAF, sds: list[Mapping[str, Tensor]]) -> None:
    """Identity key map, strict: every source key consumed, every shape exact, ``num_batches_tracked`` optional."""
    for part, sd in zip(_PARTS, sds):
        target = getattr(model, part).state_dict()
        unexpected = sorted(k for k in sd if k not in target)
        if unexpected:
            raise CheckpointError(
                f"checkpoint {path}: {part} has key(s) this SGRAF model does not have: {unexpected[:5]}; "
                f"the file does not match the official layout"
            )
        missing = sorted(k for k in target if k not in sd and not k.endswith("num_batches_tracked"))
        if missing:
            raise CheckpointError(f"checkpoint {path}: {part} lacks key(s) {missing[:5]}; the file is incomplete")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(target[k].shape):
                raise CheckpointError(
                    f"checkpoint {path}: {part}.{k} has shape {tuple(v.shape)}, expected {tuple(target[k].shape)} "
                    f"for the configuration inferred from the other tensors"
                )
            if v.is_floating_point() != target[k].is_floating_point():
                raise CheckpointError(f"checkpoint {path}: {part}.{k} has dtype {v.dtype}, expected {target[k].dtype}")
        full = dict(target)
        full.update(sd)
        getattr(model, part).load_state_dict(full, strict=True)


def _opt_number(container: Mapping[str, Any], key: str, kind: type) -> Any:
    v = container.get(key)
    return kind(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def load_official_checkpoint(
    path: str | os.PathLike, vocab_path: str | os.PathLike | None = None, map_location: Any = "cpu"
) -> OfficialCheckpoint:
    """Load an official SGRAF ``.pth.tar`` strictly (spec ``sgraf.md`` §10).

    Only tensors, plain data and ``argparse.Namespace`` are unpickled (``weights_only=True``);
    anything else is refused with :class:`CheckpointError` before it can run. The configuration is
    inferred from the tensor shapes and cross-checked against ``opt``. The vocabulary
    (``vocab_path``, else ``<opt.data_name>_vocab.json`` next to the checkpoint if present) must
    have exactly V entries.
    """
    path = Path(path)
    obj = _torch_load_trusted_layout(path, map_location)
    sds, opt = _container(path, obj)
    cfg = _infer_config(path, sds, opt)
    model = _CLASSES[cfg.module_name](cfg)
    _load_strict(path, model, sds)
    model.eval()
    vocab, found = None, None
    if vocab_path is not None:
        found = Path(vocab_path)
    elif isinstance(opt.get("data_name"), str):
        candidate = path.parent / f"{opt['data_name']}_vocab.json"
        found = candidate if candidate.is_file() else None
    if found is not None:
        from ..data.vocab import Vocab  # local import: keeps the model zoo independent of data I/O

        vocab = Vocab.load(found)
        if len(vocab) != cfg.vocab_size:
            raise CheckpointError(
                f"vocab {found} has {len(vocab)} words but checkpoint {path} was trained with V = {cfg.vocab_size}; "
                f"use the vocab file of the same data set (e.g. {opt.get('data_name', '<data_name>')}_vocab.json)"
            )
    return OfficialCheckpoint(
        model=model,
        config=cfg,
        opt=opt,
        epoch=_opt_number(obj, "epoch", int),
        best_rsum=_opt_number(obj, "best_rsum", float),
        eiters=_opt_number(obj, "Eiters", int),
        vocab=vocab,
        vocab_path=found,
    )


def from_official_checkpoint(
    path: str | os.PathLike, vocab_path: str | os.PathLike | None = None, map_location: Any = "cpu"
) -> SGRAF:
    """An :class:`SGRModel` / :class:`SAFModel` in eval mode from an official checkpoint.

    See :func:`load_official_checkpoint` for the checks; use it directly for the options and vocab.
    """
    return load_official_checkpoint(path, vocab_path, map_location).model


def convert_official_checkpoint(
    path: str | os.PathLike,
    out_path: str | os.PathLike,
    vocab_path: str | os.PathLike | None = None,
    verify: bool = True,
) -> Path:
    """Convert an official checkpoint to the library's weights-only format (written atomically).

    The output is a ``torch.save`` of plain data: ``{"format": "thsrn-model", "model_name",
    "config", "state_dict", "vocab" (or None), "source"}``, loadable with ``weights_only=True``
    (see :func:`load_converted`). With ``verify`` the reference loop and the vectorised path are
    compared on fixed random inputs in eval mode (spec §10.4 step 7).
    """
    ckpt = load_official_checkpoint(path, vocab_path)
    model = ckpt.model
    if verify:
        _verify_paths(Path(path), model)
    payload = {
        "format": CONVERTED_FORMAT,
        "model_name": model.name,
        "config": ckpt.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": ckpt.vocab.to_dict() if ckpt.vocab is not None else None,
        "source": {
            "file": str(Path(path).name),
            "epoch": ckpt.epoch,
            "best_rsum": ckpt.best_rsum,
            "eiters": ckpt.eiters,
            "data_name": ckpt.opt.get("data_name") if isinstance(ckpt.opt.get("data_name"), str) else None,
        },
    }
    from ..utils.io import atomic_write

    out_path = Path(out_path)
    with atomic_write(out_path, "wb") as fh:
        torch.save(payload, fh)
    return out_path


@torch.no_grad()
def _verify_paths(path: Path, model: SGRAF, atol: float = 1e-5) -> None:
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(3, cfg.num_regions, cfg.img_dim, generator=gen)
    lengths = torch.tensor([4, 7, 5, 2])
    ids = (
        torch.randint(4, cfg.vocab_size, (4, 7), generator=gen)
        if cfg.vocab_size > 4
        else torch.zeros(4, 7, dtype=torch.long)
    )
    ids = ids.masked_fill(~lengths_to_mask(lengths, 7), 0)
    device = model.device
    feats, ids, lengths = feats.to(device), ids.to(device), lengths.to(device)
    fast = model(feats, ids, lengths)
    slow = reference_scores(model, feats, ids, lengths)
    err = float((fast - slow).abs().max())
    if not err <= atol:
        raise CheckpointError(
            f"checkpoint {path}: vectorised and reference scores differ by {err:.3g} (> {atol}); please report this"
        )


def load_converted(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[SGRAF, Any]:
    """Load a file written by :func:`convert_official_checkpoint`: ``(model in eval mode, Vocab or None)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"converted checkpoint {path} not found; check the path")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one actionable message
        raise CheckpointError(
            f"converted checkpoint {path} could not be read ({type(exc).__name__}); convert the official file again"
        ) from None
    if not isinstance(obj, Mapping) or obj.get("format") != CONVERTED_FORMAT:
        raise CheckpointError(f"{path} is not a {CONVERTED_FORMAT!r} file; create it with convert_official_checkpoint")
    classes = {cls.name: cls for cls in _CLASSES.values()}
    if obj.get("model_name") not in classes:
        raise CheckpointError(
            f"{path}: unknown model_name {obj.get('model_name')!r}; expected one of {sorted(classes)}"
        )
    cls = classes[obj["model_name"]]
    try:
        cfg = cls.config_class.from_dict(obj["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: invalid config: {exc}") from None
    model = cls(cfg)
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: weights do not match the stored config ({str(exc).splitlines()[0]})") from None
    vocab = None
    if obj.get("vocab") is not None:
        from ..data.vocab import Vocab

        vocab = Vocab.from_dict(obj["vocab"], source=f"vocab stored in {path}")
    return model.eval(), vocab
