"""SHAN (reconstruction): model contract, vectorised == per-pair reference, variants, GloVe input."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from thsrn_lib.data.vocab import Vocab
from thsrn_lib.errors import ConfigError, DataError
from thsrn_lib.losses import ContrastiveLoss
from thsrn_lib.models import create
from thsrn_lib.models.glove import GloveLearnedEmbedding, read_glove
from thsrn_lib.models.shan import SHAN, SHANConfig

V, F, D, R = 40, 16, 16, 5
TINY = dict(vocab_size=V, img_dim=F, embed_size=D, word_dim=8, num_regions=R, chunk_size=3)


def make_model(**overrides) -> SHAN:
    torch.manual_seed(0)
    return create("shan", **{**TINY, **overrides})


def make_captions(n: int, max_len: int = 8, seed: int = 0, lengths: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths) if lengths is not None else torch.randint(3, max_len + 1, (n,), generator=g)
    L = int(lens.max())
    ids = torch.randint(4, V, (n, L), generator=g)
    ids[:, 0] = 1
    for j, length in enumerate(lens.tolist()):
        ids[j, length - 1] = 2
        ids[j, length:] = 0
    return ids, lens


def make_images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, R, F, generator=torch.Generator().manual_seed(seed))


def scores(model, feats, ids, lengths):
    with torch.no_grad():
        return model.score_parts(model.encode_images(feats), model.encode_texts(ids, lengths))


# ------------------------------------------------------------------------------ contract
def test_shapes_and_embeddings() -> None:
    m = make_model().eval()
    feats, (ids, lens) = make_images(3), make_captions(7)
    img, txt = m.encode_images(feats), m.encode_texts(ids, lens)
    assert img["regions"].shape == (3, R, D)
    assert txt["words"].shape == (7, ids.shape[1], D)
    assert txt["mask"].dtype == torch.bool and txt["mask"].sum(1).tolist() == lens.tolist()
    assert txt["lengths"].dtype == torch.long
    sims, parts = m.score_parts(img, txt)
    assert sims.shape == (3, 7) and set(parts) == {"l2l", "g2l", "g2g"}
    assert all(p.shape == (3, 7) for p in parts.values())
    assert torch.allclose(sims, parts["l2l"] + parts["g2l"] + parts["g2g"])
    assert float(sims.detach().abs().max()) <= 3.0 + 1e-5
    assert m.global_image_vectors(img) is None
    assert m.aux_loss_weight() == 0.0


def test_extra_padding_does_not_change_scores() -> None:
    m = make_model().eval()
    feats, (ids, lens) = make_images(3), make_captions(6)
    padded = torch.cat([ids, torch.zeros(6, 5, dtype=ids.dtype)], dim=1)
    a, _ = scores(m, feats, ids, lens)
    b, _ = scores(m, feats, padded, lens)
    assert torch.allclose(a, b, atol=1e-6)


def test_caption_shuffle_permutes_columns_and_block_split() -> None:
    m = make_model().eval()
    feats, (ids, lens) = make_images(4), make_captions(8)
    full, _ = scores(m, feats, ids, lens)
    perm = torch.randperm(8)
    shuffled, _ = scores(m, feats, ids[perm], lens[perm])
    assert torch.allclose(shuffled, full[:, perm], atol=1e-6)
    left, _ = scores(m, feats[:1], ids[:3], lens[:3])
    right, _ = scores(m, feats[1:], ids[3:], lens[3:])
    assert torch.allclose(left, full[:1, :3], atol=1e-6)
    assert torch.allclose(right, full[1:, 3:], atol=1e-6)


def test_chunk_size_does_not_change_scores() -> None:
    feats, (ids, lens) = make_images(3), make_captions(7)
    a, _ = scores(make_model(chunk_size=1).eval(), feats, ids, lens)
    b, _ = scores(make_model(chunk_size=64).eval(), feats, ids, lens)
    assert torch.allclose(a, b, atol=1e-6)


PARITY_CONFIGS = [
    {},
    {"variant": "t2i"},
    {"variant": "i2t"},
    {"fusion_gate": False},
    {"context_pool": "mean"},
    {"context_pool": "additive"},
    {"g2l_over": "fused"},
    {"steps": ["l2l", "g2g"], "score_reduce": "mean", "step_weights": [1.0, 0.0, 2.0]},
    {"steps": ["l2l"]},
    {"lambda_i2t": 9.0, "lambda_t2i": 9.0, "mu": 0.3},
]


@pytest.mark.parametrize(
    "overrides", PARITY_CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_vectorized_equals_per_pair_reference(overrides) -> None:
    m = make_model(**overrides).eval()
    feats, (ids, lens) = make_images(3, seed=1), make_captions(7, seed=2)
    with torch.no_grad():
        img, txt = m.encode_images(feats), m.encode_texts(ids, lens)
        fast, fast_parts = m.score_parts(img, txt)
        slow, slow_parts = m.reference_scores(img, txt)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert set(fast_parts) == set(slow_parts) == set(m.config.steps)
    for k in fast_parts:
        assert torch.allclose(fast_parts[k], slow_parts[k], atol=1e-5), k


def _batch(b: int = 6, seed: int = 0):
    ids, lens = make_captions(b, seed=seed)
    mask = torch.arange(ids.shape[1]).unsqueeze(0) < lens.unsqueeze(1)
    return SimpleNamespace(
        images=make_images(b, seed=seed),
        ids=ids,
        lengths=lens,
        mask=mask,
        image_index=torch.arange(b),
        caption_index=torch.arange(b) * 5,
    )


@pytest.mark.parametrize("overrides", [{}, {"per_step_loss": True, "context_pool": "additive"}])
def test_gradients_reach_every_parameter(overrides) -> None:
    m = make_model(**overrides).train()
    loss, logs = m.training_loss(_batch(), ContrastiveLoss(margin=0.2, max_violation=False))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    if overrides.get("per_step_loss"):
        assert m.aux_loss_weight() == 1.0
        assert {"loss_rank", "loss_l2l", "loss_g2l", "loss_g2g"} <= set(logs)


def test_l2l_only_builds_no_context_modules() -> None:
    m = make_model(steps=["l2l"])
    assert m.gate_v is None and m.pool_v is None
    assert not any(n.startswith(("gate_", "pool_")) for n, _ in m.named_parameters())


def test_determinism_under_seed() -> None:
    a, b = make_model().train(), make_model().train()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    feats, (ids, lens) = make_images(3), make_captions(5)
    torch.manual_seed(7)
    sa = a(feats, ids, lens)
    torch.manual_seed(7)
    sb = b(feats, ids, lens)
    assert torch.equal(sa, sb)  # train mode: dropout masks are seeded too


def test_config_round_trip(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="thsrn_lib.models.glove"):
        m = make_model(variant="t2i", context_pool="additive").eval()
    assert m.config.word_init == "learned"  # auto without glove_path -> recorded, with a warning
    assert any("word_init='learned'" in r.getMessage() for r in caplog.records)
    cfg = m.config.to_dict()
    assert cfg["word_init"] == "learned" and cfg["steps"] == ["l2l", "g2l", "g2g"]
    twin = create("shan", **cfg).eval()
    twin.load_state_dict(m.state_dict())
    feats, (ids, lens) = make_images(2), make_captions(4)
    assert torch.equal(scores(m, feats, ids, lens)[0], scores(twin, feats, ids, lens)[0])


def test_explain_shapes_and_normalisation() -> None:
    m = make_model(chunk_size=2).eval()
    feats, (ids, lens) = make_images(3), make_captions(5)
    e = m.explain(feats, ids, lens)
    B, N, L = 3, 5, ids.shape[1]
    mask = e.mask
    assert torch.allclose(e.sims, scores(m, feats, ids, lens)[0], atol=1e-6)
    beta, alpha = e.attention["t2i"], e.attention["i2t"]
    assert beta.shape == (B, N, L, R) and alpha.shape == (B, N, R, L)
    valid_words = mask[None].expand(B, N, L)
    assert torch.allclose(beta.sum(-1)[valid_words], torch.ones(int(valid_words.sum())), atol=1e-5)
    assert torch.all(beta.sum(-1)[~valid_words] == 0)
    assert torch.allclose(alpha.sum(-1), torch.ones(B, N, R), atol=1e-5)
    assert torch.all(alpha.masked_select(~mask[None, :, None, :].expand(B, N, R, L)) == 0)
    assert e.attention["g2l_t2i"].shape == (B, N, R) and e.attention["g2l_i2t"].shape == (B, N, L)
    assert torch.allclose(e.attention["g2l_t2i"].sum(-1), torch.ones(B, N), atol=1e-5)
    assert torch.allclose(e.attention["g2l_i2t"].sum(-1), torch.ones(B, N), atol=1e-5)
    assert torch.all(e.attention["g2l_i2t"][~valid_words] == 0)
    assert e.gates["i2t"][0].shape == (B, N, R) and e.gates["t2i"][0].shape == (B, N, L)
    assert torch.allclose(e.gates["t2i"][0].sum(-1), torch.ones(B, N), atol=1e-5)
    assert set(e.stream_scores) == {"l2l", "g2l", "g2g"}
    assert e.extras["fusion_gate_v"].shape == (B, N, R)
    assert not e.sims.requires_grad


@pytest.mark.parametrize("variant", ["full", "t2i", "i2t"])
def test_variants_select_terms(variant: str) -> None:
    m = make_model(variant=variant, mu=0.25).eval()
    feats, (ids, lens) = make_images(2), make_captions(4)
    e = m.explain(feats, ids, lens)
    mask = e.mask.float()[None]
    mean_rv = e.extras["r_v"].mean(-1)
    mean_rt = e.extras["r_t"].sum(-1) / mask.sum(-1)
    i2t, t2i = e.extras["g2l_i2t"], e.extras["g2l_t2i"]
    expect_l2l = {"full": 0.25 * mean_rv + 0.75 * mean_rt, "t2i": mean_rt, "i2t": mean_rv}[variant]
    expect_g2l = {"full": 0.5 * (i2t + t2i), "t2i": t2i, "i2t": i2t}[variant]
    assert torch.allclose(e.stream_scores["l2l"], expect_l2l, atol=1e-6)
    assert torch.allclose(e.stream_scores["g2l"], expect_g2l, atol=1e-6)
    assert torch.allclose(e.sims, expect_l2l + expect_g2l + e.stream_scores["g2g"], atol=1e-5)


def test_steps_weights_and_reduce() -> None:
    feats, (ids, lens) = make_images(2), make_captions(4)
    full, parts = scores(make_model(), feats, ids, lens)
    sub, sub_parts = scores(make_model(steps=["g2g", "l2l"], step_weights=[2.0, 5.0, 0.5]), feats, ids, lens)
    assert set(sub_parts) == {"l2l", "g2g"}
    assert torch.allclose(sub, 2.0 * parts["l2l"] + 0.5 * parts["g2g"], atol=1e-6)
    mean, _ = scores(make_model(score_reduce="mean"), feats, ids, lens)
    assert torch.allclose(mean, full / 3, atol=1e-6)


def test_grad_checkpoint_gives_same_gradients() -> None:
    batch, crit = _batch(), ContrastiveLoss()
    grads = []
    for flag in (False, True):
        m = make_model(grad_checkpoint=flag, dropout=0.0, pool_dropout=0.0).train()
        loss, _ = m.training_loss(batch, crit)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_loss_falls_on_a_fixed_batch() -> None:
    m = make_model(dropout=0.0, pool_dropout=0.0, chunk_size=16).train()
    batch, crit = _batch(8, seed=3), ContrastiveLoss(margin=0.2, max_violation=True)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss, _ = m.training_loss(batch, crit)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 2.0)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_autocast_bf16_runs() -> None:
    m = make_model().eval()
    feats, (ids, lens) = make_images(2), make_captions(4)
    ref, _ = scores(m, feats, ids, lens)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        low, parts = m.score_parts(m.encode_images(feats), m.encode_texts(ids, lens))
    assert torch.isfinite(low).all()
    assert torch.allclose(low.float(), ref, atol=0.1)


@pytest.mark.parametrize(
    "bad",
    [
        {"variant": "both"},
        {"steps": []},
        {"steps": ["l2l", "l2l"]},
        {"steps": ["g3g"]},
        {"context_pool": "gpo"},
        {"g2l_over": "global"},
        {"score_reduce": "max"},
        {"step_weights": [1.0, 1.0]},
        {"mu": 1.5},
        {"lambda_g": 0.0},
        {"chunk_size": 0},
        {"word_init": "glove"},
        {"word_init": "glove+learned"},  # explicit GloVe without a file
        {"not_an_option": 1},
    ],
)
def test_invalid_config_is_a_config_error(bad) -> None:
    with pytest.raises(ConfigError):
        create("shan", **{**TINY, **bad})


def test_shan_ensemble_builder() -> None:
    ens = create("shan_ensemble", **TINY).eval()
    assert [m.config.variant for m in ens.members] == ["t2i", "i2t"]
    feats, (ids, lens) = make_images(2), make_captions(3)
    with torch.no_grad():
        s = ens(feats, ids, lens)
        expect = sum(0.5 * m(feats, ids, lens) for m in ens.members)
    assert torch.allclose(s, expect, atol=1e-6)
    with pytest.raises(ConfigError):
        create("shan_ensemble", variant="full", **TINY)


# ------------------------------------------------------------------------------- GloVe
WORDS = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(V - 4)]


def write_glove(
    path: Path, dim: int = 6, skip: tuple[str, ...] = ("w1", "w2"), header: bool = False
) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(5)
    table = {w: torch.randn(dim, generator=g).tolist() for w in WORDS[4:] if w not in skip}
    lines = [f"{len(table)} {dim}"] if header else []
    lines.append(". . . " + " ".join(["0.5"] * dim))  # a token with spaces (as in glove.840B)
    lines += [w + " " + " ".join(f"{x:.6f}" for x in vec) for w, vec in table.items()]
    lines.append("w3 " + " ".join(["9.0"] * dim))  # duplicate: the first occurrence wins
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return table


@pytest.mark.parametrize(("name", "header"), [("glove.txt", False), ("glove.txt.gz", True)])
def test_read_glove(tmp_path: Path, name: str, header: bool) -> None:
    table = write_glove(tmp_path / name, header=header)
    vectors, found = read_glove(tmp_path / name, WORDS, dim=6)
    assert vectors.shape == (V, 6)
    assert found.tolist() == [False] * 4 + [w in table for w in WORDS[4:]]
    assert torch.all(vectors[~found] == 0)  # missing words -> zero vectors
    assert torch.allclose(vectors[WORDS.index("w3")], torch.tensor(table["w3"]), atol=1e-6)


def test_read_glove_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_glove(tmp_path / "missing.txt", WORDS)
    write_glove(tmp_path / "g.txt", dim=6)
    with pytest.raises(DataError, match="glove_dim=300"):
        read_glove(tmp_path / "g.txt", WORDS, dim=300)
    (tmp_path / "bad.txt").write_text("w0 1.0 abc\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1"):
        read_glove(tmp_path / "bad.txt", WORDS)
    (tmp_path / "other.txt").write_text("zebra 1.0 2.0\n", encoding="utf-8")
    with pytest.raises(DataError, match="none of"):
        read_glove(tmp_path / "other.txt", WORDS)


def test_glove_plus_learned_word_input(tmp_path: Path) -> None:
    path = tmp_path / "glove.txt"
    table = write_glove(path, dim=6)
    m = make_model(glove_path=str(path), glove_dim=6)
    assert m.config.word_init == "glove+learned"  # auto with a file
    embed = m.txt_enc.embed
    assert isinstance(embed, GloveLearnedEmbedding)
    assert m.txt_enc.cap_rnn.input_size == 6 + 8
    feats, (ids, lens) = make_images(3), make_captions(3)
    with pytest.raises(ConfigError, match="prepare"):
        m.encode_texts(ids, lens)  # never silently zero GloVe
    m.prepare(SimpleNamespace(vocab=Vocab(WORDS)))
    assert torch.allclose(embed.glove[WORDS.index("w7")], torch.tensor(table["w7"]), atol=1e-6)
    assert torch.all(embed.glove[WORDS.index("w1")] == 0)
    # frozen: a buffer, not a parameter; the learned half is trained
    assert "txt_enc.embed.glove" in m.state_dict()
    assert all("glove" not in n for n, _ in m.named_parameters())
    before = embed.glove.clone()
    m.train()
    loss, _ = m.training_loss(_batch(4), ContrastiveLoss())
    loss.backward()
    assert embed.learned.weight.grad is not None and embed.learned.weight.grad.abs().sum() > 0
    assert torch.equal(embed.glove, before)
    # a checkpoint reloads without the GloVe file (the vectors travel in the state dict)
    m.eval()
    ref, _ = scores(m, feats, ids, lens)
    path.unlink()
    twin = create("shan", **m.config.to_dict()).eval()
    twin.load_state_dict(m.state_dict())
    assert torch.equal(scores(twin, feats, ids, lens)[0], ref)
    with pytest.raises(DataError, match="not found"):
        make_model(glove_path=str(path), glove_dim=6).prepare(SimpleNamespace(vocab=Vocab(WORDS)))


def test_direct_construction_validates_config() -> None:
    cfg = SHANConfig(**TINY)
    assert cfg.word_init == "auto"
    SHAN(cfg)
    assert cfg.word_init == "learned"
