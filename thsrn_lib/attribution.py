"""Attributions of a pair's score to its words and regions (captum), for every registered model.

Methods (all in eval mode, gradients enabled locally; on CUDA with cuDNN switched off for the
call, because cuDNN's RNN backward only runs in train mode):

* :func:`token_attributions`: LayerIntegratedGradients on the word-embedding layer
  (:func:`word_embedding_layers`). Baseline: every *word* replaced by ``<pad>`` (id 0) while
  ``<start>``/``<end>`` stay, lengths unchanged. The baseline is "the same sentence frame with no
  words", so the attributions of the real words sum (up to captum's convergence delta) to
  ``score(caption) - score(frame)``, and ``<start>``/``<end>`` get exactly 0. The ``<pad>``
  embedding is whatever the model holds at id 0 (never trained, since padded steps are packed
  away): a neutral input the model has never been fitted to.
* :func:`region_attributions`: IntegratedGradients on the region features ``(R, F)``; a
  region's attribution is the sum over its ``F`` feature attributions.
* :func:`region_occlusion`: the score drop when one region's features are replaced by the
  baseline; all ``R`` occluded copies are scored in one batched forward.
* :func:`word_region_attributions`: the same two methods made *word-specific*, which pointing
  needs (a pair-level attribution ranks regions identically for every word). For word ``j`` the
  attributed quantity is its marginal contribution ``f_j(x) = s(x, c) - s(x, c with word j
  -> <pad>)``; IG attributes ``f_j`` to the regions, occlusion measures how much removing a
  region reduces it: ``[s(x,c) - s(x_-r,c)] - [s(x,c_-j) - s(x_-r,c_-j)]``, the region-word
  interaction.

Region baselines (``baseline=``): ``"zeros"``, ``"image_mean"`` (every region replaced by the
mean of the image's own regions), the data set's mean region feature (pass
``feature_mean(dataset)``), or any tensor ``(F,)`` / ``(R, F)``. Defaults:

* occlusion: ``"zeros"``. A zero feature vector is "no activation" for real bottom-up features
  (non-negative after ReLU) and, for Scenes (features standardised with train statistics), the
  train mean; the region encoder then maps it to its bias direction, i.e. a content-free region.
* integrated gradients: ``"image_mean"``. Every region encoder here ends in an l2
  normalisation, so ``v(a x) = v(x)`` for ``a > 0`` up to the encoder's bias: on the straight
  path from zeros nearly all of the change happens in a sliver near ``a = 0`` that the quadrature
  misses (large convergence delta; exactly zero attributions for bias-free, untrained encoders).
  From the image's mean region the path stays away from the origin, and the attribution reads
  "what this region adds beyond the image's average content".

Only what is needed is scored: a captum forward receives the interpolated rows of *one* image
(or one caption set) and the model scores them against the few captions of that image, never a
rows x rows matrix.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ConfigError, DataError

__all__ = [
    "word_embedding_layers",
    "word_embedding_layer",
    "grad_context",
    "pad_baseline_ids",
    "feature_mean",
    "default_baseline",
    "TokenAttribution",
    "RegionAttribution",
    "WordRegionAttribution",
    "token_attributions",
    "region_attributions",
    "region_occlusion",
    "word_region_attributions",
    "pair_attributions",
]

PAD, START, END = 0, 1, 2
REGION_METHODS = ("integrated_gradients", "occlusion")


# ------------------------------------------------------------------------------------ plumbing
def word_embedding_layers(model: nn.Module) -> list[nn.Module]:
    """The word-embedding module(s) whose output LayerIntegratedGradients interpolates.

    Every registered model embeds words with ``model.txt_enc.embed`` (``nn.Embedding``, or
    SHAN/HJE's GloVe ⊕ learned module), called once per text encoding; an
    :class:`~thsrn_lib.models.Ensemble` has one per member, attributed jointly.
    """
    members = getattr(model, "members", None)
    if isinstance(members, nn.ModuleList):
        return [layer for m in members for layer in word_embedding_layers(m)]
    enc = getattr(model, "txt_enc", None)
    embed = getattr(enc, "embed", None) if enc is not None else None
    if isinstance(embed, nn.Module):
        return [embed]
    raise ConfigError(
        f"cannot find the word-embedding layer of {type(model).__name__}: the registered models keep it at "
        "model.txt_enc.embed; pass layers=[...] explicitly for another layout"
    )


def word_embedding_layer(model: nn.Module) -> nn.Module:
    """The single word-embedding layer of a (non-ensemble) model."""
    layers = word_embedding_layers(model)
    if len(layers) != 1:
        raise ConfigError(f"{type(model).__name__} has {len(layers)} embedding layers (an ensemble); use word_embedding_layers")
    return layers[0]


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def grad_context(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode, gradients on (even inside ``inference_mode``/``no_grad``), cuDNN off on CUDA."""
    device = _device(model)
    was = model.training
    model.eval()
    cudnn = torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.inference_mode(False), torch.enable_grad(), cudnn:
            yield device
    finally:
        model.train(was)


def pad_baseline_ids(ids: Tensor, lengths: Tensor) -> Tensor:
    """``ids`` with every word replaced by ``<pad>``; ``<start>``/``<end>`` and lengths kept."""
    keep = (ids == START) | (ids == END)
    return torch.where(keep, ids, torch.zeros_like(ids))


def feature_mean(dataset: Any, max_images: int = 1000) -> Tensor:
    """``(F,)`` mean region feature over (at most ``max_images`` evenly spaced) images of a split."""
    n = int(dataset.n_images)
    idx = np.unique(np.linspace(0, n - 1, num=min(n, max_images)).round().astype(np.int64))
    return dataset.image_batch(idx).mean(dim=(0, 1))


def default_baseline(method: str) -> str:
    """The region baseline used when none is given: ``"zeros"`` for occlusion, ``"image_mean"`` for IG."""
    return "zeros" if method == "occlusion" else "image_mean"


def _region_baseline(feats: Tensor, baseline: str | Tensor) -> Tensor:
    """``(R, F)`` baseline for one image's features ``(R, F)``."""
    if isinstance(baseline, Tensor):
        b = baseline.to(device=feats.device, dtype=feats.dtype)
        if b.shape == feats.shape[-1:]:
            return b.expand_as(feats).clone()
        if b.shape == feats.shape:
            return b.clone()
        raise ConfigError(f"baseline tensor must be (F,) or (R, F) = {tuple(feats.shape)}, got {tuple(b.shape)}")
    if baseline == "zeros":
        return torch.zeros_like(feats)
    if baseline == "image_mean":
        return feats.mean(dim=0, keepdim=True).expand_as(feats).clone()
    if baseline == "mean":
        raise ConfigError("baseline='mean' needs the data: pass baseline=feature_mean(dataset) (a tensor)")
    raise ConfigError(f"baseline must be 'zeros', 'image_mean', 'mean' (as a tensor) or a tensor, got {baseline!r}")


def _caption_tensors(ids: Any, lengths: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    if isinstance(ids, Tensor) and ids.dim() == 2:
        ids_t = ids.to(device=device, dtype=torch.long)
        len_t = torch.as_tensor(lengths if lengths is not None else (ids_t != PAD).sum(1), dtype=torch.long).to(device)
    else:  # one caption as a list / 1-D tensor
        seq = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        ids_t, len_t = seq.to(device), torch.tensor([seq.shape[1]], device=device)
    if ids_t.shape[0] != len_t.shape[0]:
        raise DataError(f"ids (N, L) and lengths (N,) disagree: {tuple(ids_t.shape)} vs {tuple(len_t.shape)}")
    return ids_t, len_t


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _image_tensor(feats: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    x = torch.as_tensor(feats).to(device=device, dtype=dtype)
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise DataError(f"one image's region features must be (R, F), got {tuple(x.shape)}")
    return x


# ------------------------------------------------------------------------------------ results
@dataclass
class TokenAttribution:
    """Per-token attribution of N captions' scores with one image.

    Attributes:
        attributions: ``(N, L)`` (0 at ``<start>``/``<end>`` and padding).
        delta: ``(N,)`` captum's convergence delta, ``sum(attr) - (score - baseline_score)``.
        score, baseline_score: ``(N,)`` the pair's score and the all-``<pad>`` frame's.
        lengths: ``(N,)``.
    """

    attributions: np.ndarray
    delta: np.ndarray
    score: np.ndarray
    baseline_score: np.ndarray
    lengths: np.ndarray
    method: str = "layer_integrated_gradients"


@dataclass
class RegionAttribution:
    """Per-region attribution of N captions' scores with one image: ``attributions (N, R)``.

    ``delta`` is captum's convergence delta for IG (None for occlusion, which is exact).
    """

    attributions: np.ndarray
    score: np.ndarray
    baseline_score: np.ndarray | None
    delta: np.ndarray | None
    method: str


@dataclass
class WordRegionAttribution:
    """Word-specific region attributions of one caption: ``attributions (J, R)`` for ``positions``.

    ``word_effect[j] = s(x, c) - s(x, c with word j -> <pad>)``; ``delta (J,)`` IG's convergence
    delta (None for occlusion).
    """

    positions: list[int]
    attributions: np.ndarray
    word_effect: np.ndarray
    delta: np.ndarray | None
    method: str
    extras: dict[str, Any] = field(default_factory=dict)


def _np(x: Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


# ------------------------------------------------------------------------------------ tokens
def token_attributions(model: nn.Module, feats: Any, ids: Any, lengths: Any = None, n_steps: int = 32,
                       internal_batch_size: int | None = None, layers: Sequence[nn.Module] | None = None
                       ) -> TokenAttribution:
    """LayerIntegratedGradients of each pair's score to its words (see the module docstring).

    Args:
        feats: one image's region features ``(R, F)``.
        ids: ``(N, L)`` captions (with ``lengths (N,)``) or one caption's ids (list / 1-D).
        n_steps: integration steps (Gauss-Legendre); the delta shrinks as they grow.
    """
    from captum.attr import LayerIntegratedGradients

    with grad_context(model) as device:
        x = _image_tensor(feats, device, _dtype(model))
        ids_t, len_t = _caption_tensors(ids, lengths, device)
        n = ids_t.shape[0]
        images = x.unsqueeze(0)

        def forward(ids_rows: Tensor, len_rows: Tensor) -> Tensor:
            return model(images, ids_rows, len_rows)[0]

        layer_list = list(layers) if layers is not None else word_embedding_layers(model)
        with warnings.catch_warnings():
            # Ensemble members' embedding layers are independent: captum's caution does not apply.
            warnings.filterwarnings("ignore", message="Multiple layers provided")
            lig = LayerIntegratedGradients(forward, layer_list if len(layer_list) > 1 else layer_list[0])
        base = pad_baseline_ids(ids_t, len_t)
        attr, delta = lig.attribute(ids_t, baselines=base, additional_forward_args=(len_t,), n_steps=n_steps,
                                    internal_batch_size=internal_batch_size, return_convergence_delta=True)
        attrs = attr if isinstance(attr, list) else [attr]
        total = sum(a.sum(dim=-1) for a in attrs)  # (N, L): sum over the embedding dims (and layers)
        with torch.no_grad():
            score, base_score = forward(ids_t, len_t), forward(base, len_t)
    valid = torch.arange(ids_t.shape[1], device=device)[None, :] < len_t[:, None]
    total = total.masked_fill(~valid, 0.0)
    return TokenAttribution(attributions=_np(total), delta=_np(delta).reshape(n), score=_np(score),
                            baseline_score=_np(base_score), lengths=len_t.cpu().numpy())


# ------------------------------------------------------------------------------------ regions
def region_attributions(model: nn.Module, feats: Any, ids: Any, lengths: Any = None, n_steps: int = 32,
                        baseline: str | Tensor = "image_mean", internal_batch_size: int | None = None
                        ) -> RegionAttribution:
    """IntegratedGradients of each pair's score to the image's regions, ``(N, R)`` (summed over F)."""
    from captum.attr import IntegratedGradients

    with grad_context(model) as device:
        x = _image_tensor(feats, device, _dtype(model))
        ids_t, len_t = _caption_tensors(ids, lengths, device)
        n = ids_t.shape[0]
        x0 = _region_baseline(x, baseline)

        def forward(rows: Tensor, cap: Tensor) -> Tensor:
            # rows: (M, R, F) scaled images; cap: (M,) which caption each row pairs with.
            return model(rows, ids_t, len_t)[torch.arange(rows.shape[0], device=rows.device), cap]

        ig = IntegratedGradients(forward)
        inputs = x.unsqueeze(0).expand(n, -1, -1).contiguous()
        base = x0.unsqueeze(0).expand(n, -1, -1).contiguous()
        cap = torch.arange(n, device=device)
        attr, delta = ig.attribute(inputs, baselines=base, additional_forward_args=(cap,), n_steps=n_steps,
                                   internal_batch_size=internal_batch_size, return_convergence_delta=True)
        with torch.no_grad():
            score, base_score = forward(inputs, cap), forward(base, cap)
    return RegionAttribution(attributions=_np(attr.sum(dim=-1)), score=_np(score), baseline_score=_np(base_score),
                             delta=_np(delta).reshape(n), method="integrated_gradients")


@torch.no_grad()
def _occluded_scores(model: nn.Module, x: Tensor, ids: Tensor, lengths: Tensor, baseline: str | Tensor) -> Tensor:
    """``(R + 1, N)``: row 0 the intact image's scores, row ``1 + r`` with region ``r`` replaced."""
    r = x.shape[0]
    x0 = _region_baseline(x, baseline)
    rows = x.unsqueeze(0).repeat(r + 1, 1, 1)
    idx = torch.arange(r, device=x.device)
    rows[1 + idx, idx] = x0[idx]
    return model(rows, ids, lengths)


def region_occlusion(model: nn.Module, feats: Any, ids: Any, lengths: Any = None,
                     baseline: str | Tensor = "zeros") -> RegionAttribution:
    """Score drop ``s(x) - s(x with region r -> baseline)`` for every region, ``(N, R)``, one forward."""
    device = _device(model)
    x = _image_tensor(feats, device, _dtype(model))
    ids_t, len_t = _caption_tensors(ids, lengths, device)
    was = model.training
    model.eval()
    try:
        s = _occluded_scores(model, x, ids_t, len_t, baseline)
    finally:
        model.train(was)
    drops = (s[0:1] - s[1:]).T  # (N, R)
    return RegionAttribution(attributions=_np(drops), score=_np(s[0]), baseline_score=None, delta=None,
                             method="occlusion")


def _without_words(ids: Tensor, length: int, positions: Sequence[int]) -> Tensor:
    """``(J, L)``: the caption once per position, with that word replaced by ``<pad>``."""
    out = ids.unsqueeze(0).repeat(len(positions), 1)
    pos = torch.as_tensor(list(positions), dtype=torch.long, device=ids.device)
    if len(positions) and (int(pos.min()) < 1 or int(pos.max()) >= length - 1):
        raise DataError(f"word positions must lie in [1, {length - 2}] (between <start> and <end>), got {list(positions)}")
    out[torch.arange(len(positions), device=ids.device), pos] = PAD
    return out


def word_region_attributions(model: nn.Module, feats: Any, ids: Any, positions: Sequence[int],
                             method: str = "integrated_gradients", n_steps: int = 16,
                             baseline: str | Tensor | None = None, internal_batch_size: int | None = None
                             ) -> WordRegionAttribution:
    """Word-specific region attributions of one caption (see the module docstring), ``(J, R)``.

    Args:
        feats: ``(R, F)``; ids: one caption's ids (list / 1-D, ``<start>`` ... ``<end>``).
        positions: model positions of the words (``<start>`` is 0).
        method: ``"integrated_gradients"`` or ``"occlusion"``.
        baseline: region baseline (default per method, see the module docstring).
    """
    if method not in REGION_METHODS:
        raise ConfigError(f"method must be one of {REGION_METHODS}, got {method!r}")
    baseline = default_baseline(method) if baseline is None else baseline
    positions = [int(p) for p in positions]
    device = _device(model)
    x = _image_tensor(feats, device, _dtype(model))
    full = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
    length = full.shape[0]
    if not positions:
        r = x.shape[0]
        return WordRegionAttribution([], np.zeros((0, r), np.float32), np.zeros(0, np.float32), None, method)
    caps = torch.cat([full.unsqueeze(0), _without_words(full, length, positions)])  # (1 + J, L)
    lens = torch.full((caps.shape[0],), length, dtype=torch.long, device=device)
    j = len(positions)
    if method == "occlusion":
        was = model.training
        model.eval()
        try:
            s = _occluded_scores(model, x, caps, lens, baseline)  # (R + 1, 1 + J)
        finally:
            model.train(was)
        effect = s[:, :1] - s[:, 1:]  # (R + 1, J): each word's effect with each region occluded
        inter = (effect[0:1] - effect[1:]).T  # (J, R)
        return WordRegionAttribution(positions, _np(inter), _np(effect[0]), None, method)

    from captum.attr import IntegratedGradients

    with grad_context(model):
        x0 = _region_baseline(x, baseline)

        def forward(rows: Tensor, which: Tensor) -> Tensor:
            s = model(rows, caps, lens)  # (M, 1 + J)
            m = torch.arange(rows.shape[0], device=rows.device)
            return s[m, 0] - s[m, which]

        ig = IntegratedGradients(forward)
        inputs = x.unsqueeze(0).expand(j, -1, -1).contiguous()
        base = x0.unsqueeze(0).expand(j, -1, -1).contiguous()
        which = torch.arange(1, j + 1, device=device)
        attr, delta = ig.attribute(inputs, baselines=base, additional_forward_args=(which,), n_steps=n_steps,
                                   internal_batch_size=internal_batch_size, return_convergence_delta=True)
        with torch.no_grad():
            s_full = model(x.unsqueeze(0), caps, lens)[0]  # (1 + J,)
            effect = s_full[0] - s_full[1:]
    return WordRegionAttribution(positions, _np(attr.sum(dim=-1)), _np(effect), _np(delta).reshape(j), method)


def pair_attributions(model: nn.Module, dataset: Any, image_index: int, caption_index: int | None = None,
                      text: str | None = None, n_steps: int = 32, positions: Sequence[int] | None = None,
                      region_method: str = "integrated_gradients", baseline: str | Tensor | None = None
                      ) -> dict[str, Any]:
    """Everything the attention-vs-attribution figure needs for one pair of a dataset.

    Returns ``{"ids", "tokens", "token": TokenAttribution, "regions": RegionAttribution (pair
    level), "word_regions": WordRegionAttribution (for ``positions``; default: every word
    between <start> and <end>)}``.
    """
    from .viz.maps import encode_query

    if (caption_index is None) == (text is None):
        raise ConfigError("pass exactly one of caption_index or text")
    ids = dataset.caption_ids(caption_index) if caption_index is not None else encode_query(dataset.vocab, text)
    feats = dataset.image_batch([image_index])[0]
    pos = list(range(1, len(ids) - 1)) if positions is None else [int(p) for p in positions]
    tok = token_attributions(model, feats, ids, n_steps=n_steps)
    reg = region_attributions(model, feats, ids, n_steps=n_steps, baseline=baseline or "image_mean")
    wr = word_region_attributions(model, feats, ids, pos, method=region_method, n_steps=max(8, n_steps // 2),
                                  baseline=baseline)
    tokens = dataset.vocab.tokens(ids) if dataset.vocab is not None else [str(i) for i in ids]
    return {"ids": ids, "tokens": tokens, "token": tok, "regions": reg, "word_regions": wr}
