"""The offline Treebank tokenizer (spec data_and_protocol.md §2.2)."""
from __future__ import annotations

import nltk
import pytest

from thsrn_lib.data import tokenize
from thsrn_lib.data.precomp import read_caption_file
from thsrn_lib.data.tokenizer import lower_ascii

# Tokenization of non-ASCII quotes can change between NLTK versions (spec §2.2); the library pins
# this version. Upgrading it means re-checking F30K dev line 122 below and the OOV rates in test_vocab.
PINNED_NLTK = "3.10.4"


def test_nltk_version_is_the_pinned_one():
    assert nltk.__version__ == PINNED_NLTK, (
        f"nltk {nltk.__version__} is installed but tokenization was verified with {PINNED_NLTK}; "
        "re-run the tokenizer tests and update the pin in pyproject.toml and here"
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        # clitics
        ("he can't swim", ["he", "ca", "n't", "swim"]),
        ("the man's hat", ["the", "man", "'s", "hat"]),
        ("I'm here, you're there, we've won, they'll go, he'd run",
         ["i", "'m", "here", ",", "you", "'re", "there", ",", "we", "'ve", "won", ",",
          "they", "'ll", "go", ",", "he", "'d", "run"]),
        ("he cannot go", ["he", "can", "not", "go"]),
        ("gonna wanna gotta", ["gon", "na", "wan", "na", "got", "ta"]),
        # only the final period of the string is split off
        ("a man in a shirt. a dog runs .", ["a", "man", "in", "a", "shirt.", "a", "dog", "runs", "."]),
        ("a dog runs.", ["a", "dog", "runs", "."]),
        ("a sign in the u.s. and a t.v. set", ["a", "sign", "in", "the", "u.s.", "and", "a", "t.v.", "set"]),
        ("a flag of the U.S.", ["a", "flag", "of", "the", "u.s", "."]),
        # commas/colons split unless followed by a digit
        ("1,000 people, 2 dogs at 10:30: fun", ["1,000", "people", ",", "2", "dogs", "at", "10:30", ":", "fun"]),
        # double quotes: opening -> ``, other -> ''
        ('a sign saying "stop" .', ["a", "sign", "saying", "``", "stop", "''", "."]),
        ('"hello" she said', ["``", "hello", "''", "she", "said"]),
        ('a sign saying " stop " .', ["a", "sign", "saying", "``", "stop", "``", "."]),
        ('("yes")', ["(", "``", "yes", "''", ")"]),
        # hyphenated words stay whole
        ("A boy in a T-shirt", ["a", "boy", "in", "a", "t-shirt"]),
        # separated punctuation
        ("what? no! a; b @ c # d $5 10% e & f", ["what", "?", "no", "!", "a", ";", "b", "@", "c", "#", "d",
                                                 "$", "5", "10", "%", "e", "&", "f"]),
        ("(a) [b] {c} <d> e--f wait...", ["(", "a", ")", "[", "b", "]", "{", "c", "}", "<", "d", ">",
                                          "e", "--", "f", "wait", "..."]),
        ("", []),
    ],
)
def test_treebank_examples(text, expected):
    assert tokenize(text) == expected


def test_lowercases_ascii_only():
    # The official pipeline lower-cases bytes: A-Z change, non-ASCII letters keep their case.
    assert lower_ascii("ÀB Éc") == "Àb Éc"
    assert tokenize("ÉCOLE Dog") == ["École", "dog"]


def test_rejects_bytes():
    with pytest.raises(TypeError):
        tokenize(b"a dog")  # type: ignore[arg-type]


def test_f30k_dev_line_122_curly_apostrophe(scan_captions_dir):
    # The only non-ASCII character in the provided files (U+2019); its handling is NLTK-version dependent.
    lines = read_caption_file(scan_captions_dir / "f30k_precomp" / "dev_caps.txt")
    assert lines[121] == "Two Rubbish men standing on they\u2019re truck loading trash ."
    assert tokenize(lines[121]) == [
        "two", "rubbish", "men", "standing", "on", "they", "\u2019", "re", "truck", "loading", "trash", ".",
    ]


def test_equals_word_tokenize_without_sentence_splitting(scan_captions_dir):
    # word_tokenize(preserve_line=True) is the documented equivalent and needs no Punkt data.
    lines = read_caption_file(scan_captions_dir / "coco_precomp" / "test_caps.txt")[:300]
    for line in lines:
        assert tokenize(line) == nltk.word_tokenize(lower_ascii(line), preserve_line=True)
