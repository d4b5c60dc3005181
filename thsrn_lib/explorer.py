"""Interactive retrieval explorer for JupyterLab: type or pick a caption, see ranked images with the
alignment overlay; pick an image, see ranked captions; pick a word, see its regions; switch
model and stream.

Two layers:

* :class:`Explorer` holds the state and the caches and has one handler per user action
  (``on_query_text``, ``on_pick_caption``, ``on_pick_image``, ``on_pick_word``,
  ``on_switch_model``, ``on_switch_stream``, ``on_pick_split``). Each handler updates
  :attr:`Explorer.state` and the figures in :attr:`Explorer.figures` and returns the main one.
  No widget is needed: tests and scripts call the handlers directly.
* :class:`ExplorerApp` only wires ipywidgets to those handlers (``ExplorerApp(explorer).widget``).

Speed: every image and caption of the split is encoded once per model, when the model is first
used (with the evaluation encoders, in eval mode), so ranking a query is one ``score`` call of
the query against the cached image embeddings, and ranking captions for an image one call
against the cached caption shards; caption rankings are memoised per (model, image).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from .errors import ConfigError, DataError
from .models.base import MatchingModel, select
from .viz.maps import PairMaps, VisualContext, encode_query, pairs_for_images

__all__ = ["ExplorerState", "Explorer", "ExplorerApp", "find_checkpoints", "load_models"]

CAPTIONS_PER_IMAGE = 5


@dataclass
class ExplorerState:
    """What the explorer shows now.

    Attributes:
        model, stream: the active model name and alignment stream.
        query: the caption text; query_caption: its index in the split (None for free text);
        query_ids: its token ids; tokens: its words (model positions).
        image_scores: ``(n_images,)`` the query against every image; image_ranking: top-k indices.
        image_scored / caption_scored: how many candidates got the model's full score (the rest:
            first-stage order below them, see ``Explorer(shortlist=...)``).
        image: the picked image; caption_scores: ``(n_captions,)`` that image against every caption;
        caption_ranking: top-k caption indices.
        word: the picked word position (model position) or None.
        pair: maps of (picked image, query) for the active model.
        timings: seconds of the last call of each handler.
    """

    model: str = ""
    stream: str = ""
    query: str = ""
    query_caption: int | None = None
    query_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    image_scores: np.ndarray | None = None
    image_ranking: list[int] = field(default_factory=list)
    image: int | None = None
    caption_scores: np.ndarray | None = None
    caption_ranking: list[int] = field(default_factory=list)
    word: int | None = None
    pair: PairMaps | None = None
    overlays: dict[int, np.ndarray] = field(default_factory=dict)
    image_scored: int = 0
    caption_scored: int = 0
    message: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _ModelCache:
    image_emb: dict[str, Any]
    caption_shards: list[Any]
    caption_rows: dict[int, tuple[np.ndarray, int]] = field(default_factory=dict)
    image_vecs: torch.Tensor | None = None  # (n_images, E) first-stage vectors (None: exact scoring only)
    caption_vecs: torch.Tensor | None = None  # (n_captions, E)


def first_stage_vectors(model: MatchingModel, emb: dict[str, Any], side: str) -> torch.Tensor | None:
    """Unit vectors whose dot products approximate the model's ranking (the first stage of a shortlist).

    The model's own global vectors (``global_image_vectors`` / ``global_text_vectors``: SGRAF's
    and TSHSR's self-attention vectors, HJE's fixed embeddings); else the mean region / mean valid
    word embedding (SHAN); an ensemble concatenates its members' unit vectors, so a dot product
    is the sum of their cosines. None when none of these exists.
    """
    from .models.layers import l2norm, masked_mean

    members = getattr(model, "members", None)
    if members is not None:
        parts = [first_stage_vectors(m, emb[f"m{k}"], side) for k, m in enumerate(members)]
        return None if any(p is None for p in parts) else torch.cat(parts, dim=-1)
    vec = model.global_image_vectors(emb) if side == "image" else model.global_text_vectors(emb)
    if vec is None:
        if side == "image" and "regions" in emb:
            vec = emb["regions"].mean(dim=1)
        elif side == "text" and "words" in emb:
            vec = masked_mean(emb["words"], emb["mask"], dim=1)
        else:
            return None
    return l2norm(vec.float(), dim=-1)


def load_models(checkpoints: Sequence[str | os.PathLike], device: str | torch.device = "cpu", vocab: Any = None,
                add_sgraf: bool = True) -> tuple[dict[str, MatchingModel], Any]:
    """Load checkpoints (files or run folders) as ``{name: model}`` in eval mode, and their vocab.

    Names are the registry names (``tshsr``, ``sgr``, ...; a repeated name gets ``@<run folder>``).
    With both an ``sgr`` and an ``saf`` model, their score-level ensemble is added as ``sgraf``.
    ``vocab`` (e.g. the data's) must equal every checkpoint's stored vocab; without one, the first
    stored vocab is returned.
    """
    from .checkpoint import load_model
    from .models import Ensemble

    if not checkpoints:
        raise ConfigError("pass at least one checkpoint (train one with `thsrn train` or `make demo`)")
    models: dict[str, MatchingModel] = {}
    for path in checkpoints:
        lm = load_model(path, device)
        if lm.vocab is not None:
            if vocab is None:
                vocab = lm.vocab
            elif lm.vocab != vocab:
                raise DataError(f"checkpoint {lm.info.get('path', path)} was trained with another vocab than the "
                                "data's (or the other checkpoints'); use it with the data it was trained on")
        name = lm.model_name if lm.model_name not in models else f"{lm.model_name}@{Path(lm.info.get('path', path)).parent.name}"
        models[name] = lm.model
    if add_sgraf and "sgr" in models and "saf" in models and "sgraf" not in models:
        models["sgraf"] = Ensemble([models["sgr"], models["saf"]], names=["sgr", "saf"]).eval()
    return models, vocab


def find_checkpoints(pattern: str = "runs/*/checkpoint_best.pt") -> list[Path]:
    """Checkpoints matching a glob relative to the project root (sorted)."""
    from .notebook_utils import project_root

    return sorted(project_root().glob(pattern))


class Explorer:
    """State, caches and handlers of the explorer (see the module docstring).

    Args:
        dataset: a :class:`~thsrn_lib.data.PrecompDataset` with a vocab.
        models: ``name -> model`` (or a list, named by ``model.name``); all in eval mode on their device.
        visual: image/box source (default: the dataset's own, :meth:`VisualContext.from_dataset`).
        top_k / caption_k: gallery sizes.
        data_root: folder of the split, to switch splits with :meth:`on_pick_split`.
        shortlist: rank with two stages when a side has more candidates than this: the
            ``shortlist`` candidates nearest in the model's first-stage space
            (:func:`first_stage_vectors`) get the model's full score, the others follow below
            them in first-stage order (as in :mod:`thsrn_lib.evaluation.two_stage`). Cross-attention
            scoring of 2,500 captions costs seconds on a CPU; None always scores everything.
    """

    def __init__(self, dataset: Any, models: Mapping[str, MatchingModel] | Sequence[MatchingModel],
                 visual: VisualContext | None = None, top_k: int = 8, caption_k: int = 10,
                 data_root: str | os.PathLike | None = None, batch_size: int = 256,
                 shortlist: int | None = 300) -> None:
        if not isinstance(models, Mapping):
            models = {getattr(m, "name", "") or f"model{i}": m for i, m in enumerate(models)}
        if not models:
            raise ConfigError("the explorer needs at least one model")
        if getattr(dataset, "vocab", None) is None:
            raise DataError(f"dataset {getattr(dataset, 'root', '?')} has no vocab; free-text queries need one")
        self.models: dict[str, MatchingModel] = dict(models)
        for m in self.models.values():
            m.eval()
        self.dataset = dataset
        self.visual = visual if visual is not None else VisualContext.from_dataset(dataset)
        self.top_k, self.caption_k = int(top_k), int(caption_k)
        self.batch_size = int(batch_size)
        if shortlist is not None and int(shortlist) < max(top_k, caption_k):
            raise ConfigError(f"shortlist ({shortlist}) must be at least the gallery sizes ({max(top_k, caption_k)}) or None")
        self.shortlist = None if shortlist is None else int(shortlist)
        self.data_root = Path(data_root) if data_root is not None else Path(dataset.root)
        self._caches: dict[str, _ModelCache] = {}
        self._pair_key: tuple | None = None
        self._gallery_pairs: list[PairMaps] = []
        self.figures: dict[str, Figure] = {}
        self.state = ExplorerState(model=next(iter(self.models)))
        self.state.stream = self._default_stream()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoints(cls, data_root: str | os.PathLike, split: str, checkpoints: Sequence[str | os.PathLike],
                         device: str | torch.device = "cpu", boxes: Any = None,
                         image_dir: str | os.PathLike | None = None, add_sgraf: bool = True,
                         **kwargs: Any) -> Explorer:
        """Load checkpoints (files or run folders) and a split; ``sgr`` + ``saf`` also give ``sgraf``."""
        from .data import PrecompDataset, Vocab, find_vocab

        if not checkpoints:
            raise ConfigError("pass at least one checkpoint (train one with `thsrn train` or `make demo`)")
        try:
            vocab: Any = Vocab.load(find_vocab(data_root))
        except DataError:
            vocab = None
        models, vocab = load_models(checkpoints, device=device, vocab=vocab, add_sgraf=add_sgraf)
        ds = PrecompDataset(data_root, split, vocab=vocab, image_dir=image_dir)
        visual = VisualContext.from_dataset(ds, boxes=boxes, image_dir=image_dir)
        return cls(ds, models, visual=visual, data_root=data_root, **kwargs)

    # ------------------------------------------------------------------ helpers
    @property
    def model(self) -> MatchingModel:
        return self.models[self.state.model]

    def _default_stream(self) -> str:
        """The first alignment stream the active model exposes (probed on one pair)."""
        pair = pairs_for_images(self.model, self.dataset, [0], self.dataset.caption_ids(0))[0]
        streams = pair.streams
        if self.state.stream in streams:
            return self.state.stream
        return streams[0] if streams else ""

    def streams(self) -> list[str]:
        """Alignment streams of the active model."""
        pair = self.state.pair or pairs_for_images(self.model, self.dataset, [0], self.dataset.caption_ids(0))[0]
        return pair.streams

    def _cache(self) -> _ModelCache:
        name = self.state.model
        if name not in self._caches:
            from .evaluation.engine import encode_images, encode_texts

            model = self.models[name]
            cache = _ModelCache(image_emb=encode_images(model, self.dataset, batch_size=self.batch_size),
                                caption_shards=encode_texts(model, self.dataset, batch_size=self.batch_size))
            with torch.inference_mode():
                cache.image_vecs = first_stage_vectors(model, cache.image_emb, "image")
                parts = [first_stage_vectors(model, sh.emb, "text") for sh in cache.caption_shards]
                if cache.image_vecs is not None and all(p is not None for p in parts):
                    vecs = torch.empty(self.dataset.n_captions, parts[0].shape[1], device=parts[0].device)
                    for sh, p in zip(cache.caption_shards, parts):
                        vecs[sh.position.to(p.device)] = p
                    cache.caption_vecs = vecs
                else:
                    cache.image_vecs = None
            self._caches[name] = cache
        return self._caches[name]

    def warm_up(self) -> dict[str, float]:
        """Encode the split for every model now (seconds per model); handlers are fast afterwards."""
        out = {}
        current = self.state.model
        for name in self.models:
            t0 = time.perf_counter()
            self.state.model = name
            self._cache()
            out[name] = time.perf_counter() - t0
        self.state.model = current
        return out

    def _timed(self, name: str, fn: Callable[[], Figure]) -> Figure:
        t0 = time.perf_counter()
        fig = fn()
        self.state.timings[name] = time.perf_counter() - t0
        return fig

    def _two_stage(self, first: np.ndarray, scored: np.ndarray, full: np.ndarray) -> np.ndarray:
        """Scores where ``scored`` candidates carry the model's score and the rest rank below them
        in first-stage order (their value: below the lowest model score, by first-stage cosine)."""
        out = np.empty(first.shape[0], dtype=np.float32)
        out[scored] = full
        rest = np.setdiff1d(np.arange(first.shape[0]), scored)
        if rest.size:
            floor = float(full.min()) - 1.0
            out[rest] = floor - 1.0 + (first[rest] + 1.0) / 2.5  # cosines in [-1, 1] -> (floor - 1, floor - 0.2]
        return out

    @torch.inference_mode()
    def _score_query(self) -> np.ndarray:
        """``(n_images,)`` the query against every image (two-stage beyond ``shortlist`` images)."""
        cache, model = self._cache(), self.model
        device = next(model.parameters()).device
        ids = torch.tensor([self.state.query_ids], dtype=torch.long, device=device)
        txt = model.encode_texts(ids, torch.tensor([ids.shape[1]], device=device))
        n = self.dataset.n_images
        k = self.shortlist
        if k is None or k >= n or cache.image_vecs is None:
            self.state.image_scored = n
            return model.score(cache.image_emb, txt)[:, 0].float().cpu().numpy()
        q = first_stage_vectors(model, txt, "text")[0]
        first = (cache.image_vecs @ q).float().cpu().numpy()
        keep = np.sort(np.argsort(-first, kind="stable")[:k])
        sub = select(cache.image_emb, torch.from_numpy(keep).to(device))
        full = model.score(sub, txt)[:, 0].float().cpu().numpy()
        self.state.image_scored = k
        return self._two_stage(first, keep, full)

    @torch.inference_mode()
    def _score_image(self, i: int) -> np.ndarray:
        """``(n_captions,)`` image ``i`` against every caption (two-stage beyond ``shortlist``), memoised."""
        cache, model = self._cache(), self.model
        if i not in cache.caption_rows:
            n = self.dataset.n_captions
            img = select(cache.image_emb, slice(i, i + 1))
            k = self.shortlist
            exact = k is None or k >= n or cache.caption_vecs is None
            if exact:
                keep, first = np.arange(n), None
            else:
                first = (cache.caption_vecs @ cache.image_vecs[i]).float().cpu().numpy()
                keep = np.sort(np.argsort(-first, kind="stable")[:k])
            wanted = np.zeros(n, dtype=bool)
            wanted[keep] = True
            row = np.empty(n, dtype=np.float32)
            for shard in cache.caption_shards:
                pos = shard.position.numpy()
                sel = np.flatnonzero(wanted[pos])
                if sel.size == 0:
                    continue
                emb = shard.emb if sel.size == pos.size else select(shard.emb, torch.from_numpy(sel).to(shard.position.device))
                row[pos[sel]] = model.score(img, emb)[0].float().cpu().numpy()
            if not exact:
                row = self._two_stage(first, keep, row[keep])
            cache.caption_rows[i] = (row, int(keep.size))
        row, scored = cache.caption_rows[i]
        self.state.caption_scored = scored
        return row

    def _overlay(self, pair: PairMaps) -> np.ndarray | None:
        """``(R,)`` region weights drawn on a gallery image: the picked word's, else the mean over content words."""
        stream = self.state.stream
        if stream not in pair.display:
            return None
        m = pair.display[stream]
        if self.state.word is not None and self.state.word < m.shape[0]:
            return m[self.state.word]
        rows = pair.content_positions() or list(range(m.shape[0]))
        return m[rows].mean(axis=0)

    def _rank_images(self) -> Figure:
        """Score the query against every image, explain the top-k pairs once, draw the gallery."""
        from .viz.gallery import top_k

        st = self.state
        st.image_scores = self._score_query()
        st.image_ranking = [int(i) for i in top_k(st.image_scores, self.top_k)]
        self._gallery_pairs = pairs_for_images(self.model, self.dataset, st.image_ranking, st.query_ids, st.query,
                                               st.query_caption)
        st.tokens = self._gallery_pairs[0].tokens
        st.image = None
        st.pair = None
        return self._draw_gallery()

    def _draw_gallery(self) -> Figure:
        """The ranked images with the current stream's (and word's) overlay, from the cached pairs."""
        from .viz.gallery import image_gallery

        st = self.state
        st.overlays = {p.image_index: ov for p in self._gallery_pairs if (ov := self._overlay(p)) is not None}
        gt = {st.query_caption // CAPTIONS_PER_IMAGE} if st.query_caption is not None else set()
        note = (f"two-stage: full scores for the {st.image_scored} of {self.dataset.n_images} images nearest in "
                f"{st.model}'s first-stage space" if st.image_scored < self.dataset.n_images else None)
        fig = image_gallery(st.image_scores, self.visual, k=self.top_k, gt=gt, query=st.query,
                            overlays=st.overlays if self.visual.boxes is not None else None, note=note)
        self.figures["images"] = fig
        return fig

    def _ensure_pair(self) -> PairMaps | None:
        """Maps of (picked image, query) for the active model, recomputed only when one of them changed."""
        st = self.state
        if st.image is None or not st.query_ids:
            return None
        key = (st.model, st.image, tuple(st.query_ids))
        if st.pair is None or self._pair_key != key:
            st.pair = pairs_for_images(self.model, self.dataset, [st.image], st.query_ids, st.query,
                                       st.query_caption)[0]
            self._pair_key = key
        return st.pair

    def _pair_figure(self) -> Figure | None:
        from .viz.alignment import pair_attention

        st = self.state
        pair = self._ensure_pair()
        if pair is None:
            return None
        if not pair.word_region:
            st.message = f"{st.model} has no word-region maps"
            return None
        positions = [st.word] if st.word is not None else (pair.content_positions()[:12] or None)
        fig = pair_attention(pair, st.stream, self.visual, positions=positions)
        self.figures["pair"] = fig
        return fig

    # ------------------------------------------------------------------ handlers
    def on_query_text(self, text: str) -> Figure:
        """A free-text caption: tokenise with the split's vocab, rank the images."""
        def run() -> Figure:
            st = self.state
            st.query_ids = encode_query(self.dataset.vocab, text)
            unknown = sum(1 for i in st.query_ids if i == self.dataset.vocab.UNK)
            st.query, st.query_caption, st.word = text, None, None
            st.message = f"{unknown} word(s) not in the vocab (shown as <unk>)" if unknown else ""
            return self._rank_images()

        return self._timed("on_query_text", run)

    def on_pick_caption(self, k: int) -> Figure:
        """A caption of the split: rank the images (its own image is the ground truth)."""
        def run() -> Figure:
            st = self.state
            k_ = int(k)
            if not 0 <= k_ < self.dataset.n_captions:
                raise ConfigError(f"caption index {k_} out of range [0, {self.dataset.n_captions})")
            st.query_ids = self.dataset.caption_ids(k_)
            st.query, st.query_caption, st.word, st.message = self.dataset.captions[k_], k_, None, ""
            return self._rank_images()

        return self._timed("on_pick_caption", run)

    def _draw_captions(self) -> Figure:
        from .viz.gallery import caption_gallery

        st = self.state
        i = st.image
        gt = set(range(CAPTIONS_PER_IMAGE * i, CAPTIONS_PER_IMAGE * (i + 1)))
        fig = caption_gallery(st.caption_scores, self.dataset.captions, k=self.caption_k, gt=gt,
                              image=self.visual.image(i), boxes=self.visual.boxes_of(i),
                              overlay=st.overlays.get(i), title=f"top-{self.caption_k} captions for image {i}" + (
                                  f" (two-stage: {st.caption_scored} of {self.dataset.n_captions} captions fully scored)"
                                  if st.caption_scored < self.dataset.n_captions else ""))
        self.figures["captions"] = fig
        return fig

    def on_pick_image(self, i: int) -> Figure:
        """An image: rank the captions (its 5 captions are the ground truth); with a query, its alignment."""
        from .viz.gallery import top_k

        def run() -> Figure:
            st = self.state
            i_ = int(i)
            if not 0 <= i_ < self.dataset.n_images:
                raise ConfigError(f"image index {i_} out of range [0, {self.dataset.n_images})")
            st.image = i_
            st.caption_scores = self._score_image(i_)
            st.caption_ranking = [int(c) for c in top_k(st.caption_scores, self.caption_k)]
            fig = self._draw_captions()
            self._pair_figure()
            return fig

        return self._timed("on_pick_image", run)

    def on_pick_word(self, pos: int | None) -> Figure:
        """A word of the query (model position; None = all words): its regions on the picked (or best) image."""
        from .viz.alignment import word_to_region

        def run() -> Figure:
            st = self.state
            if not st.query_ids:
                raise ConfigError("pick or type a caption first")
            if pos is not None and not 0 <= int(pos) < len(st.query_ids):
                raise ConfigError(f"word position {pos} out of range [0, {len(st.query_ids)})")
            st.word = None if pos is None else int(pos)
            if st.image is None:
                st.image = st.image_ranking[0] if st.image_ranking else 0
            pair = self._ensure_pair()
            if pair is None or st.stream not in pair.display:
                raise ConfigError(f"{st.model} has no word-region map for stream {st.stream!r}")
            if st.word is None:
                fig = self._pair_figure()
            else:
                fig = word_to_region(pair.display[st.stream], pair.tokens, image=self.visual.image(st.image),
                                     boxes=self.visual.boxes_of(st.image), gt_regions=pair.gt_regions,
                                     positions=[st.word], ncols=1, note=self.visual.missing(st.image),
                                     title=f"{st.stream}: “{pair.tokens[st.word]}” in image {st.image}")
            self.figures["word"] = fig
            return fig

        return self._timed("on_pick_word", run)

    def _refresh(self, rescore: bool) -> Figure:
        """Redraw what is shown, keeping the query, the picked image and word.

        ``rescore``: the model changed, so rankings are recomputed; a stream switch only redraws
        the overlays and the alignment from the cached maps.
        """
        st = self.state
        image, word = st.image, st.word
        if not st.query_ids:
            fig = self.on_pick_image(image) if image is not None else None
            return fig if fig is not None else Figure()
        if rescore:
            fig = self._rank_images()
            st.word = word
            if image is not None:
                self.on_pick_image(image)
            return fig
        fig = self._draw_gallery()
        if image is not None:
            self._pair_figure()
            if "captions" in self.figures and st.caption_scores is not None:
                self._draw_captions()
        return fig

    def on_switch_model(self, name: str) -> Figure:
        """Make ``name`` the active model (its embeddings are computed on first use) and redraw."""
        def run() -> Figure:
            if name not in self.models:
                raise ConfigError(f"unknown model {name!r}; loaded: {list(self.models)}")
            self.state.model = name
            self.state.pair, self._pair_key = None, None  # maps of the previous model
            self.state.stream = self._default_stream()
            return self._refresh(rescore=True)

        return self._timed("on_switch_model", run)

    def on_switch_stream(self, stream: str) -> Figure:
        """Show the ``stream`` alignment (``t2i``, ``i2t``, an ensemble member's, HJE's ``affinity``)."""
        def run() -> Figure:
            available = self.streams()
            if stream not in available:
                raise ConfigError(f"stream {stream!r} not available for {self.state.model}; available: {available}")
            self.state.stream = stream
            return self._refresh(rescore=False)

        return self._timed("on_switch_stream", run)

    def on_pick_split(self, split: str) -> Figure | None:
        """Switch to another split of the same data folder (caches are rebuilt lazily)."""
        from .data import PrecompDataset

        def run() -> Figure:
            ds = PrecompDataset(self.data_root, split, vocab=self.dataset.vocab)
            if ds.num_regions != self.dataset.num_regions or ds.feature_dim != self.dataset.feature_dim:
                raise DataError(f"split {split!r} has features {ds.num_regions} x {ds.feature_dim}, the models expect "
                                f"{self.dataset.num_regions} x {self.dataset.feature_dim}")
            self.dataset = ds
            self.visual = VisualContext.from_dataset(ds)
            self._caches.clear()
            self.figures.clear()
            self.state = ExplorerState(model=self.state.model, stream=self.state.stream)
            return self.on_pick_caption(0)

        return self._timed("on_pick_split", run)


class ExplorerApp:
    """ipywidgets front end of an :class:`Explorer` (``display(ExplorerApp(explorer).widget)``).

    The widgets only call the explorer's handlers and display the figures they return; every
    behaviour lives (and is tested) in :class:`Explorer`.
    """

    def __init__(self, explorer: Explorer, splits: Sequence[str] | None = None) -> None:
        import ipywidgets as w

        self.explorer = ex = explorer
        if splits is None:
            splits = sorted(p.name[: -len("_caps.txt")] for p in Path(ex.data_root).glob("*_caps.txt"))
        self.split = w.Dropdown(options=list(splits) or [ex.dataset.split], value=ex.dataset.split, description="split")
        self.model = w.Dropdown(options=list(ex.models), value=ex.state.model, description="model")
        self.stream = w.ToggleButtons(options=ex.streams() or [""], value=ex.state.stream or None, description="stream")
        self.query = w.Text(placeholder="type a caption, e.g. a red circle left of a blue square",
                            layout=w.Layout(width="60%"))
        self.rank = w.Button(description="rank images", button_style="primary")
        self.caption = w.BoundedIntText(value=0, min=0, max=ex.dataset.n_captions - 1, description="caption #")
        self.use_caption = w.Button(description="use caption")
        self.image = w.BoundedIntText(value=0, min=0, max=ex.dataset.n_images - 1, description="image #")
        self.show_image = w.Button(description="rank captions")
        self.ranked = w.Dropdown(options=[], description="ranked")
        self.words = w.ToggleButtons(options=[], description="word")
        self.status = w.HTML()
        self.out_images, self.out_captions, self.out_pair = w.Output(), w.Output(), w.Output()

        self.rank.on_click(lambda _: self._run(ex.on_query_text, self.query.value, self.out_images))
        self.use_caption.on_click(lambda _: self._run(ex.on_pick_caption, self.caption.value, self.out_images))
        self.show_image.on_click(lambda _: self._run(ex.on_pick_image, self.image.value, self.out_captions))
        self.ranked.observe(self._on_ranked, names="value")
        self.words.observe(self._on_word, names="value")
        self.model.observe(lambda ch: self._run(ex.on_switch_model, ch["new"], self.out_images), names="value")
        self.stream.observe(lambda ch: ch["new"] and self._run(ex.on_switch_stream, ch["new"], self.out_images),
                            names="value")
        self.split.observe(lambda ch: self._run(ex.on_pick_split, ch["new"], self.out_images), names="value")
        self.widget = w.VBox([
            w.HBox([self.split, self.model]), self.stream,
            w.HBox([self.query, self.rank]), w.HBox([self.caption, self.use_caption, self.image, self.show_image]),
            self.status, self.out_images, w.HBox([self.ranked]), self.words, self.out_pair, self.out_captions,
        ])

    def _show(self, out: Any, fig: Figure | None) -> None:
        from IPython.display import clear_output, display

        with out:
            clear_output(wait=True)
            if fig is not None:
                display(fig)

    def _sync(self) -> None:
        st = self.explorer.state
        opts = [(f"#{r + 1} image {i} ({st.image_scores[i]:.3f})", i) for r, i in enumerate(st.image_ranking)] \
            if st.image_scores is not None else []
        self.ranked.unobserve(self._on_ranked, names="value")
        self.ranked.options = opts
        self.ranked.value = st.image if st.image in st.image_ranking else None
        self.ranked.observe(self._on_ranked, names="value")
        self.words.unobserve(self._on_word, names="value")
        self.words.options = [(f"{p}:{t}", p) for p, t in enumerate(st.tokens)]
        self.words.value = st.word
        self.words.observe(self._on_word, names="value")
        streams = self.explorer.streams() or [""]
        if list(self.stream.options) != streams:
            self.stream.options = streams
        timing = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in st.timings.items())
        self.status.value = f"<small>{st.message} {timing}</small>"

    def _run(self, handler: Callable[[Any], Figure | None], value: Any, out: Any) -> None:
        try:
            fig = handler(value)
        except (ConfigError, DataError) as exc:
            self.explorer.state.message = f"⚠ {exc}"
            self._sync()
            return
        self._show(out, fig)
        if handler.__name__ in ("on_pick_image", "on_pick_word", "on_switch_stream", "on_switch_model"):
            self._show(self.out_pair, self.explorer.figures.get("word" if handler.__name__ == "on_pick_word" else "pair"))
        if handler.__name__ in ("on_switch_model", "on_switch_stream") and self.explorer.state.image is not None:
            self._show(self.out_captions, self.explorer.figures.get("captions"))
        self._sync()

    def _on_ranked(self, change: Mapping[str, Any]) -> None:
        if change["new"] is not None:
            self._run(self.explorer.on_pick_image, change["new"], self.out_captions)

    def _on_word(self, change: Mapping[str, Any]) -> None:
        if change["new"] is not None:
            self._run(self.explorer.on_pick_word, change["new"], self.out_pair)
