"""Sharded evaluation: encode every image and caption once, score the matrix block by block.

Pipeline of :func:`evaluate`:

1. :func:`encode_images` encodes each *logical* image once (never once per caption), in
   batches, in eval mode under ``torch.inference_mode()``.
2. :func:`encode_texts` sorts the captions by length (longest first, stable) and encodes them
   in batches, so each batch pads to nearly its own length; consecutive batches are merged into
   :class:`TextShard` s of at most ``caption_shard`` captions.
3. :func:`score_matrix` scores ``image_shard x caption_shard`` blocks with ``model.score`` and
   writes each block straight into a preallocated float32 ``(n_images, n_captions)`` array (or a
   ``.npy`` memory map), so peak memory is set by the block size, not by the number of pairs.
4. The protocol's metrics are computed (:mod:`.metrics`), and with ``out_dir`` the matrix and a
   JSON of metrics, model config, protocol and timings are written atomically.

Shard sizes come from a memory budget (:func:`estimate_pair_bytes`, :func:`choose_shards`).
Under ``torchrun`` the image rows are split across ranks and the matrix is gathered
(:mod:`.distributed`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..errors import ConfigError, DataError
from ..models.base import Embeddings, MatchingModel, concat, select
from ..utils.io import atomic_save_npy, atomic_write_json, fsync_dir
from . import distributed as _dist
from .metrics import evaluate_sims, fold_metrics
from .protocols import Protocol, get_protocol

__all__ = [
    "TextShard",
    "EvalResult",
    "eval_mode",
    "num_items",
    "item_bytes",
    "encode_images",
    "encode_texts",
    "estimate_pair_bytes",
    "choose_shards",
    "score_matrix",
    "evaluate",
    "DEFAULT_MEMORY_BUDGET_MB",
    "PAIR_OVERHEAD",
]

DEFAULT_MEMORY_BUDGET_MB = 1024.0
#: Live per-pair copies of one item's features assumed for a cross-attention model (see
#: :func:`estimate_pair_bytes`).
PAIR_OVERHEAD = 4.0


# ------------------------------------------------------------------------------------ containers
@dataclass
class TextShard:
    """Encoded captions of one length bucket.

    Attributes:
        caption_index: ``(n,)`` int64 (CPU) dataset indices of the captions, in shard order.
        position: ``(n,)`` int64 (CPU) their columns in the output matrix (index into the list of
            captions that was encoded; equals ``caption_index`` when all captions are encoded).
        emb: the model's text embeddings of these captions (item axis first, padded to the
            shard's longest caption).
    """

    caption_index: Tensor
    position: Tensor
    emb: Embeddings

    def __len__(self) -> int:
        return int(self.caption_index.numel())


@dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes:
        metrics: the protocol's metrics (keys :data:`~thsrn_lib.evaluation.metrics.METRIC_KEYS`).
        sims: float32 ``(n_images, n_captions)`` matrix, or ``(folds, n, 5n)`` fold blocks for a
            multi-fold protocol (COCO 1K scores only the diagonal blocks it needs); None on ranks
            that did not receive it (``gather_to=0``). A memory map when ``memmap=True``.
        protocol: the protocol name.
        info: model name and config, data, shard sizes, timings, per-fold metrics, files written.
    """

    metrics: dict[str, float]
    sims: np.ndarray | None
    protocol: str
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _tensors(emb: Embeddings) -> Iterator[Tensor]:
    for v in emb.values():
        if isinstance(v, dict):
            yield from _tensors(v)
        elif isinstance(v, Tensor):
            yield v


def num_items(emb: Embeddings) -> int:
    """Length of the item axis of an embeddings dict."""
    for t in _tensors(emb):
        return int(t.shape[0])
    raise ConfigError("embeddings dict holds no tensors")


