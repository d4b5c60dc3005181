"""Word vocabulary in the SCAN vocab JSON layout.

File layout (the one shipped with SCAN/SGRAF)::

    {"idx2word": {"0": "<pad>", "1": "<start>", ...},   # keys are decimal *strings*
     "word2idx": {"<pad>": 0, "<start>": 1, ...},
     "idx": V}

Ids are contiguous ``0..V-1``, the two maps are inverses, and the specials sit at
``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3. The key order of the shipped
``word2idx`` is not id order, so the loader never relies on key order.

The word order of the official vocabs is effectively arbitrary (dictionary iteration order
when they were built), so a checkpoint trained on one must be used with that exact file.
:meth:`Vocab.build` makes a new vocab for new data with a deterministic order instead.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from thsrn_lib.data.tokenizer import tokenize
from thsrn_lib.errors import DataError
from thsrn_lib.utils.io import atomic_write_json

__all__ = ["Vocab", "SPECIAL_TOKENS"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<start>", "<end>", "<unk>")


class Vocab:
    """An id <-> word mapping with SCAN's four special tokens at ids 0..3.

    Args:
        words: every word in id order, the specials first (``words[i]`` has id ``i``).

    Attributes:
        idx2word: ``list[str]``; ``idx2word[i]`` is the word with id ``i``.
        word2idx: ``dict[str, int]``, the inverse map. Treat both as read-only.
    """

    PAD = 0
    START = 1
    END = 2
    UNK = 3

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        self._check_words(words, source="Vocab(words)")
        self.idx2word: list[str] = words
        self.word2idx: dict[str, int] = {w: i for i, w in enumerate(words)}

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _check_words(words: list[str], source: str) -> None:
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise DataError(
                f"{source}: the first ids must be the specials {list(SPECIAL_TOKENS)} (ids 0..3), "
                f"got {words[:4]}; rebuild the vocab with Vocab.build or fix the file"
            )
        bad = [w for w in words if not isinstance(w, str) or not w]
        if bad:
            raise DataError(f"{source}: every word must be a non-empty string, got {bad[:3]!r}")
        if len(set(words)) != len(words):
            dups = [w for w, c in Counter(words).items() if c > 1]
            raise DataError(f"{source}: duplicate words {dups[:5]!r}; every word must have exactly one id")

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> Vocab:
        """Build a vocab from raw captions (the library's deterministic builder).

        Tokens are counted with :func:`~thsrn_lib.data.tokenizer.tokenize`; words with
        ``count >= min_count`` are kept (SCAN uses 4 over the train + dev captions). Order:
        the 4 specials, then words by descending count, ties broken alphabetically, so the
        result does not depend on the order of ``captions``.
        """
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be a positive int, got {min_count!r}")
        if isinstance(captions, str):
            raise TypeError("Vocab.build expects an iterable of captions, not a single string")
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        for special in SPECIAL_TOKENS:  # cannot come out of the Treebank tokenizer, but be safe
            counts.pop(special, None)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIAL_TOKENS) + kept)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "vocab dict") -> Vocab:
        """Build from the SCAN layout (as produced by :meth:`to_dict` or read from JSON).

        Every inconsistency raises :class:`DataError` naming ``source`` and the problem.
        """
        if not isinstance(data, Mapping):
            raise DataError(f"{source}: expected a JSON object with idx2word/word2idx/idx, got {type(data).__name__}")
        missing = [k for k in ("idx2word", "word2idx", "idx") if k not in data]
        if missing:
            raise DataError(
                f"{source}: missing key(s) {missing}; a SCAN vocab JSON has 'idx2word' (string keys), "
                "'word2idx' and 'idx' (the size)"
            )
        idx2word, word2idx, size = data["idx2word"], data["word2idx"], data["idx"]
        if not isinstance(idx2word, Mapping) or not isinstance(word2idx, Mapping):
            raise DataError(f"{source}: 'idx2word' and 'word2idx' must both be JSON objects")
        if isinstance(size, bool) or not isinstance(size, int):
            raise DataError(f"{source}: 'idx' must be an integer (the vocab size), got {size!r}")

        by_id: dict[int, str] = {}
        for key, word in idx2word.items():
            # JSON object keys are strings; torch.load/dicts may also carry ints.
            if isinstance(key, int) and not isinstance(key, bool):
                i = key
            elif isinstance(key, str) and key.isdecimal():
                i = int(key)
            else:
                raise DataError(f"{source}: idx2word key {key!r} is not a non-negative integer id")
            if not isinstance(word, str):
                raise DataError(f"{source}: idx2word[{key!r}] is {word!r}, expected a word string")
            by_id[i] = word
        n = len(by_id)
        if sorted(by_id) != list(range(n)):
            gaps = sorted(set(range(n)) - set(by_id))[:5]
            raise DataError(f"{source}: idx2word ids are not contiguous 0..{n - 1} (missing e.g. {gaps})")
        if size != n:
            raise DataError(f"{source}: 'idx' is {size} but idx2word has {n} entries; they must be equal")
        if len(word2idx) != n:
            raise DataError(f"{source}: word2idx has {len(word2idx)} entries but idx2word has {n}")
        words = [by_id[i] for i in range(n)]
        for word, i in word2idx.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n or words[i] != word:
                raise DataError(
                    f"{source}: word2idx[{word!r}] = {i!r} does not match idx2word; the two maps must be inverses"
                )
        cls._check_words(words, source)
        return cls(words)

    def to_dict(self) -> dict[str, Any]:
        """The SCAN layout as plain dicts/ints/strings (JSON-able, ``torch.load(weights_only=True)``-safe)."""
        return {
            "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
            "word2idx": {w: i for i, w in enumerate(self.idx2word)},
            "idx": len(self.idx2word),
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Read a SCAN vocab JSON (e.g. ``f30k_precomp_vocab.json``) and validate its layout."""
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"vocab file {path} not found; the official vocabs ship with SCAN/SGRAF (vocab/<data_name>_vocab.json), "
                "or build one with Vocab.build(train + dev captions).save(path)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"vocab file {path} is not valid UTF-8 JSON: {exc}") from exc
        return cls.from_dict(data, source=f"vocab file {path}")

    def save(self, path: str | os.PathLike) -> None:
        """Write the SCAN JSON layout atomically (readable by :meth:`load` and the official code)."""
        atomic_write_json(path, self.to_dict())

    # ------------------------------------------------------------------ mapping
    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self.idx2word == other.idx2word

    __hash__ = None  # type: ignore[assignment]  # equality is by content; vocabs are not dict keys

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)})"

    def encode_tokens(self, tokens: Iterable[str]) -> list[int]:
        """``[<start>] + ids + [<end>]``; tokens not in the vocab map to ``<unk>``."""
        get = self.word2idx.get
        return [self.START, *(get(t, self.UNK) for t in tokens), self.END]

    def encode(self, caption: str) -> list[int]:
        """Tokenize a raw caption and map it to ids, ``<start>``/``<end>`` included."""
        return self.encode_tokens(tokenize(caption))

    def tokens(self, ids: Any) -> list[str]:
        """Map ids (a sequence, 1-D array or tensor) to words, one per position, specials kept.

        Use this where positions matter, e.g. to label attention maps.
        """
        values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if values and isinstance(values[0], list):
            raise ValueError("Vocab.tokens expects a 1-D sequence of ids; index the batch first")
        n = len(self.idx2word)
        out = []
        for i in values:
            if not 0 <= i < n:
                raise ValueError(f"id {i} is outside this vocab (size {n})")
            out.append(self.idx2word[i])
        return out

    def decode(self, ids: Any, strip_special: bool = True) -> str:
        """Ids back to a space-joined string of tokens.

        With ``strip_special`` the ``<pad>``, ``<start>`` and ``<end>`` tokens are dropped;
        ``<unk>`` is kept because it stands for a real word. Use :meth:`tokens` for a list.
        """
        words = self.tokens(ids)
        if strip_special:
            drop = {SPECIAL_TOKENS[self.PAD], SPECIAL_TOKENS[self.START], SPECIAL_TOKENS[self.END]}
            words = [w for w in words if w not in drop]
        return " ".join(words)
