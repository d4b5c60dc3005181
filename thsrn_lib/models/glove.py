"""Word input shared by SHAN and HJE: learned embeddings, optionally concatenated with frozen GloVe.

SHAN's text side feeds the bi-GRU with ``[GloVe 300-d (frozen); learned 300-d]`` (shan.md §2.1).
GloVe is an external download (assumed ``glove.840B.300d.txt``), so:

- ``word_init="learned"``: the shared :class:`~thsrn_lib.models.encoders.TextEncoder` unchanged;
- ``word_init="glove+learned"``: the same encoder whose ``embed`` is a
  :class:`GloveLearnedEmbedding` (a frozen buffer ``glove (V, Dg)`` beside a learned
  ``nn.Embedding``); the GRU input is ``Dg + word_dim``;
- ``word_init="auto"``: "glove+learned" when a ``glove_path`` is configured, otherwise
  "learned" with a logged warning. The resolved value replaces "auto" in the config, so the
  recorded config always says which one was used.

The GloVe rows are filled from the file by :func:`load_glove` (models call it from
``prepare(train_dataset)``, which knows the word list). They are a *persistent buffer*: a checkpoint
carries the exact vectors it was trained with and reloads without the GloVe file. Words missing
from the file keep zero vectors (shan.md §2.1, [ASSUMED]). Lookup is by exact (lower-case) word.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from .encoders import TextEncoder

__all__ = [
    "WORD_INITS",
    "resolve_word_init",
    "read_glove",
    "GloveLearnedEmbedding",
    "build_text_encoder",
    "load_glove",
]

logger = logging.getLogger(__name__)

WORD_INITS = ("auto", "learned", "glove+learned")


def resolve_word_init(word_init: str, glove_path: str | None, model_name: str) -> str:
    """The concrete word input ("learned" or "glove+learned") for a config's ``word_init``.

    ``"auto"`` -> "glove+learned" if ``glove_path`` is set, else "learned" (logged as a warning,
    never silent). An explicit "glove+learned" without ``glove_path`` is a :class:`ConfigError`.
    """
    if word_init not in WORD_INITS:
        raise ConfigError(f"{model_name}: unknown word_init {word_init!r}; choose one of {WORD_INITS}")
    if word_init == "auto":
        if glove_path:
            return "glove+learned"
        logger.warning(
            "%s: no glove_path configured, so the word input is learned embeddings only "
            "(word_init='learned') instead of the spec's frozen GloVe + learned; set glove_path to a "
            "GloVe text file (e.g. glove.840B.300d.txt) to use it. The config records word_init='learned'.",
            model_name,
        )
        return "learned"
    if word_init == "glove+learned" and not glove_path:
        raise ConfigError(
            f"{model_name}: word_init='glove+learned' needs glove_path (a GloVe text file such as "
            "glove.840B.300d.txt); set it, or use word_init='learned'"
        )
    return word_init


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


_DIM_PROBE_LINES = 20


def _probe_dim(head: list[str], path: Path) -> int:
    """Vector size of a GloVe file from its first lines: a word2vec header, else the most common field count.

    The most common count (not the first line's) tolerates the rare tokens that contain spaces.
    """
    lines = [ln.rstrip() for ln in head if ln.strip()]
    if not lines:
        raise DataError(f"GloVe file {path} is empty")
    first = lines[0].split(" ")
    if len(first) == 2 and all(f.isdigit() for f in first):
        return int(first[1])  # word2vec-style header "count dim"
    counts = Counter(len(ln.split(" ")) - 1 for ln in lines)
    file_dim = counts.most_common(1)[0][0]
    if file_dim < 1:
        raise DataError(f"GloVe file {path}: expected lines 'word v1 ... vd', got {lines[0][:80]!r}")
    return file_dim


def read_glove(path: str | os.PathLike, words: Sequence[str], dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Vectors of ``words`` from a GloVe text file (``word v1 ... vd`` per line, optionally ``.gz``).

    Returns ``(vectors (V, d) float32, found (V,) bool)``; rows of words absent from the file are
    zero. Only the requested words are parsed, so a 5 GB file streams in seconds. A first line of
    two integers (word2vec header) is skipped. Lines whose token contains spaces (a few in
    glove.840B) cannot match a vocabulary word and are skipped.

    Raises :class:`DataError` (naming the file) if it is missing, has the wrong dimension, holds
    a non-numeric value for a requested word, or contains none of the words.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"GloVe file {path} not found; download GloVe (e.g. glove.840B.300d.zip from "
            "https://nlp.stanford.edu/projects/glove/), unzip it and set glove_path to the .txt file, "
            "or use word_init='learned'"
        )
    wanted: dict[str, int] = {}
    for i, w in enumerate(words):
        wanted.setdefault(w, i)
    rows: dict[int, np.ndarray] = {}
    with _open_text(path) as fh:
        head = list(itertools.islice(fh, _DIM_PROBE_LINES))
        file_dim = _probe_dim(head, path)
        if dim is not None and file_dim != dim:
            raise DataError(
                f"GloVe file {path} has {file_dim}-d vectors but the model expects glove_dim={dim}; "
                "set glove_dim to match the file or use a file of that dimension"
            )
        for lineno, line in enumerate(itertools.chain(head, fh), 1):
            word, _, rest = line.rstrip().partition(" ")
            idx = wanted.get(word)
            if idx is None or idx in rows:
                continue
            values = rest.split(" ")
            if len(values) != file_dim:
                continue  # the token of this line has spaces (or it is the header); it is not `word`
            try:
                rows[idx] = np.asarray(values, dtype=np.float32)
            except ValueError:
                raise DataError(
                    f"GloVe file {path}, line {lineno}: non-numeric value in the vector of {word!r}"
                ) from None
    if words and not rows:
        raise DataError(
            f"GloVe file {path} contains none of the {len(words)} vocabulary words; is it a GloVe text file "
            "('word v1 ... vd' per line) for the same language and casing?"
        )
    vectors = torch.zeros(len(words), file_dim)
    found = torch.zeros(len(words), dtype=torch.bool)
    if rows:
        index = torch.tensor(sorted(rows), dtype=torch.long)
        vectors[index] = torch.from_numpy(np.stack([rows[i] for i in index.tolist()]))
        found[index] = True
    return vectors, found


class GloveLearnedEmbedding(nn.Module):
    """``ids (N, L) -> (N, L, Dg + Dl)``: a frozen GloVe row followed by a learned row.

    ``glove`` is a buffer (never trained, saved in the state dict); ``learned`` is an
    ``nn.Embedding`` initialised ``U(-0.1, 0.1)``. Until vectors are loaded (:meth:`load_vectors`
    or ``load_state_dict``) the forward raises: a zero GloVe half would silently change the model.
    """

    def __init__(self, vocab_size: int, glove_dim: int, learned_dim: int) -> None:
        super().__init__()
        self.learned = nn.Embedding(vocab_size, learned_dim)
        nn.init.uniform_(self.learned.weight, -0.1, 0.1)
        self.register_buffer("glove", torch.zeros(vocab_size, glove_dim))
        self.register_buffer("glove_loaded", torch.zeros((), dtype=torch.bool))
        self._loaded = False  # host-side copy of glove_loaded: no device sync per forward

    @property
    def weight(self) -> Tensor:
        """The learned table (``TextEncoder.device`` reads ``embed.weight``)."""
        return self.learned.weight

    @property
    def is_loaded(self) -> bool:
        return self._loaded

    @torch.no_grad()
    def load_vectors(self, vectors: Tensor) -> None:
        """Copy ``(V, Dg)`` GloVe vectors into the frozen half."""
        if tuple(vectors.shape) != tuple(self.glove.shape):
            raise ConfigError(
                f"GloVe vectors of shape {tuple(vectors.shape)} do not fit the frozen table {tuple(self.glove.shape)}"
            )
        self.glove.copy_(vectors)
        self.glove_loaded.fill_(True)
        self._loaded = True

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._loaded = bool(self.glove_loaded)

    def forward(self, ids: Tensor) -> Tensor:
        if not self._loaded:
            raise ConfigError(
                "the frozen GloVe half of the word embedding is empty: call model.prepare(train_dataset) "
                "(reads glove_path for the dataset's vocab) or load a checkpoint trained with GloVe"
            )
        return torch.cat([self.glove[ids], self.learned(ids)], dim=-1)

    def extra_repr(self) -> str:
        return f"glove_dim={self.glove.shape[1]}, learned_dim={self.learned.embedding_dim}, loaded={self._loaded}"


def build_text_encoder(cfg: Any) -> TextEncoder:
    """The shared :class:`TextEncoder` for a config with ``word_init`` ("learned" / "glove+learned").

    For "glove+learned" the encoder's ``embed`` is swapped for a :class:`GloveLearnedEmbedding`
    and its GRU reads ``glove_dim + word_dim`` inputs; the encoder code itself is unchanged.
    """
    glove = cfg.word_init == "glove+learned"
    in_dim = cfg.word_dim + (cfg.glove_dim if glove else 0)
    enc = TextEncoder(cfg.vocab_size, in_dim, cfg.embed_size, cfg.num_layers, cfg.bi_gru, cfg.no_txtnorm, cfg.dropout)
    if glove:
        enc.embed = GloveLearnedEmbedding(cfg.vocab_size, cfg.glove_dim, cfg.word_dim)
    return enc


def load_glove(encoder: TextEncoder, path: str | os.PathLike, words: Sequence[str]) -> dict[str, float]:
    """Fill the frozen GloVe half of ``encoder`` for ``words`` (the vocab in id order).

    Returns ``{"found": n, "total": V, "coverage": n / V}`` (also logged).
    """
    embed = encoder.embed
    if not isinstance(embed, GloveLearnedEmbedding):
        raise ConfigError("this text encoder has no GloVe half (word_init='learned'); nothing to load")
    if len(words) != embed.glove.shape[0]:
        raise ConfigError(
            f"the vocab has {len(words)} words but the model was built with vocab_size={embed.glove.shape[0]}; "
            "set vocab_size to the vocab's size"
        )
    vectors, found = read_glove(path, words, dim=embed.glove.shape[1])
    embed.load_vectors(vectors.to(embed.glove.device))
    n = int(found.sum())
    logger.info(
        "GloVe %s: %d of %d vocabulary words found (%.1f%%); the rest are zero",
        path,
        n,
        len(words),
        100 * n / max(len(words), 1),
    )
    return {"found": float(n), "total": float(len(words)), "coverage": n / max(len(words), 1)}