def item_bytes(emb: Embeddings) -> int:
    """Bytes per item of an embeddings dict (all tensors, including padding)."""
    n = max(1, num_items(emb))
    return int(sum(t.numel() * t.element_size() for t in _tensors(emb)) // n)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(total: int, desc: str, enabled: bool, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _index_list(indices: Sequence[int] | range | np.ndarray | None, n: int, what: str) -> np.ndarray:
    if indices is None:
        return np.arange(n, dtype=np.int64)
    idx = np.asarray(list(indices) if isinstance(indices, range) else indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ConfigError(f"{what} indices must lie in [0, {n}), got min {idx.min()}, max {idx.max()}")
    return idx


def _wrap_model_error(exc: RuntimeError, what: str, model: MatchingModel, shape_hint: str) -> Exception:
    """A readable error for a failure inside the model (wrong feature size, out of memory)."""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return ConfigError(
            f"out of memory while {what} ({shape_hint}); lower --memory-budget-mb, --shard-images/--shard-captions "
            "or --batch-size"
        )
    cfg = getattr(model, "config", None)
    dims = ""
    if cfg is not None and hasattr(cfg, "img_dim"):
        dims = f" The model expects img_dim={cfg.img_dim}, num_regions={getattr(cfg, 'num_regions', '?')}."
    return DataError(
        f"model {model.name or type(model).__name__!r} failed while {what} ({shape_hint}): {exc}.{dims} "
        "Check that the checkpoint was trained on data of this kind (feature size, regions, vocab)."
    )


# -------------------------------------------------------------------------------------- encoding
def encode_images(
    model: MatchingModel,
    dataset: Any,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = False,
    indices: Sequence[int] | range | np.ndarray | None = None,
    num_workers: int = 0,
) -> Embeddings:
    """Image embeddings of each logical image of ``dataset`` (once per image), in index order.

    Args:
        dataset: a :class:`~thsrn_lib.data.PrecompDataset` (its ``images()`` view is read) or any
            Dataset of ``(features (R, D), image_index)`` items.
        indices: the logical images to encode (default all); the result follows this order.

    Returns:
        The model's image embeddings for ``len(indices)`` items, on ``device`` (default: the model's).
    """
    batch_size = _check_positive("batch_size", batch_size)
    device = torch.device(device) if device is not None else _model_device(model)
    from ..data import collate_images

    images = dataset.images() if hasattr(dataset, "images") else dataset
    idx = _index_list(indices, len(images), "image")
    subset = Subset(images, idx.tolist())
    loader = DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    parts: list[Embeddings] = []
    seen = 0
    with eval_mode(model), torch.inference_mode(), _progress(len(idx), "encode images", progress, "img") as bar:
        for batch in loader:
            expected = idx[seen : seen + len(batch)]
            if not np.array_equal(batch.image_index.numpy(), expected):
                raise DataError("the image dataset returned items out of order; image_index must equal the item index")
            feats = batch.images.to(device, non_blocking=True)
            try:
                parts.append(model.encode_images(feats))
            except RuntimeError as exc:
                raise _wrap_model_error(exc, "encoding images", model, f"features {tuple(feats.shape)}") from exc
            seen += len(batch)
            bar.update(len(batch))
    if not parts:
        raise DataError("no images to encode")
    return parts[0] if len(parts) == 1 else concat(parts)


def _caption_items(dataset: Any, idx: np.ndarray) -> list[Tensor]:
    texts = dataset.texts() if hasattr(dataset, "texts") else dataset
    items = []
    for k in idx.tolist():
        ids, index = texts[k]
        if int(index) != k:
            raise DataError(f"the caption dataset returned caption {index} for item {k}")
        items.append(torch.as_tensor(ids, dtype=torch.long))
    return items


def encode_texts(
    model: MatchingModel,
    dataset: Any,
    batch_size: int = 128,
    shard_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    indices: Sequence[int] | range | np.ndarray | None = None,
) -> list[TextShard]:
    """Encode captions in length-sorted batches and group them into shards of ``<= shard_size``.

    Captions are sorted by token count, longest first (stable, so equal lengths keep file
    order); each encoding batch of ``batch_size`` therefore pads only to its own longest caption.
    Consecutive batches are concatenated into shards of up to ``shard_size`` captions
    (default: one shard per batch), the unit :func:`score_matrix` scores against image blocks.

    Args:
        dataset: a :class:`~thsrn_lib.data.PrecompDataset` (its ``texts()`` view is read) or any
            Dataset of ``(ids (n,), caption_index)`` items.
        indices: captions to encode (default all). Shard ``position`` s index into this list.
    """
    batch_size = _check_positive("batch_size", batch_size)
    shard_size = batch_size if shard_size is None else _check_positive("shard_size", shard_size)
    device = torch.device(device) if device is not None else _model_device(model)
    from ..data import collate_texts

    n_total = dataset.n_captions if hasattr(dataset, "n_captions") else len(dataset)
    idx = _index_list(indices, n_total, "caption")
    items = _caption_items(dataset, idx)
    lengths = np.fromiter((t.numel() for t in items), dtype=np.int64, count=len(items))
    order = np.argsort(-lengths, kind="stable")
    shards: list[TextShard] = []
    pending: list[Embeddings] = []
    pending_pos: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            pos = np.concatenate(pending_pos)
            emb = pending[0] if len(pending) == 1 else concat(pending)
            shards.append(TextShard(torch.from_numpy(idx[pos]), torch.from_numpy(pos), emb))
            pending.clear()
            pending_pos.clear()

    step = min(batch_size, shard_size)
    with eval_mode(model), torch.inference_mode(), _progress(len(idx), "encode captions", progress, "cap") as bar:
        filled = 0
        for b0 in range(0, len(order), step):
            pos = order[b0 : b0 + step]
            batch = collate_texts([(items[p], int(idx[p])) for p in pos.tolist()])
            try:
                emb = model.encode_texts(batch.ids.to(device, non_blocking=True), batch.lengths.to(device))
            except RuntimeError as exc:
                raise _wrap_model_error(exc, "encoding captions", model, f"ids {tuple(batch.ids.shape)}") from exc
            if filled + len(pos) > shard_size:
                flush()
                filled = 0
            pending.append(emb)
            pending_pos.append(pos)
            filled += len(pos)
            bar.update(len(pos))
        flush()
    if not shards:
        raise DataError("no captions to encode")
    return shards


# ----------------------------------------------------------------------------------- shard sizes
def estimate_pair_bytes(model: MatchingModel, img_emb: Embeddings, txt_shards: Sequence[TextShard] | Embeddings) -> int:
    """Estimated peak bytes per scored (image, caption) pair, used to size the shards.

    * Embedding models (``is_embedding_model``, e.g. HJE): a block is one matrix product, so a
      pair costs its output: 4 bytes on the device plus 4 for the host copy -> 8.
    * Cross-attention models: each pair materialises the features of one side attended by the
      other (e.g. the attended context of a caption's words over regions, ``(L, D)``, and for an
      image-to-text stream an ``(R, D)`` one), plus differences / similarity vectors of the same
      order. The estimate is ``PAIR_OVERHEAD (4) x max(image item bytes, caption item bytes) + 8``,
      where the item bytes are measured on the actual embeddings (captions at the longest padded
      length, so it is an upper bound over shards).

    Inputs that are already resident (all image and caption embeddings) are not counted: the
    budget bounds the *extra* memory of scoring.
    """
    if getattr(model, "is_embedding_model", False):
        return 8
    if isinstance(txt_shards, dict):
        txt_b = item_bytes(txt_shards)
    else:
        txt_b = max(item_bytes(s.emb) for s in txt_shards)
    return int(math.ceil(PAIR_OVERHEAD * max(item_bytes(img_emb), txt_b))) + 8


def choose_shards(
    n_images: int,
    n_captions: int,
    pair_bytes: int,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    image_shard: int | None = None,
    caption_shard: int | None = None,
    captions_per_image: int = 5,
) -> tuple[int, int]:
    """Block size ``(image_shard, caption_shard)`` with ``image_shard x caption_shard x pair_bytes <= budget``.

    An explicit size is kept (clipped to the matrix) and the other one fills the budget. With
    neither given the block follows the matrix's own aspect (``captions_per_image`` captions per
    image), growing one side when the other hits the matrix edge. At least a 1 x 1 block.
    """
    if not (isinstance(memory_budget_mb, (int, float)) and memory_budget_mb > 0) or isinstance(memory_budget_mb, bool):
        raise ConfigError(f"memory_budget_mb must be a positive number, got {memory_budget_mb!r}")
    pairs = max(1, int(memory_budget_mb * 2**20) // max(1, int(pair_bytes)))
    clip_i = lambda v: int(min(max(1, v), n_images))  # noqa: E731
    clip_c = lambda v: int(min(max(1, v), n_captions))  # noqa: E731
    if image_shard is not None:
        image_shard = clip_i(_check_positive("image_shard", image_shard))
    if caption_shard is not None:
        caption_shard = clip_c(_check_positive("caption_shard", caption_shard))
    if image_shard is not None and caption_shard is not None:
        return image_shard, caption_shard
    if image_shard is not None:
        return image_shard, clip_c(pairs // image_shard)
    if caption_shard is not None:
        return clip_i(pairs // caption_shard), caption_shard
    b = clip_i(int(math.sqrt(pairs / captions_per_image)))
    n = clip_c(pairs // b)
    return clip_i(pairs // n), n


# --------------------------------------------------------------------------------------- scoring
def score_matrix(
    model: MatchingModel,
    img_emb: Embeddings,
    txt_shards: Sequence[TextShard],
    image_shard: int,
    caption_shard: int,
    device: torch.device | str | None = None,
    progress: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Score every image of ``img_emb`` against every caption of ``txt_shards``, block by block.

    Args:
        img_emb: image embeddings, one item per image (item ``i`` -> row ``i``).
        txt_shards: from :func:`encode_texts`; shard item ``j`` goes to column ``position[j]``.
        image_shard, caption_shard: block size; shards longer than ``caption_shard`` are cut
            into views (no copies), image blocks are views of ``img_emb``.
        device: where ``model.score`` runs (default: the model's device); embeddings are expected
            there already.
        out: preallocated float32 ``(n_images, n_captions)`` destination, e.g. a memory map from
            ``np.lib.format.open_memmap``; allocated when None.

    Returns:
        ``out``: float32 ``(n_images, n_captions)``. Peak extra memory is one block's
        intermediates plus its host copy; image features are never repeated per caption.
    """
    image_shard = _check_positive("image_shard", image_shard)
    caption_shard = _check_positive("caption_shard", caption_shard)
    device = torch.device(device) if device is not None else _model_device(model)
    n_img = num_items(img_emb)
    n_cap = sum(len(s) for s in txt_shards)
    if out is None:
        out = np.empty((n_img, n_cap), dtype=np.float32)
    elif out.shape != (n_img, n_cap):
        raise ConfigError(f"out has shape {out.shape}, expected ({n_img}, {n_cap})")
    if n_img == 0 or n_cap == 0:
        return out
    cols = [s.position.numpy() for s in txt_shards]
    if max(int(c.max()) for c in cols) >= n_cap:
        raise ConfigError(f"caption positions exceed the {n_cap} columns; pass the shards of one encode_texts call")
    blocks = [
        (si, slice(c0, min(len(s), c0 + caption_shard)))
        for si, s in enumerate(txt_shards)
        for c0 in range(0, len(s), caption_shard)
    ]
    n_blocks = math.ceil(n_img / image_shard) * len(blocks)
    with eval_mode(model), torch.inference_mode(), _progress(n_blocks, "scoring", progress, "block") as bar:
        for i0 in range(0, n_img, image_shard):
            i1 = min(n_img, i0 + image_shard)
            img_blk = select(img_emb, slice(i0, i1))
            for si, cs in blocks:
                shard = txt_shards[si]
                whole = cs.start == 0 and cs.stop == len(shard)
                txt_blk = shard.emb if whole else select(shard.emb, cs)
                try:
                    s = model.score(img_blk, txt_blk)
                except RuntimeError as exc:
                    raise _wrap_model_error(
                        exc, "scoring", model, f"block of {i1 - i0} images x {cs.stop - cs.start} captions"
                    ) from exc
                if tuple(s.shape) != (i1 - i0, cs.stop - cs.start):
                    raise ConfigError(
                        f"model.score returned shape {tuple(s.shape)} for {i1 - i0} images x "
                        f"{cs.stop - cs.start} captions"
                    )
                out[i0:i1, cols[si][cs]] = s.detach().to(torch.float32).cpu().numpy()
                bar.update(1)
    return out


# ------------------------------------------------------------------------------------ evaluation
def _as_model(model: MatchingModel | Sequence[MatchingModel], weights: Sequence[float] | None) -> MatchingModel:
    if isinstance(model, MatchingModel):
        if weights is not None:
            raise ConfigError("ensemble_weights needs a list of models")
        return model
    models = list(model)
    if not models or not all(isinstance(m, MatchingModel) for m in models):
        raise ConfigError("model must be a MatchingModel or a non-empty list of MatchingModels")
    if len(models) == 1:
        return models[0]
    return make_ensemble(models, weights)


def make_ensemble(models: Sequence[MatchingModel], weights: Sequence[float] | None = None) -> MatchingModel:
    """An :class:`~thsrn_lib.models.Ensemble` of ``models`` with unique member labels.

    Labels are the model names, suffixed ``#i`` when a name repeats (e.g. two SGR checkpoints),
    because the ensemble keys its per-member scores by label.
    """
    from ..models import Ensemble

    names = [m.name or type(m).__name__ for m in models]
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return Ensemble(list(models), names=names, weights=weights)


def model_description(model: MatchingModel) -> dict[str, Any]:
    """Name and config switch values of a model (per member for an ensemble), as plain data."""
    members = getattr(model, "members", None)
    if members is not None and getattr(model, "config", None) is None:
        return {
            "name": model.name,
            "weights": list(getattr(model, "weights", [])),
            "members": [
                {"label": label, **model_description(m)} for label, m in zip(getattr(model, "names", []), members)
            ],
        }
    cfg = getattr(model, "config", None)
    return {
        "name": model.name or type(model).__name__,
        "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def _vocab_sizes(model: MatchingModel) -> list[int]:
    members = getattr(model, "members", None)
    if members is not None and getattr(model, "config", None) is None:
        return [v for m in members for v in _vocab_sizes(m)]
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return [int(size)] if size is not None else []


def check_compatible(model: MatchingModel, dataset: Any) -> None:
    """Fail early, with the fix, when the data cannot feed the model (feature size, vocab size)."""
    members = getattr(model, "members", None)
    checked = list(members) if members is not None and getattr(model, "config", None) is None else [model]
    feat_dim = getattr(dataset, "feature_dim", None)
    for m in checked:
        cfg = getattr(m, "config", None)
        img_dim = getattr(cfg, "img_dim", None)
        if feat_dim is not None and img_dim is not None and int(feat_dim) != int(img_dim):
            raise DataError(
                f"the data {getattr(dataset, 'ims_path', '')} has {feat_dim}-d region features but model "
                f"{m.name!r} expects img_dim={img_dim}; evaluate on the data the checkpoint was trained for"
            )
    vocab = getattr(dataset, "vocab", None)
    if vocab is not None:
        for size in _vocab_sizes(model):
            if len(vocab) > size:
                raise DataError(
                    f"the data's vocab has {len(vocab)} words but the model was built for vocab_size={size}; "
                    "tokenize with the vocab saved in the checkpoint (or the one it was trained with)"
                )


def _new_output(
    shape: tuple[int, ...], out_dir: Path | None, memmap: bool, receive: bool
) -> tuple[np.ndarray | None, Path | None]:
    if not receive:
        return None, None
    if memmap and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".sims.npy.{os.getpid()}.partial"
        return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape), tmp
    return np.empty(shape, dtype=np.float32), None


def evaluate(
    model: MatchingModel | Sequence[MatchingModel],
    dataset: Any,
    protocol: str | Protocol = "generic",
    *,
    batch_size: int = 128,
    image_shard: int | None = None,
    caption_shard: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    device: torch.device | str | None = None,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
    memmap: bool = False,
    num_workers: int = 0,
    ensemble_weights: Sequence[float] | None = None,
    gather_to: int | Literal["all"] = "all",
    metadata: dict[str, Any] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` under ``protocol``.

    Args:
        model: a :class:`MatchingModel`, or a list of them (scores averaged: an ensemble such as
            SGRAF = SGR + SAF; they must share the vocab and the features).
        dataset: a :class:`~thsrn_lib.data.PrecompDataset` of the protocol's split (see
            :mod:`.protocols`); its size is checked against the protocol.
        protocol: ``f30k``, ``coco1k``, ``coco5k``, ``dev``, ``scenes`` or ``generic``. COCO 1K
            scores only its 5 diagonal 1,000 x 5,000 blocks (25 M pairs instead of 125 M) and
            returns them as a ``(5, 1000, 5000)`` stack; COCO 5K scores the full matrix and also
            reports the COCO 1K numbers of the same matrix in ``info["also"]["coco1k"]``.
        batch_size: images / captions per encoding batch.
        image_shard, caption_shard: scoring block size; None = from ``memory_budget_mb``.
        memory_budget_mb: extra memory allowed for one scoring block (see :func:`estimate_pair_bytes`).
        device: where to run (the model is moved there); default the model's device.
        progress: show progress bars (tqdm, on stderr).
        out_dir: write ``sims.npy`` and ``metrics.json`` there (atomically; rank 0 only under torchrun).
        memmap: build the matrix directly in ``out_dir/sims.npy`` through a memory map (for
            matrices larger than RAM); the file appears under its final name only when complete.
        gather_to: under torchrun, ``"all"`` ranks or one rank number receive the matrix.
        metadata: extra plain data recorded in ``info`` and ``metrics.json`` (e.g. checkpoint paths).

    Under an initialised multi-process group (``torchrun``) each rank scores a contiguous range
    of image rows and the matrix is gathered (:mod:`.distributed`); every rank returns the metrics.
    """
    t_start = time.perf_counter()
    if memmap and out_dir is None:
        raise ConfigError("memmap=True needs out_dir (the matrix is written to out_dir/sims.npy)")
    p = get_protocol(protocol)
    model = _as_model(model, ensemble_weights)
    batch_size = _check_positive("batch_size", batch_size)
    n_img, n_cap = int(dataset.n_images), int(dataset.n_captions)
    p.check_shape(n_img, n_cap, source=f"{getattr(dataset, 'root', '')} split {getattr(dataset, 'split', '?')!r}")
    check_compatible(model, dataset)
    if device is not None:
        device = torch.device(device)
        model.to(device)
    else:
        device = _model_device(model)
    world, rank = _dist.world_info()
    if gather_to != "all" and (
        isinstance(gather_to, bool) or not isinstance(gather_to, int) or not 0 <= gather_to < world
    ):
        raise ConfigError(f"gather_to must be 'all' or a rank in [0, {world}), got {gather_to!r}")
    receive = gather_to == "all" or gather_to == rank
    out_path = Path(out_dir) if out_dir is not None else None
    writer = out_path is not None and rank == (0 if gather_to == "all" else gather_to)

    parts = p.fold_slices(n_img)
    cpi = p.captions_per_image
    shape = (n_img, n_cap) if len(parts) == 1 else (len(parts), n_img // len(parts), n_cap // len(parts))
    sims, tmp_path = _new_output(shape, out_path, memmap and writer, receive)
    timing = {"encode_images_s": 0.0, "encode_texts_s": 0.0, "score_s": 0.0, "gather_s": 0.0}
    shard_info: dict[str, Any] = {}
    pairs = 0
    try:
        for f, (isl, csl) in enumerate(parts):
            target = sims if sims is None or len(parts) == 1 else sims[f]
            ranges = _dist.row_ranges(isl.stop - isl.start, world, align=batch_size)
            r0, r1 = ranges[rank]
            t0 = time.perf_counter()
            img_emb = (
                encode_images(
                    model,
                    dataset,
                    batch_size,
                    device,
                    progress,
                    indices=range(isl.start + r0, isl.start + r1),
                    num_workers=num_workers,
                )
                if r1 > r0
                else None
            )
            _sync(device)
            timing["encode_images_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            cap_idx = np.arange(csl.start, csl.stop)
            # Probe the longest caption to size the text shards before encoding them all.
            probe = encode_texts(model, dataset, 1, 1, device, False, indices=cap_idx[_longest(dataset, cap_idx)])
            probe_img = (
                img_emb if img_emb is not None else encode_images(model, dataset, 1, device, False, indices=[isl.start])
            )
            pair_bytes = estimate_pair_bytes(model, probe_img, probe)
            b, c = choose_shards(
                isl.stop - isl.start, len(cap_idx), pair_bytes, memory_budget_mb, image_shard, caption_shard, cpi
            )
            shard_info = {
                "image_shard": b,
                "caption_shard": c,
                "pair_bytes_estimate": pair_bytes,
                "memory_budget_mb": memory_budget_mb,
                "block_mb_estimate": round(b * c * pair_bytes / 2**20, 2),
            }
            txt = encode_texts(model, dataset, batch_size, c, device, progress, indices=cap_idx)
            _sync(device)
            timing["encode_texts_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if world == 1:
                score_matrix(model, img_emb, txt, b, c, device, progress, out=target)
            else:
                local = np.empty((r1 - r0, len(cap_idx)), dtype=np.float32)
                if img_emb is not None:
                    score_matrix(model, img_emb, txt, b, c, device, progress, out=local)
                timing["score_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                _dist.gather_rows(local, ranges, out=target, gather_to=gather_to)
                timing["gather_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
            timing["score_s"] += time.perf_counter() - t0
            pairs += (isl.stop - isl.start) * len(cap_idx)
            del img_emb, txt, probe
    except BaseException:
        if tmp_path is not None:  # never leave a half-written matrix behind
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        raise

    info: dict[str, Any] = {
        "protocol": p.name,
        "protocol_description": p.description,
        "model": model_description(model),
        "data": {
            "root": str(getattr(dataset, "root", "")),
            "split": getattr(dataset, "split", None),
            "n_images": n_img,
            "n_captions": n_cap,
        },
        "pairs_scored": pairs,
        "shards": shard_info,
        "device": str(device),
        "world_size": world,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    metrics: dict[str, float] = {}
    if receive:
        per_fold = fold_metrics(sims, cpi, p.folds)
        metrics = evaluate_sims(sims, cpi, p.folds)
        if len(per_fold) > 1:
            info["folds"] = per_fold
        if p.name == "coco5k":
            # Every COCO 1K fold is a diagonal block of the 5K matrix: its numbers come for free.
            info["also"] = {"coco1k": evaluate_sims(sims, cpi, 5)}
    if world > 1 and gather_to != "all":
        metrics, extra = _dist.broadcast_object(
            (metrics, {k: info.get(k) for k in ("folds", "also") if k in info}), src=gather_to
        )
        info.update({k: v for k, v in extra.items() if v is not None})
    timing["total_s"] = time.perf_counter() - t_start
    timing["pairs_per_s"] = pairs / timing["score_s"] if timing["score_s"] > 0 else None
    info["timing"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in timing.items()}
    if metadata:
        info["metadata"] = metadata

    if writer:
        out_path.mkdir(parents=True, exist_ok=True)
        sims_file = out_path / "sims.npy"
        if tmp_path is not None:
            sims.flush()
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, sims_file)
            fsync_dir(out_path)
            sims = np.load(sims_file, mmap_mode="r")
        else:
            atomic_save_npy(sims_file, sims)
        info["files"] = {"sims": str(sims_file), "metrics": str(out_path / "metrics.json")}
        atomic_write_json(out_path / "metrics.json", {"protocol": p.name, "metrics": metrics, "info": info})
    return EvalResult(metrics=metrics, sims=sims if receive else None, protocol=p.name, info=info)


def _longest(dataset: Any, cap_idx: np.ndarray) -> list[int]:
    """Position (in ``cap_idx``) of the longest caption, as a one-element list."""
    texts = dataset.texts() if hasattr(dataset, "texts") else dataset
    best, best_len = 0, -1
    for pos, k in enumerate(cap_idx.tolist()):
        n = int(torch.as_tensor(texts[k][0]).numel())
        if n > best_len:
            best, best_len = pos, n
    return [best]
