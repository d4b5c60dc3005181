"""Vocab: official SCAN JSON loading, id mapping on the real captions, builder, (de)serialisation."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from thsrn_lib.data import Vocab, tokenize
from thsrn_lib.data.precomp import read_caption_file
from thsrn_lib.errors import DataError

SIZES = {"f30k": 8481, "coco": 11353}
SPLITS = [("f30k", "dev"), ("f30k", "test"), ("coco", "dev"), ("coco", "test"), ("coco", "testall")]


@pytest.fixture(scope="module")
def official(scan_captions_dir):
    return {n: Vocab.load(scan_captions_dir / "vocab" / f"{n}_precomp_vocab.json") for n in SIZES}


@pytest.fixture(scope="module")
def tokenized(scan_captions_dir):
    """Tokens of every provided caption file, each distinct caption tokenized once (test ⊂ testall)."""
    cache: dict[str, list[str]] = {}
    out = {}
    for data, split in SPLITS:
        lines = read_caption_file(scan_captions_dir / f"{data}_precomp" / f"{split}_caps.txt")
        out[data, split] = [cache[c] if c in cache else cache.setdefault(c, tokenize(c)) for c in lines]
    return out


# ------------------------------------------------------------------------------- official files
@pytest.mark.parametrize("name", sorted(SIZES))
def test_official_vocab_layout(scan_captions_dir, official, name):
    raw = json.loads((scan_captions_dir / "vocab" / f"{name}_precomp_vocab.json").read_text())
    assert all(isinstance(k, str) for k in raw["idx2word"])  # string keys in the file
    v = official[name]
    assert len(v) == SIZES[name] == raw["idx"]
    assert v.idx2word[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (Vocab.PAD, Vocab.START, Vocab.END, Vocab.UNK) == (0, 1, 2, 3)
    assert all(v.word2idx[w] == i for i, w in enumerate(v.idx2word))
    assert v.idx2word[4] == raw["idx2word"]["4"]
    # word2idx key order in the file is not id order; the loader must not depend on it
    assert list(raw["word2idx"].values()) != list(range(len(v)))
    # to_dict reproduces the official content exactly (key order aside)
    assert v.to_dict() == raw


def test_official_quote_tokens(official):
    # spec §2.2: F30K quotes are space-separated (only ``), COCO has both forms
    assert "``" in official["f30k"] and "''" not in official["f30k"]
    assert "``" in official["coco"] and "''" in official["coco"]


@pytest.mark.slow  # the `tokenized` fixture runs NLTK over ~40k real captions (~9 s of CPU)
@pytest.mark.parametrize("data, split", SPLITS)
def test_oov_rate_and_ids_on_real_captions(official, tokenized, data, split):
    v = official[data]
    toks = tokenized[data, split]
    ids = [v.encode_tokens(t) for t in toks]
    flat = np.concatenate([np.asarray(x) for x in ids])
    assert flat.min() >= 0 and flat.max() < len(v)
    assert all(x[0] == Vocab.START and x[-1] == Vocab.END for x in ids)
    assert not np.isin(flat, [Vocab.PAD]).any()
    n_tokens = sum(len(t) for t in toks)
    n_unk = sum(x.count(Vocab.UNK) for x in ids)
    rate = n_unk / n_tokens
    # Measured with nltk 3.10.4: f30k dev 0.83%, test 0.97%; coco dev 0.38%, test 0.41%, testall 0.49%.
    # A tokenizer that broke (no lower-casing, no clitic split, periods glued) would push this far up.
    assert 0.001 < rate < 0.01, f"{data} {split}: OOV rate {rate:.4%}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "data, split, mean, max_len",
    [("f30k", "dev", 15.5, 70), ("f30k", "test", 15.5, 77), ("coco", "dev", 13.3, 53),
     ("coco", "test", 13.3, 40), ("coco", "testall", 13.3, 52)],
)
def test_caption_length_statistics(tokenized, data, split, mean, max_len):
    lengths = np.array([len(t) + 2 for t in tokenized[data, split]])  # + <start>, <end>
    assert abs(lengths.mean() - mean) < 0.15, lengths.mean()
    assert lengths.max() == max_len
    assert lengths.min() >= 3


def test_encode_maps_unknown_to_unk(official):
    v = official["f30k"]
    ids = v.encode("A dog zzzqqq runs.")
    assert ids[0] == Vocab.START and ids[-1] == Vocab.END
    assert ids[1:-1] == [v.word2idx["a"], v.word2idx["dog"], Vocab.UNK, v.word2idx["runs"], v.word2idx["."]]


# ------------------------------------------------------------------------------- builder
CAPTIONS = (
    ["a red circle ."] * 5
    + ["a blue square ."] * 4
    + ["two blue squares and a red circle"] * 3
    + ["a green star"] * 2
)


def test_build_order_and_min_count():
    v = Vocab.build(CAPTIONS, min_count=4)
    # counts: a 14, . 9, red 8, circle 8, blue 7, square 4, squares 3, two 3, and 3, green 2, star 2
    assert v.idx2word == ["<pad>", "<start>", "<end>", "<unk>", "a", ".", "circle", "red", "blue", "square"]
    v1 = Vocab.build(CAPTIONS, min_count=1)
    assert v1.idx2word[10:] == ["and", "squares", "two", "green", "star"]
    assert len(Vocab.build(CAPTIONS, min_count=100)) == 4


def test_build_is_order_independent():
    shuffled = list(CAPTIONS)
    random.Random(0).shuffle(shuffled)
    assert Vocab.build(shuffled, min_count=2) == Vocab.build(CAPTIONS, min_count=2)
    assert Vocab.build(iter(shuffled), min_count=2) == Vocab.build(CAPTIONS, min_count=2)


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError):
        Vocab.build(CAPTIONS, min_count=0)
    with pytest.raises(TypeError):
        Vocab.build("a red circle")


# ------------------------------------------------------------------------------- (de)serialisation
def test_save_load_round_trip(tmp_path):
    v = Vocab.build(CAPTIONS, min_count=1)
    path = tmp_path / "sub" / "vocab.json"
    v.save(path)
    raw = json.loads(path.read_text())
    assert raw["idx"] == len(v) and raw["idx2word"]["4"] == "a" and raw["word2idx"]["a"] == 4
    assert Vocab.load(path) == v
    assert not list(tmp_path.glob("sub/.*tmp"))  # atomic write left no temporary file


def test_official_save_load_round_trip(tmp_path, official):
    path = tmp_path / "coco_vocab.json"
    official["coco"].save(path)
    assert Vocab.load(path) == official["coco"]


def test_to_dict_through_torch_weights_only(tmp_path, official):
    v = official["f30k"]
    path = tmp_path / "ckpt.pt"
    torch.save({"vocab": v.to_dict(), "weights": torch.zeros(2)}, path)
    loaded = torch.load(path, weights_only=True)
    assert Vocab.from_dict(loaded["vocab"]) == v


def test_equality():
    a = Vocab.build(CAPTIONS, min_count=1)
    assert a == Vocab(list(a.idx2word))
    assert a != Vocab.build(CAPTIONS, min_count=4)
    assert a != a.idx2word  # not equal to a plain list


def test_tokens_and_decode():
    v = Vocab.build(CAPTIONS, min_count=1)
    ids = v.encode("a red zebra .") + [Vocab.PAD, Vocab.PAD]
    assert v.tokens(ids) == ["<start>", "a", "red", "<unk>", ".", "<end>", "<pad>", "<pad>"]
    assert v.decode(ids) == "a red <unk> ."
    assert v.decode(torch.tensor(ids)) == "a red <unk> ."
    assert v.decode(np.array(ids), strip_special=False).startswith("<start> a red")
    with pytest.raises(ValueError, match="outside"):
        v.tokens([len(v)])
    with pytest.raises(ValueError, match="1-D"):
        v.tokens(torch.tensor([ids]))


# ------------------------------------------------------------------------------- bad layouts
def _good() -> dict:
    return Vocab(["<pad>", "<start>", "<end>", "<unk>", "dog", "cat"]).to_dict()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("word2idx"), "missing key"),
        (lambda d: d.__setitem__("idx", 7), "'idx' is 7"),
        (lambda d: d["idx2word"].pop("4"), "not contiguous"),
        (lambda d: d["idx2word"].__setitem__("x", "bird"), "not a non-negative integer"),
        (lambda d: d["word2idx"].__setitem__("dog", 5), "inverses"),
        (lambda d: d.__setitem__("idx2word", ["<pad>"]), "JSON objects"),
        (lambda d: (d["idx2word"].__setitem__("0", "dog"), d["idx2word"].__setitem__("4", "<pad>"),
                    d["word2idx"].__setitem__("dog", 0), d["word2idx"].__setitem__("<pad>", 4)), "specials"),
        (lambda d: (d["idx2word"].__setitem__("5", "dog"), d["word2idx"].pop("cat")), "word2idx has 5"),
    ],
)
def test_wrong_layout_names_file_and_problem(tmp_path, mutate, message):
    data = _good()
    mutate(data)
    path = tmp_path / "bad_vocab.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message) as info:
        Vocab.load(path)
    assert str(path) in str(info.value)


def test_load_missing_and_invalid_json(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Vocab.load(tmp_path / "nope.json")
    bad = tmp_path / "broken.json"
    bad.write_text('{"idx2word": ')
    with pytest.raises(DataError, match="not valid UTF-8 JSON") as info:
        Vocab.load(bad)
    assert str(bad) in str(info.value)


def test_constructor_rejects_duplicates():
    with pytest.raises(DataError, match="duplicate"):
        Vocab(["<pad>", "<start>", "<end>", "<unk>", "dog", "dog"])
