"""Concept extraction, concept vocabularies and lexical label matrices (HJE's supervision)."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from thsrn_lib.data.tokenizer import tokenize
from thsrn_lib.data.vocab import Vocab
from thsrn_lib.errors import ConfigError
from thsrn_lib.text import (
    ENGLISH_STOP_WORDS,
    ConceptVocab,
    extract_concepts,
    get_extractor,
    ids_to_multi_hot,
    label_matrix,
    normalize_plural,
    rules_concept,
    vocab_words,
)


# ------------------------------------------------------------------------------ rules
@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("puppies", "puppy"),  # -ies -> -y (longer than 4 letters)
        ("ladies", "lady"),
        ("ties", "tie"),  # 4 letters: falls through to the final-s rule
        ("boxes", "box"),
        ("buses", "bus"),
        ("quizzes", "quizz"),
        ("benches", "bench"),
        ("dishes", "dish"),
        ("glasses", "glass"),
        ("horses", "hors"),  # the -ses rule is simple on purpose (documented)
        ("dogs", "dog"),
        ("t-shirts", "t-shirt"),
        ("grass", "grass"),  # -ss kept
        ("bus", "bus"),  # -us kept
        ("tennis", "tennis"),  # -is kept
        ("dog", "dog"),
        ("s", "s"),  # no rule may leave fewer than 2 letters
        ("as", "as"),
    ],
)
def test_normalize_plural(word: str, expected: str) -> None:
    assert normalize_plural(word) == expected


def test_rules_concept_filters() -> None:
    assert rules_concept("dogs") == "dog"
    assert rules_concept("Dogs") == "dog"  # lower-cased first
    assert rules_concept("t-shirt") == "t-shirt"  # hyphenated words are alphabetic
    for token in ("the", "a", "on", "is", "with", "their", "ca", "."):
        assert rules_concept(token) is None, token
    for token in ("1,000", "'s", "n't", "-dash", "3d", "``", "x2"):
        assert rules_concept(token) is None, token
    assert rules_concept("two") == "two"  # numbers are visible: not stop words


def test_stop_words_are_lowercase_alphabetic_function_words() -> None:
    assert len(ENGLISH_STOP_WORDS) > 150
    assert all(w.isalpha() and w == w.lower() for w in ENGLISH_STOP_WORDS)
    assert {"the", "a", "of", "and", "is", "in", "on", "with", "while", "there"} <= ENGLISH_STOP_WORDS
    assert not {"dog", "man", "two", "red", "street", "shirt"} & ENGLISH_STOP_WORDS


def test_extract_concepts_dedups_in_first_occurrence_order() -> None:
    tokens = ["a", "dog", "and", "two", "dogs", "on", "the", "grass", ",", "dogs", "."]
    assert extract_concepts(tokens) == ["dog", "two", "grass"]
    assert extract_concepts("A man's T-shirts, 1,000 puppies.") == ["man", "t-shirt", "puppy"]


def test_unknown_extractor_and_bad_pos() -> None:
    with pytest.raises(ConfigError, match="unknown concept extractor"):
        get_extractor("lemmy")
    with pytest.raises(ConfigError):
        get_extractor("wordnet", pos=("x",))


@pytest.mark.parametrize("name", ["wordnet", "spacy"])
def test_optional_extractors_fail_clearly_when_unavailable(name: str) -> None:
    if name == "spacy" and importlib.util.find_spec("spacy") is not None:
        pytest.skip("spacy is installed here")
    if name == "wordnet":
        import nltk

        try:
            nltk.data.find("corpora/wordnet")
            pytest.skip("the WordNet corpus is installed here")
        except LookupError:
            pass
    with pytest.raises(ConfigError, match="rules"):  # the message names the offline alternative
        get_extractor(name)
    with pytest.raises(ConfigError):
        ConceptVocab.build(["a dog runs"], min_captions=1, extractor=name)


# ------------------------------------------------------------------------ vocabulary
CAPTIONS = [
    "a dog runs on the grass .",
    "two dogs dogs dogs play .",  # one caption counts once however often a concept repeats
    "a dog and a cat .",
    "the cat sleeps .",
    "a red car .",
]


def test_concept_vocab_min_captions_counts_captions_not_tokens() -> None:
    vocab = ConceptVocab.build(CAPTIONS, min_captions=2)
    assert vocab.concepts == ["dog", "cat"]  # dog in 3 captions, cat in 2; descending count
    assert vocab.counts == [3, 2]
    assert ConceptVocab.build(CAPTIONS, min_captions=4).concepts == []
    one = ConceptVocab.build(CAPTIONS, min_captions=1)
    assert one.concepts[:2] == ["dog", "cat"]
    assert one.concepts[2:] == sorted(one.concepts[2:])  # ties broken alphabetically
    assert ConceptVocab.build(list(reversed(CAPTIONS)), min_captions=1).concepts == one.concepts
    with pytest.raises(ConfigError):
        ConceptVocab.build(CAPTIONS, min_captions=0)


def test_token_map_and_multi_hot() -> None:
    vocab = ConceptVocab.build(CAPTIONS, min_captions=2)
    words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "dogs", "the", "cat", "cats", "car"]
    mapping = vocab.token_map(words)
    assert mapping.tolist() == [-1, -1, -1, -1, 0, 0, -1, 1, 1, -1]  # car: rare -> no concept
    dense = vocab.multi_hot(CAPTIONS)
    sparse = vocab.multi_hot(CAPTIONS, sparse=True)
    assert dense.dtype == torch.bool and dense.shape == (5, 2)
    assert torch.equal(sparse.to_dense().bool(), dense)
    assert dense.tolist() == [[True, False], [True, False], [True, True], [False, True], [False, False]]
    assert ConceptVocab.from_dict(vocab.to_dict()).concepts == vocab.concepts


def test_ids_to_multi_hot_equals_set_computation() -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(-1, 6, (7, 9), generator=g)
    mask = torch.rand(7, 9, generator=g) > 0.3
    hot = ids_to_multi_hot(ids, 6, mask)
    for n in range(7):
        expected = {int(c) for c, m in zip(ids[n], mask[n]) if m and c >= 0}
        assert set(torch.nonzero(hot[n]).flatten().tolist()) == expected


def test_vocab_words_accepts_vocab_dict_and_list() -> None:
    v = Vocab(["<pad>", "<start>", "<end>", "<unk>", "dog"])
    assert vocab_words(v) == v.idx2word
    assert vocab_words({"idx2word": {"1": "b", "0": "a"}}["idx2word"]) == ["a", "b"]
    assert vocab_words(["a", "b"]) == ["a", "b"]


# ---------------------------------------------------------------------------- labels
def _set_labels(img_sets, txt_sets, mode, positives):
    out = torch.zeros(len(img_sets), len(txt_sets))
    for a, ki in enumerate(img_sets):
        for b, kt in enumerate(txt_sets):
            den = len(kt) if mode == "coverage" else len(ki | kt)
            out[a, b] = len(ki & kt) / den if den else float(positives[a][b])
    return out


def _random_sets(n, k, rng, p=0.3):
    return [{c for c in range(k) if rng.random() < p} for _ in range(n)]


def _hot(sets, k):
    h = torch.zeros(len(sets), k, dtype=torch.bool)
    for i, s in enumerate(sets):
        h[i, list(s)] = True
    return h


@pytest.mark.parametrize("mode", ["coverage", "jaccard"])
def test_label_matrix_equals_set_computation(mode: str) -> None:
    rng = random.Random(0)
    img_sets, txt_sets = _random_sets(6, 8, rng), _random_sets(9, 8, rng)
    txt_sets[2] = set()  # an empty K(T)
    img_sets[4] = set()
    positives = [[(b // 2) == a for b in range(9)] for a in range(6)]
    y = label_matrix(_hot(img_sets, 8), _hot(txt_sets, 8), mode, torch.tensor(positives))
    assert torch.allclose(y, _set_labels(img_sets, txt_sets, mode, positives))
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_coverage_empty_caption_rule() -> None:
    h_img = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    h_txt = torch.tensor([[0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    pos = torch.tensor([[True, False], [False, True]])
    y = label_matrix(h_img, h_txt, "coverage", pos)
    assert y[:, 0].tolist() == [1.0, 0.0]  # empty K(T): 1 for its image, 0 elsewhere
    assert y[:, 1].tolist() == [0.0, 1.0]
    assert label_matrix(h_img, h_txt, "coverage")[:, 0].tolist() == [0.0, 0.0]  # without positives: 0


def test_jaccard_is_symmetric() -> None:
    rng = random.Random(3)
    a, b = _hot(_random_sets(5, 7, rng), 7), _hot(_random_sets(4, 7, rng), 7)
    assert torch.allclose(label_matrix(a, b, "jaccard"), label_matrix(b, a, "jaccard").T)
    same = label_matrix(a, a, "jaccard", torch.eye(5, dtype=torch.bool))
    assert torch.allclose(same.diagonal(), torch.ones(5))


def test_real_captions_coverage_is_one_on_ground_truth(scan_captions_dir) -> None:
    """F30K dev captions: image concept sets = union of their 5 captions -> coverage 1 on every GT pair."""
    lines = (scan_captions_dir / "f30k_precomp" / "dev_caps.txt").read_text(encoding="utf-8").splitlines()[:1000]
    tokens = [tokenize(c) for c in lines]
    vocab = ConceptVocab.build(tokens, min_captions=5)
    assert 100 < len(vocab) < 1000
    assert {"man", "dog", "woman", "shirt"} <= set(vocab.concepts)
    assert not set(vocab.concepts) & ENGLISH_STOP_WORDS
    h_txt = vocab.multi_hot(tokens)
    h_img = h_txt.view(-1, 5, len(vocab)).any(1)
    image_of = torch.arange(len(lines)) // 5
    positives = image_of.unsqueeze(0) == torch.arange(h_img.shape[0]).unsqueeze(1)
    y = label_matrix(h_img, h_txt, "coverage", positives)
    assert torch.all(y[positives] == 1.0)
    assert float(y[~positives].mean()) < 0.3  # other images cover a caption much less
    sets_img = [set(torch.nonzero(r).flatten().tolist()) for r in h_img[:20]]
    sets_txt = [set(torch.nonzero(r).flatten().tolist()) for r in h_txt[:100]]
    pos_small = positives[:20, :100].tolist()
    for mode in ("coverage", "jaccard"):
        assert torch.allclose(
            label_matrix(h_img[:20], h_txt[:100], mode, positives[:20, :100]),
            _set_labels(sets_img, sets_txt, mode, pos_small),
        )
