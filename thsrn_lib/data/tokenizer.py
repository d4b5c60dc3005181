"""Caption tokenizer: the offline equivalent of the SCAN/SGRAF text pipeline.

The official pipeline lower-cases the caption bytes (ASCII letters only) and runs NLTK's
``word_tokenize``, i.e. Punkt sentence splitting followed by the Treebank-style word
tokenizer. Punkt needs a separately downloaded model, so the library applies the Treebank
word tokenizer to the whole caption instead (``word_tokenize(text, preserve_line=True)``).
The two agree on every caption Punkt keeps as one sentence; they differ only where a period
glued to a word ends an inner sentence (``"a shirt. a dog ."``: official ``shirt``, ``.``;
here ``shirt.``).

NLTK versions may differ on non-ASCII quotes (F30K dev line 122, ``they’re``); the
``nltk`` version is pinned in ``pyproject.toml`` and the behaviour is checked by a test.
"""
from __future__ import annotations

import string

from nltk.tokenize import NLTKWordTokenizer

__all__ = ["tokenize", "lower_ascii"]

# str.lower() would also fold non-ASCII letters; the official code lower-cases raw bytes,
# which touches A-Z only.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)

# The Treebank tokenizer holds only compiled regexes and keeps no state between calls,
# so one shared instance is safe (also across threads).
_TREEBANK = NLTKWordTokenizer()


def lower_ascii(text: str) -> str:
    """Lower-case the ASCII letters A-Z and leave every other character unchanged."""
    return text.translate(_ASCII_LOWER)


def tokenize(text: str) -> list[str]:
    """Split one caption into word tokens, as the SCAN vocab expects.

    Lower-cases ASCII letters, then applies NLTK's Treebank word tokenizer to the whole
    string (no sentence splitting). Examples::

        >>> tokenize("A man's T-shirt, 1,000 dogs.")
        ['a', 'man', "'s", 't-shirt', ',', '1,000', 'dogs', '.']
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
    return _TREEBANK.tokenize(lower_ascii(text))
