"""HJE (reconstruction): fixed-vector contract, concept labels from the training set, losses, GPO."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from thsrn_lib.data.tokenizer import tokenize
from thsrn_lib.data.vocab import Vocab
from thsrn_lib.errors import ConfigError, DataError
from thsrn_lib.losses import ContrastiveLoss
from thsrn_lib.models import create
from thsrn_lib.models.hje import GPO, HJE
from thsrn_lib.text import extract_concepts, label_matrix

F, D, R = 16, 16, 5
NOUNS = ["dog", "cat", "man", "woman", "car", "tree", "ball", "hat", "bike", "boat", "horse", "bench"]
VERBS = ["runs", "sits", "jumps", "stands"]


def synthetic_captions(n_images: int = 8, seed: int = 0) -> list[str]:
    """5 captions per image; each image has its own pair of nouns (plural forms sometimes)."""
    g = torch.Generator().manual_seed(seed)
    caps = []
    for i in range(n_images):
        a, b = NOUNS[i % len(NOUNS)], NOUNS[(3 * i + 1) % len(NOUNS)]
        for k in range(5):
            verb = VERBS[int(torch.randint(len(VERBS), (1,), generator=g))]
            if k == 4:
                caps.append(f"the {a}s near the {b} .")  # plural -> same concept
            elif k == 3:
                caps.append("it is there .")  # only stop words -> empty K(T)
            else:
                caps.append(f"a {a} {verb} with a {b} on the street .")
    return caps


CAPTIONS = synthetic_captions()
VOCAB = Vocab.build(CAPTIONS, min_count=1)
DATASET = SimpleNamespace(captions=CAPTIONS, n_images=len(CAPTIONS) // 5, vocab=VOCAB)
TINY = dict(
    vocab_size=len(VOCAB),
    img_dim=F,
    embed_size=D,
    word_dim=8,
    num_regions=R,
    global_dim=12,
    local_dim=10,
    concept_min_captions=2,
)


def make_model(prepared: bool = True, **overrides) -> HJE:
    torch.manual_seed(0)
    m = create("hje", **{**TINY, **overrides})
    if prepared:
        m.prepare(DATASET)
    return m


def encode_ids(captions: list[str]):
    rows = [VOCAB.encode(c) for c in captions]
    lens = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), int(lens.max()), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
    return ids, lens


def make_images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, R, F, generator=torch.Generator().manual_seed(seed))


def make_batch(caption_offset: int = 0):
    n_img = DATASET.n_images
    cap_idx = torch.arange(n_img) * 5 + caption_offset
    ids, lens = encode_ids([CAPTIONS[i] for i in cap_idx.tolist()])
    mask = torch.arange(ids.shape[1]).unsqueeze(0) < lens.unsqueeze(1)
    return SimpleNamespace(
        images=make_images(n_img, seed=4),
        ids=ids,
        lengths=lens,
        mask=mask,
        image_index=torch.arange(n_img),
        caption_index=cap_idx,
    )


def scores(m, feats, ids, lens):
    with torch.no_grad():
        return m.score_parts(m.encode_images(feats), m.encode_texts(ids, lens))


# ----------------------------------------------------------------------------- contract
def test_shapes_and_fixed_vectors() -> None:
    m = make_model().eval()
    feats, (ids, lens) = make_images(3), encode_ids(CAPTIONS[:7])
    img, txt = m.encode_images(feats), m.encode_texts(ids, lens)
    assert img["emb"].shape == (3, 10 + 12) and txt["emb"].shape == (7, 22)
    assert txt["mask"].shape == ids.shape and txt["lengths"].tolist() == lens.tolist()
    assert torch.allclose(img["emb"].norm(dim=-1), torch.ones(3), atol=1e-5)  # w + (1 - w) = 1
    sims, parts = m.score_parts(img, txt)
    assert sims.shape == (3, 7) and set(parts) == {"local", "global"}
    assert torch.allclose(sims, 0.5 * parts["local"] + 0.5 * parts["global"], atol=1e-6)
    assert torch.equal(m.score(img, txt), sims)
    assert torch.equal(m.global_image_vectors(img), img["emb"]) and torch.equal(m.global_text_vectors(txt), txt["emb"])
    assert HJE.is_embedding_model


def test_matmul_equals_per_pair_reference() -> None:
    """One matrix product == explicit per-pair w·cos(l_v, l_t) + (1-w)·cos(g_v, g_t), captions encoded alone."""
    m = make_model(fused_weight=0.3).eval()
    feats, (ids, lens) = make_images(3, seed=1), encode_ids(CAPTIONS[3:11])
    sims, parts = scores(m, feats, ids, lens)
    with torch.no_grad():
        img = m._image_branches(feats)
        for j in range(ids.shape[0]):
            alone, _, _ = m._text_branches(ids[j : j + 1, : lens[j]], lens[j : j + 1])  # no padding at all
            for i in range(3):
                cos_l = torch.nn.functional.cosine_similarity(img["l"][i], alone["l"][0], dim=0)
                cos_g = torch.nn.functional.cosine_similarity(img["g"][i], alone["g"][0], dim=0)
                assert torch.allclose(parts["local"][i, j], cos_l, atol=1e-5)
                assert torch.allclose(parts["global"][i, j], cos_g, atol=1e-5)
                assert torch.allclose(sims[i, j], 0.3 * cos_l + 0.7 * cos_g, atol=1e-5)


@pytest.mark.parametrize(
    "overrides", [{}, {"global_pool": "gpo", "local_pool": "attention"}, {"global_pool": "max", "local_pool": "mean"}]
)
def test_padding_shuffle_and_block_split(overrides) -> None:
    m = make_model(**overrides).eval()
    feats, (ids, lens) = make_images(4), encode_ids(CAPTIONS[:9])
    full, _ = scores(m, feats, ids, lens)
    padded = torch.cat([ids, torch.zeros(9, 4, dtype=ids.dtype)], dim=1)
    assert torch.allclose(scores(m, feats, padded, lens)[0], full, atol=1e-6)
    perm = torch.randperm(9)
    assert torch.allclose(scores(m, feats, ids[perm], lens[perm])[0], full[:, perm], atol=1e-6)
    assert torch.allclose(scores(m, feats[:2], ids[:4], lens[:4])[0], full[:2, :4], atol=1e-6)
    assert torch.allclose(scores(m, feats[2:], ids[4:], lens[4:])[0], full[2:, 4:], atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"global_pool": "gpo", "local_pool": "attention", "intra_modal_loss": True, "fused_triplet": True},
        {"local_loss": "soft_ce", "label_mode": "jaccard"},
        {"local_loss": "concept_bce"},
    ],
)
def test_gradients_reach_every_parameter(overrides) -> None:
    m = make_model(**overrides).train()
    loss, logs = m.training_loss(make_batch(), ContrastiveLoss(margin=0.2, max_violation=False))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert {"loss_global", "loss_local"} <= set(logs)


def test_determinism_under_seed() -> None:
    a, b = make_model().train(), make_model().train()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    batch, crit = make_batch(), ContrastiveLoss()
    torch.manual_seed(3)
    la, _ = a.training_loss(batch, crit)
    torch.manual_seed(3)
    lb, _ = b.training_loss(batch, crit)
    assert torch.equal(la, lb)


@pytest.mark.parametrize("overrides", [{}, {"local_loss": "concept_bce", "global_pool": "gpo"}])
def test_config_round_trip(overrides) -> None:
    m = make_model(**overrides).eval()
    cfg = m.config.to_dict()
    assert cfg["num_concepts"] == len(m.concept_vocab) > 0  # recorded by prepare
    assert "vocab_to_concept" in m.state_dict() and "image_concepts" not in m.state_dict()
    twin = create("hje", **cfg).eval()
    twin.load_state_dict(m.state_dict())
    feats, (ids, lens) = make_images(3), encode_ids(CAPTIONS[:6])
    assert torch.equal(scores(m, feats, ids, lens)[0], scores(twin, feats, ids, lens)[0])
    assert torch.equal(twin.content_mask(ids, ids > 0), m.content_mask(ids, ids > 0))


def test_explain_shares_sum_to_one() -> None:
    m = make_model(global_pool="gpo", local_pool="max").eval()
    feats, (ids, lens) = make_images(3), encode_ids(CAPTIONS[:6])
    e = m.explain(feats, ids, lens)
    assert torch.allclose(e.sims, scores(m, feats, ids, lens)[0], atol=1e-6)
    assert set(e.stream_scores) == {"local", "global"}
    content = e.extras["content_mask"]
    assert torch.all(content <= e.mask)
    for key, n, valid in (
        ("local_word", 6, content),
        ("global_word", 6, e.mask),
        ("local_region", 3, None),
        ("global_region", 3, None),
    ):
        share = e.extras[f"{key}_share"]
        assert torch.allclose(share.sum(-1), torch.ones(n), atol=1e-5), key
        if valid is not None:
            assert torch.all(share[~valid] == 0), key


def test_loss_falls_with_prepared_concepts() -> None:
    m = make_model(dropout=0.0).train()
    batch, crit = make_batch(), ContrastiveLoss(margin=0.2, max_violation=True)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss, _ = m.training_loss(batch, crit)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 2.0)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


# --------------------------------------------------------------------------- concepts
def _caption_set(caption: str, concept_index: dict[str, int]) -> set[int]:
    tokens = [t for t in tokenize(caption) if t in VOCAB.word2idx]
    return {concept_index[c] for c in extract_concepts(tokens) if c in concept_index}


def test_prepare_builds_concepts_from_all_five_captions() -> None:
    m = make_model()
    vocab = m.concept_vocab
    assert {"dog", "cat", "hat", "horse"} <= set(vocab.concepts)
    assert "the" not in vocab.concepts and "dogs" not in vocab.concepts
    index = vocab.index
    ids = m.vocab_to_concept
    assert ids[VOCAB.word2idx["dogs"]] == ids[VOCAB.word2idx["dog"]] == index["dog"]
    assert ids[VOCAB.word2idx["the"]] == -1 and ids[VOCAB.START] == -1
    for i in range(DATASET.n_images):
        expected = set().union(*[_caption_set(c, index) for c in CAPTIONS[5 * i : 5 * i + 5]])
        assert set(torch.nonzero(m.image_concepts[i]).flatten().tolist()) == expected


@pytest.mark.parametrize("mode", ["coverage", "jaccard"])
def test_batch_labels_match_set_computation(mode: str) -> None:
    """Y built in training_loss (ids -> multi-hot matmul) == labels from the caption texts."""
    m = make_model(label_mode=mode)
    batch = make_batch(caption_offset=3)  # the captions with no concept: empty K(T)
    batch2 = make_batch(caption_offset=0)
    from thsrn_lib.text.concepts import ids_to_multi_hot

    index = m.concept_vocab.index
    for b in (batch, batch2):
        h_img = m.image_concepts[b.image_index]
        h_txt = ids_to_multi_hot(m.vocab_to_concept[b.ids], len(index), b.mask)
        pos = b.image_index.unsqueeze(1) == b.image_index.unsqueeze(0)
        y = label_matrix(h_img, h_txt, mode, pos)
        for a in range(len(b.image_index)):
            k_img = set(torch.nonzero(m.image_concepts[a]).flatten().tolist())
            for j, c in enumerate(b.caption_index.tolist()):
                k_txt = _caption_set(CAPTIONS[c], index)
                den = len(k_txt) if mode == "coverage" else len(k_img | k_txt)
                expect = len(k_img & k_txt) / den if den else float(a == j)
                assert abs(float(y[a, j]) - expect) < 1e-6
        if mode == "coverage":
            assert torch.all(y.diagonal() == 1.0)  # ground-truth pairs


def test_content_mask_and_fallback() -> None:
    m = make_model()
    ids, lens = encode_ids(["a dog runs with a cat on the street .", "it is there ."])
    mask = torch.arange(ids.shape[1]).unsqueeze(0) < lens.unsqueeze(1)
    content = m.content_mask(ids, mask)
    words = [VOCAB.idx2word[i] for i in ids[0, : lens[0]].tolist()]
    assert [w for w, c in zip(words, content[0]) if c] == [w for w in words if w in ("dog", "runs", "cat", "street")]
    assert torch.equal(content[1], mask[1])  # no content word: pool over every valid word


def test_training_loss_needs_prepare() -> None:
    m = make_model(prepared=False)
    with pytest.raises(ConfigError, match="prepare"):
        m.training_loss(make_batch(), ContrastiveLoss())
    bce = make_model(prepared=False, local_loss="concept_bce")
    assert bce.loc_v is None
    with pytest.raises(ConfigError, match="prepare"):
        bce.encode_images(make_images(2))


def test_prepare_checks_the_dataset() -> None:
    m = make_model(prepared=False, vocab_size=len(VOCAB) + 1)
    with pytest.raises(ConfigError, match="vocab_size"):
        m.prepare(DATASET)
    bad = SimpleNamespace(captions=CAPTIONS[:-1], n_images=DATASET.n_images, vocab=VOCAB)
    with pytest.raises(DataError, match="5 captions per image"):
        make_model(prepared=False).prepare(bad)
    with pytest.raises(DataError, match="no concept"):
        make_model(prepared=False, concept_min_captions=1000).prepare(DATASET)
    other = SimpleNamespace(
        captions=list(reversed(CAPTIONS)),
        n_images=DATASET.n_images,
        vocab=Vocab(list(VOCAB.idx2word[:4]) + sorted(VOCAB.idx2word[4:], reverse=True)),
    )
    with pytest.raises(ConfigError, match="different concept map"):
        make_model().prepare(other)


@pytest.mark.parametrize("name", ["wordnet", "spacy"])
def test_optional_extractors_fail_clearly(name: str) -> None:
    if name == "spacy" and importlib.util.find_spec("spacy") is not None:
        pytest.skip("spacy is installed here")
    if name == "wordnet":
        import nltk

        try:
            nltk.data.find("corpora/wordnet")
            pytest.skip("the WordNet corpus is installed here")
        except LookupError:
            pass
    m = make_model(prepared=False, concept_extractor=name)
    with pytest.raises(ConfigError, match="rules"):
        m.prepare(DATASET)


@pytest.mark.parametrize(("branches", "dim", "keys"), [("global", 12, {"global"}), ("local", 10, {"local"})])
def test_single_branch(branches: str, dim: int, keys: set[str]) -> None:
    m = make_model(branches=branches).eval()
    feats, (ids, lens) = make_images(2), encode_ids(CAPTIONS[:3])
    img, txt = m.encode_images(feats), m.encode_texts(ids, lens)
    assert img["emb"].shape == (2, dim)
    sims, parts = m.score_parts(img, txt)
    assert set(parts) == keys and torch.equal(parts[branches], sims)
    absent = "loc_" if branches == "global" else "glo_"
    assert not any(n.startswith(absent) for n, _ in m.named_parameters())
    m.train()
    loss, logs = m.training_loss(make_batch(), ContrastiveLoss())
    assert (("loss_global" in logs) == (branches == "global")) and torch.isfinite(loss)


def test_concept_bce_local_vector_is_concept_scores() -> None:
    m = make_model(local_loss="concept_bce").eval()
    k = len(m.concept_vocab)
    feats = make_images(2)
    assert m.encode_images(feats)["emb"].shape == (2, k + 12)
    with torch.no_grad():
        parts = m._image_branches(feats)
    assert torch.allclose(parts["l"], torch.nn.functional.normalize(torch.sigmoid(parts["logits"]), dim=-1), atol=1e-6)


# -------------------------------------------------------------------------------- GPO
def test_gpo_pools_sorted_features_with_length_dependent_weights() -> None:
    torch.manual_seed(0)
    gpo = GPO(pe_dim=8, hidden=6).eval()
    x = torch.randn(3, 5, 4)
    mask = torch.arange(5).unsqueeze(0) < torch.tensor([[5], [3], [3]])
    with torch.no_grad():
        pooled, share = gpo(x, mask, want_share=True)
        weights = gpo.rank_weights(mask.sum(1), 5)
    assert torch.allclose(weights[1], weights[2]) and torch.all(weights[1, 3:] == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(3), atol=1e-6)
    for n in range(3):
        valid = x[n, : int(mask[n].sum())]
        ranked = valid.sort(dim=0, descending=True).values
        expect = (weights[n, : valid.shape[0], None] * ranked).sum(0)
        assert torch.allclose(pooled[n], expect, atol=1e-6)
    assert torch.allclose(share.sum(-1), torch.ones(3), atol=1e-5) and torch.all(share[~mask] == 0)
    with torch.no_grad():  # padding more does not change anything
        longer = torch.cat([x, torch.randn(3, 2, 4)], dim=1)
        pooled2, _ = gpo(longer, torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1))
    assert torch.allclose(pooled, pooled2, atol=1e-6)


def test_autocast_bf16_runs() -> None:
    m = make_model(global_pool="gpo").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.training_loss(make_batch(), ContrastiveLoss())
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize(
    "bad",
    [
        {"branches": "all"},
        {"global_pool": "attention"},
        {"local_pool": "gpo"},
        {"local_loss": "infonce"},
        {"label_mode": "dice"},
        {"concept_extractor": "stanza"},
        {"concept_pos": ["x"]},
        {"fused_weight": 1.0},
        {"fused_weight": 0.0},
        {"word_init": "glove+learned"},
        {"gpo_pe_dim": 7},
        {"soft_ce_tau": 0.0},
    ],
)
def test_invalid_config_is_a_config_error(bad) -> None:
    with pytest.raises(ConfigError):
        create("hje", **{**TINY, **bad})


def test_prepare_with_the_official_f30k_vocab(scan_captions_dir) -> None:
    """Real captions + the official vocab: concepts from ids, coverage 1 on every ground-truth pair."""
    vocab = Vocab.load(scan_captions_dir / "vocab" / "f30k_precomp_vocab.json")
    lines = (scan_captions_dir / "f30k_precomp" / "test_caps.txt").read_text(encoding="utf-8").splitlines()[:2000]
    data = SimpleNamespace(captions=lines, n_images=len(lines) // 5, vocab=vocab)
    torch.manual_seed(0)
    m = create("hje", **{**TINY, "vocab_size": len(vocab)})
    m.prepare(data)
    k = len(m.concept_vocab)
    assert 200 < k < 2000 and {"man", "woman", "dog", "shirt", "street"} <= set(m.concept_vocab.concepts)
    assert m.image_concepts.shape == (400, k)
    rows = [vocab.encode(c) for c in lines[:50]]
    ids = torch.zeros(50, max(map(len, rows)), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
    mask = ids > 0
    from thsrn_lib.text.concepts import ids_to_multi_hot

    h_txt = ids_to_multi_hot(m.vocab_to_concept[ids], k, mask)
    image_of = torch.arange(50) // 5
    pos = torch.arange(10).unsqueeze(1) == image_of.unsqueeze(0)
    y = label_matrix(m.image_concepts[:10], h_txt, "coverage", pos)
    assert torch.all(y[pos] == 1.0) and float(y[~pos].mean()) < 0.3


def test_prepare_and_train_on_a_precomp_dataset(tmp_path) -> None:
    """The real dataset class: prepare reuses its cached caption ids; a collated batch trains."""
    import numpy as np

    from thsrn_lib.data.precomp import PrecompDataset, collate

    root = tmp_path / "toy_precomp"
    root.mkdir()
    (root / "train_caps.txt").write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    np.save(
        root / "train_ims.npy", np.random.default_rng(0).standard_normal((DATASET.n_images, R, F)).astype(np.float32)
    )
    ds = PrecompDataset(root, "train", VOCAB)
    m = make_model(prepared=False)
    m.prepare(ds)
    ref = make_model()  # prepared from raw captions (tokenised inside prepare)
    assert torch.equal(m.vocab_to_concept, ref.vocab_to_concept)
    assert torch.equal(m.image_concepts, ref.image_concepts)
    batch = collate([ds[k] for k in (0, 6, 12, 18, 19, 25)])  # image 3 appears twice
    loss, logs = m.training_loss(batch, ContrastiveLoss())
    assert torch.isfinite(loss) and float(logs["loss_local"]) > 0
