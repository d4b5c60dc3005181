"""Concept vocabularies and lexical similarity labels (HJE's supervision of the local space).

A *concept* is a normalised content word of a caption: ``"dogs"`` -> ``"dog"``. The default
extractor (``"rules"``) works offline: keep alphabetic tokens, drop the shipped stop words
(:mod:`thsrn_lib.text.stopwords`), fold plurals with suffix rules (reconstruction spec
``hje.md`` §4.3). ``"wordnet"`` and ``"spacy"`` need downloaded data and fail with a
:class:`~thsrn_lib.errors.ConfigError` when it is missing; they never fall back silently.

Every extractor maps **each token on its own** (context-free). That is what lets a model recover
a caption's concept set from its word ids through one lookup table (vocab id -> concept id), so
labels computed at training time from ids equal the ones computed here from text.

Sets become multi-hot rows ``h`` over the K concepts, and set sizes become matrix products:
``|K(I) ∩ K(T)| = h_I · h_T`` (:func:`label_matrix`).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .stopwords import ENGLISH_STOP_WORDS

__all__ = [
    "EXTRACTORS",
    "LABEL_MODES",
    "ConceptExtractor",
    "RulesExtractor",
    "WordNetExtractor",
    "SpacyExtractor",
    "ConceptVocab",
    "normalize_plural",
    "rules_concept",
    "extract_concepts",
    "get_extractor",
    "ids_to_multi_hot",
    "label_matrix",
    "vocab_words",
]

EXTRACTORS = ("rules", "wordnet", "spacy")
LABEL_MODES = ("coverage", "jaccard")

# "a letter, then letters or hyphens" (tokens are already lower-cased by the tokenizer).
_ALPHABETIC = re.compile(r"[a-z][a-z-]*")
# Shortest stem a plural rule may leave: keeps "gas" or "bus"-like short words from collapsing
# to one letter (an edge case the spec leaves open).
_MIN_STEM = 2


# ---------------------------------------------------------------------------------------- rules
def normalize_plural(word: str) -> str:
    """Fold an English plural to its singular with the suffix rules of ``hje.md`` §4.3.

    1. ``-ies`` -> ``-y`` for words longer than 4 letters (``puppies`` -> ``puppy``; ``ties``
       falls through to rule 3 -> ``tie``);
    2. ``-ses -xes -zes -ches -shes`` -> drop ``es`` (``boxes`` -> ``box``, ``glasses`` -> ``glass``);
    3. otherwise drop a final ``s`` unless the word ends in ``ss``, ``us`` or ``is``.

    The rules are deliberately simple and sometimes wrong (``horses`` -> ``hors``); they are
    consistent, which is what the labels need. A rule that would leave fewer than 2 letters
    is not applied.
    """
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ses", "xes", "zes", "ches", "shes")) and len(word) - 2 >= _MIN_STEM:
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) - 1 >= _MIN_STEM:
        return word[:-1]
    return word


@functools.lru_cache(maxsize=1 << 16)
def rules_concept(token: str) -> str | None:
    """The concept of one token under the offline rules, or None (not alphabetic, or a stop word).

    Tokens are lower-cased first (the tokenizer already does this for captions).
    """
    token = token.lower()
    if _ALPHABETIC.fullmatch(token) is None or token in ENGLISH_STOP_WORDS:
        return None
    concept = normalize_plural(token)
    return None if concept in ENGLISH_STOP_WORDS else concept


class ConceptExtractor(Protocol):
    """Maps tokens one by one to concepts (None = no concept). ``name`` is recorded with the vocab."""

    name: str

    def __call__(self, tokens: Sequence[str]) -> list[str | None]: ...


class RulesExtractor:
    """The offline default: alphabetic filter, shipped stop words, plural suffix rules."""

    name = "rules"

    def __call__(self, tokens: Sequence[str]) -> list[str | None]:
        return [rules_concept(t) for t in tokens]


_POS_CODES = ("n", "v", "a")


def _check_pos(pos: Sequence[str]) -> tuple[str, ...]:
    pos = tuple(pos)
    if not pos or any(p not in _POS_CODES for p in pos):
        raise ConfigError(
            f"concept POS classes must be a non-empty subset of {_POS_CODES} (noun, verb, adjective), got {pos}"
        )
    return pos


class WordNetExtractor:
    """WordNet lemmatisation plus a POS filter (needs NLTK's ``wordnet`` corpus, downloaded separately).

    Context-free: a token is kept if, after the alphabetic and stop-word filters, its WordNet
    lemma has a sense in one of the allowed classes ``pos`` (tried in order; nouns by default).
    """

    name = "wordnet"

    def __init__(self, pos: Sequence[str] = ("n",)) -> None:
        self.pos = _check_pos(pos)
        if importlib.util.find_spec("nltk") is None:
            raise ConfigError(
                "concept_extractor='wordnet' needs the nltk package; install it or use concept_extractor='rules'"
            )
        import nltk

        try:
            nltk.data.find("corpora/wordnet")
        except LookupError:
            try:
                nltk.data.find("corpora/wordnet.zip")
            except LookupError:
                raise ConfigError(
                    "concept_extractor='wordnet' needs NLTK's WordNet corpus, which is not installed "
                    "(nltk.data.find('corpora/wordnet') failed). Install it with "
                    "`python -m nltk.downloader wordnet` or use concept_extractor='rules' (offline)."
                ) from None
        from nltk.corpus import wordnet
        from nltk.stem import WordNetLemmatizer

        self._wn = wordnet
        self._lemmatizer = WordNetLemmatizer()
        self._cache: dict[str, str | None] = {}

    def _one(self, token: str) -> str | None:
        if token in self._cache:
            return self._cache[token]
        out = None
        word = token.lower()
        if _ALPHABETIC.fullmatch(word) is not None and word not in ENGLISH_STOP_WORDS:
            for p in self.pos:
                lemma = self._lemmatizer.lemmatize(word, pos=p)
                if lemma not in ENGLISH_STOP_WORDS and self._wn.synsets(lemma, pos=p):
                    out = lemma
                    break
        self._cache[token] = out
        return out

    def __call__(self, tokens: Sequence[str]) -> list[str | None]:
        return [self._one(t) for t in tokens]


class SpacyExtractor:
    """spaCy lemmas plus a POS filter (needs the ``spacy`` package and a downloaded pipeline).

    Context-free like the other extractors: each distinct token is tagged on its own.
    """

    name = "spacy"
    _SPACY_POS = {"n": ("NOUN", "PROPN"), "v": ("VERB",), "a": ("ADJ",)}

    def __init__(self, pos: Sequence[str] = ("n",), model: str = "en_core_web_sm") -> None:
        self.pos = _check_pos(pos)
        if importlib.util.find_spec("spacy") is None:
            raise ConfigError(
                "concept_extractor='spacy' needs the spacy package, which is not installed; "
                "install spacy and a pipeline (`python -m spacy download en_core_web_sm`) "
                "or use concept_extractor='rules' (offline)"
            )
        import spacy

        try:
            self._nlp = spacy.load(model, disable=["parser", "ner"])
        except OSError as exc:
            raise ConfigError(
                f"concept_extractor='spacy' needs the spaCy pipeline {model!r}, which is not installed "
                f"({exc}); run `python -m spacy download {model}` or use concept_extractor='rules'"
            ) from None
        self._allowed = {tag for p in self.pos for tag in self._SPACY_POS[p]}
        self._cache: dict[str, str | None] = {}

    def __call__(self, tokens: Sequence[str]) -> list[str | None]:
        todo = sorted({t for t in tokens if t not in self._cache})
        for token, doc in zip(todo, self._nlp.pipe(todo)):
            out = None
            if _ALPHABETIC.fullmatch(token) is not None and token not in ENGLISH_STOP_WORDS and len(doc) == 1:
                tok = doc[0]
                lemma = tok.lemma_.lower()
                if tok.pos_ in self._allowed and lemma and lemma not in ENGLISH_STOP_WORDS:
                    out = lemma
            self._cache[token] = out
        return [self._cache[t] for t in tokens]


def get_extractor(name: str | ConceptExtractor = "rules", pos: Sequence[str] = ("n",)) -> ConceptExtractor:
    """The extractor called ``name`` (``"rules"``, ``"wordnet"``, ``"spacy"``); an extractor object passes through.

    Raises :class:`ConfigError` when the extractor's package or data are missing.
    """
    if not isinstance(name, str):
        return name
    if name == "rules":
        return RulesExtractor()
    if name == "wordnet":
        return WordNetExtractor(pos)
    if name == "spacy":
        return SpacyExtractor(pos)
    raise ConfigError(f"unknown concept extractor {name!r}; choose one of {EXTRACTORS}")


def _as_tokens(caption: str | Sequence[str]) -> Sequence[str]:
    if isinstance(caption, str):
        from ..data.tokenizer import tokenize  # local import: keeps this module light

        return tokenize(caption)
    return caption


def extract_concepts(tokens: str | Sequence[str], extractor: str | ConceptExtractor = "rules") -> list[str]:
    """Distinct concepts of one caption, in order of first occurrence.

    ``tokens`` is a token list (as from :func:`thsrn_lib.data.tokenizer.tokenize`) or a raw
    caption string, which is tokenised first.

    >>> extract_concepts(["a", "dog", "runs", "past", "two", "puppies", "on", "the", "grass", "."])
    ['dog', 'run', 'two', 'puppy', 'grass']
    """
    ext = get_extractor(extractor)
    seen: dict[str, None] = {}
    for concept in ext(list(_as_tokens(tokens))):
        if concept is not None:
            seen.setdefault(concept, None)
    return list(seen)


# ----------------------------------------------------------------------------------- vocabulary
def vocab_words(vocab: Any) -> list[str]:
    """Words in id order from a :class:`~thsrn_lib.data.vocab.Vocab`, an ``idx2word`` list/dict, or a list."""
    table = getattr(vocab, "idx2word", vocab)
    if isinstance(table, Mapping):
        by_id = {int(k): w for k, w in table.items()}
        if sorted(by_id) != list(range(len(by_id))):
            raise DataError(
                "vocab idx2word ids are not contiguous 0..V-1; load the vocab with thsrn_lib.data.vocab.Vocab.load"
            )
        return [by_id[i] for i in range(len(by_id))]
    if isinstance(table, Sequence) and not isinstance(table, str):
        return list(table)
    raise DataError(f"cannot read the words of a vocab of type {type(vocab).__name__}; expected a Vocab or idx2word")


class ConceptVocab:
    """The K concepts kept from a training corpus, with ids ``0..K-1``.

    Build with :meth:`build`. Attributes: ``concepts`` (list, id order), ``index`` (concept -> id),
    ``counts`` (captions containing each concept), ``extractor`` (name), ``min_captions``.
    """

    def __init__(
        self,
        concepts: Sequence[str],
        counts: Sequence[int] | None = None,
        extractor: str = "rules",
        min_captions: int = 1,
    ) -> None:
        self.concepts: list[str] = list(concepts)
        if len(set(self.concepts)) != len(self.concepts):
            raise DataError("ConceptVocab: duplicate concepts")
        self.index: dict[str, int] = {c: i for i, c in enumerate(self.concepts)}
        self.counts: list[int] = list(counts) if counts is not None else [0] * len(self.concepts)
        self.extractor = extractor
        self.min_captions = min_captions

    @classmethod
    def build(
        cls,
        captions: Iterable[str | Sequence[str]],
        min_captions: int = 5,
        extractor: str | ConceptExtractor = "rules",
        pos: Sequence[str] = ("n",),
    ) -> ConceptVocab:
        """Concepts occurring in at least ``min_captions`` captions (each caption counts once).

        ``captions``: raw strings (tokenised here) or token lists. Order: descending count, ties
        alphabetical, so the result does not depend on caption order.
        """
        if isinstance(min_captions, bool) or not isinstance(min_captions, int) or min_captions < 1:
            raise ConfigError(f"min_captions must be a positive int, got {min_captions!r}")
        if isinstance(captions, str):
            raise TypeError("ConceptVocab.build expects an iterable of captions, not one string")
        ext = get_extractor(extractor, pos)
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update({c for c in ext(list(_as_tokens(caption))) if c is not None})
        kept = sorted((c for c, n in counts.items() if n >= min_captions), key=lambda c: (-counts[c], c))
        return cls(kept, [counts[c] for c in kept], extractor=ext.name, min_captions=min_captions)

    def __len__(self) -> int:
        return len(self.concepts)

    def __repr__(self) -> str:
        return f"ConceptVocab(K={len(self)}, extractor={self.extractor!r}, min_captions={self.min_captions})"

    def token_map(self, words: Sequence[str], extractor: str | ConceptExtractor | None = None) -> Tensor:
        """``(V,)`` long: concept id of each word (e.g. a word vocab in id order), -1 where none.

        Uses the vocab's own extractor unless another is given.
        """
        ext = get_extractor(extractor if extractor is not None else self.extractor)
        get = self.index.get
        return torch.tensor([-1 if c is None else get(c, -1) for c in ext(list(words))], dtype=torch.long)

    def caption_ids(self, caption: str | Sequence[str], extractor: str | ConceptExtractor | None = None) -> list[int]:
        """Sorted concept ids of one caption (concepts outside the vocab are dropped)."""
        ext = extractor if extractor is not None else self.extractor
        return sorted({self.index[c] for c in extract_concepts(caption, ext) if c in self.index})

    def multi_hot(
        self,
        captions: Sequence[str | Sequence[str]],
        sparse: bool = False,
        extractor: str | ConceptExtractor | None = None,
    ) -> Tensor:
        """``(N, K)`` multi-hot rows of ``captions``: dense bool, or a sparse COO float matrix."""
        rows: list[int] = []
        cols: list[int] = []
        for n, caption in enumerate(captions):
            ids = self.caption_ids(caption, extractor)
            rows.extend([n] * len(ids))
            cols.extend(ids)
        index = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
        shape = (len(captions), len(self))
        if sparse:
            return torch.sparse_coo_tensor(index, torch.ones(index.shape[1]), shape, check_invariants=True).coalesce()
        out = torch.zeros(shape, dtype=torch.bool)
        out[index[0], index[1]] = True
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able)."""
        return {
            "concepts": list(self.concepts),
            "counts": list(self.counts),
            "extractor": self.extractor,
            "min_captions": self.min_captions,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConceptVocab:
        try:
            return cls(
                data["concepts"], data.get("counts"), data.get("extractor", "rules"), data.get("min_captions", 1)
            )
        except (KeyError, TypeError) as exc:
            raise DataError(
                f"not a ConceptVocab dict ({exc}); expected keys concepts, counts, extractor, min_captions"
            ) from exc


# --------------------------------------------------------------------------------------- labels
def ids_to_multi_hot(concept_ids: Tensor, num_concepts: int, mask: Tensor | None = None) -> Tensor:
    """``(N, L)`` concept ids (-1 = none) -> ``(N, K)`` bool multi-hot; ``mask (N, L)`` drops positions."""
    ids = concept_ids.long()
    keep = ids >= 0 if mask is None else (ids >= 0) & mask
    # Scatter into one spare column K that collects every "no concept" position, then drop it.
    target = torch.where(keep, ids, torch.full_like(ids, num_concepts))
    out = torch.zeros(ids.shape[0], num_concepts + 1, dtype=torch.bool, device=ids.device)
    out.scatter_(1, target, True)
    return out[:, :num_concepts]


def label_matrix(h_img: Tensor, h_txt: Tensor, mode: str = "coverage", positives: Tensor | None = None) -> Tensor:
    """Lexical labels ``Y (Bi, Bt)`` in [0, 1] from multi-hot rows ``h_img (Bi, K)``, ``h_txt (Bt, K)``.

    - ``"coverage"``: ``|K(I) ∩ K(T)| / |K(T)|``;
    - ``"jaccard"``: ``|K(I) ∩ K(T)| / |K(I) ∪ K(T)|`` (symmetric in its two arguments).

    Where the denominator is 0 (empty ``K(T)``, or two empty sets for Jaccard) the label is
    ``positives[a, b]`` (bool ``(Bi, Bt)``: ground-truth pairs get 1) or 0 without ``positives``.
    Sparse inputs are densified. Computed in float32 (counts are exact there up to 2^24).
    """
    if mode not in LABEL_MODES:
        raise ConfigError(f"unknown label mode {mode!r}; choose one of {LABEL_MODES}")
    if h_img.dim() != 2 or h_txt.dim() != 2 or h_img.shape[1] != h_txt.shape[1]:
        raise ValueError(
            f"label_matrix needs (Bi, K) and (Bt, K) multi-hots, got {tuple(h_img.shape)} and {tuple(h_txt.shape)}"
        )
    a = (h_img.to_dense() if h_img.is_sparse else h_img).float()
    b = (h_txt.to_dense() if h_txt.is_sparse else h_txt).float()
    inter = a @ b.T
    size_t = b.sum(1).unsqueeze(0)
    if mode == "coverage":
        den = size_t.expand_as(inter)
    else:
        den = a.sum(1).unsqueeze(1) + size_t - inter
    y = inter / den.clamp_min(1.0)
    empty = den == 0
    fill = positives.to(y.dtype) if positives is not None else torch.zeros_like(y)
    return torch.where(empty, fill, y)
