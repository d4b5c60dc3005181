"""SGRAF (SGR / SAF): vectorised scoring vs the official per-caption loop, contract tests, official checkpoints."""

from __future__ import annotations

import argparse
import copy
import os
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from thsrn_lib.data.vocab import SPECIAL_TOKENS, Vocab
from thsrn_lib.errors import CheckpointError, ConfigError, DataError
from thsrn_lib.losses import ContrastiveLoss
from thsrn_lib.models.encoders import TextEncoder
from thsrn_lib.models.layers import lengths_to_mask
from thsrn_lib.models.sgraf import (
    SAFConfig,
    SAFModel,
    SGRAFConfig,
    SGRModel,
    convert_official_checkpoint,
    from_official_checkpoint,
    load_converted,
    load_official_checkpoint,
    reference_scores,
)

V, F_, W, D, S = 40, 24, 12, 16, 8
KINDS = {"sgr": (SGRModel, SGRAFConfig), "saf": (SAFModel, SAFConfig)}


def tiny(kind: str, **over) -> SGRModel | SAFModel:
    cls, cfg_cls = KINDS[kind]
    values = dict(vocab_size=V, img_dim=F_, word_dim=W, embed_size=D, num_regions=4, sim_dim=S)
    values.update(over)
    return cls(cfg_cls(**values))


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics / affine so that eval-mode BatchNorm is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.6 - 0.3)


def make_batch(b: int, n: int, length: int, r: int = 4, seed: int = 0, min_len: int = 2):
    """Features (b, r, F), ids (n, length) with <start> ... <end> then <pad>, lengths (n,) in random order."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(b, r, F_, generator=g)
    lengths = torch.randint(min_len, length + 1, (n,), generator=g)
    ids = torch.randint(4, V, (n, length), generator=g)
    ids[:, 0] = 1
    ids[torch.arange(n), lengths - 1] = 2
    ids = ids.masked_fill(~lengths_to_mask(lengths, length), 0)
    return feats, ids, lengths


# ------------------------------------------------------------------------------------------------
# shapes, masking, block independence
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_shapes_and_embeddings(kind):
    model = tiny(kind).eval()
    feats, ids, lengths = make_batch(3, 5, 7)
    img = model.encode_images(feats)
    txt = model.encode_texts(ids, lengths)
    assert img["regions"].shape == (3, 4, D) and img["global"].shape == (3, D)
    assert txt["words"].shape == (5, 7, D) and txt["global"].shape == (5, D)
    assert txt["mask"].dtype == torch.bool and txt["mask"].shape == (5, 7)
    assert txt["lengths"].dtype == torch.long and torch.equal(txt["lengths"], lengths)
    sims, parts = model.score_parts(img, txt)
    assert sims.shape == (3, 5) and parts == {}
    assert ((sims > 0) & (sims < 1)).all()
    torch.testing.assert_close(model.global_image_vectors(img).norm(dim=-1), torch.ones(3))
    assert model.global_text_vectors(txt).shape == (5, D)


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_eval_scores_ignore_padding_order_and_blocks(kind):
    model = tiny(kind).eval()
    randomise_bn(model)
    feats, ids, lengths = make_batch(4, 6, 7, seed=1)
    with torch.no_grad():
        base = model(feats, ids, lengths)
        padded = model(feats, torch.cat([ids, torch.zeros(6, 5, dtype=torch.long)], 1), lengths)
        perm = torch.randperm(6)
        shuffled = model(feats, ids[perm], lengths[perm])
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
        from thsrn_lib.models.base import select

        top = model.score(select(img, slice(0, 1)), select(txt, slice(0, 2)))
        rest = model.score(select(img, slice(1, 4)), select(txt, slice(2, 6)))
        split_imgs = torch.cat([model(feats[:1], ids, lengths), model(feats[1:], ids, lengths)], 0)
    torch.testing.assert_close(padded, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(shuffled, base[:, perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(top, base[:1, :2], atol=1e-6, rtol=0)
    torch.testing.assert_close(rest, base[1:, 2:], atol=1e-6, rtol=0)
    torch.testing.assert_close(split_imgs, base, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# vectorised == official per-caption loop
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sgr", "saf"])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_equals_reference_in_eval(kind, seed):
    model = tiny(kind, sgr_step=2 + seed).eval()
    randomise_bn(model, seed)
    feats, ids, lengths = make_batch(5, 7, 9, seed=seed, min_len=1)
    with torch.no_grad():
        fast = model(feats, ids, lengths)
        slow = reference_scores(model, feats, ids, lengths)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_length_grouping_is_exact(kind):
    """Large caption blocks are scored in groups of similar length; results equal one block and the loop."""
    model = tiny(kind).eval()
    randomise_bn(model, 4)
    feats, ids, lengths = make_batch(3, 32, 14, seed=4, min_len=2)
    lengths[0] = 14  # a long tail: grouping is worth it
    ids = ids.masked_fill(~lengths_to_mask(lengths, 14), 0)
    with torch.no_grad():
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
        assert len(model._length_groups(lengths)[1]) > 1
        grouped = model.score(img, txt)
        model.max_length_buckets = 1
        single = model.score(img, txt)
        slow = reference_scores(model, feats, ids, lengths)
    torch.testing.assert_close(grouped, single, atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped, slow, atol=1e-5, rtol=0)
    if kind == "sgr":  # no BatchNorm after encoding: grouping is exact in train mode too, gradients included
        model.train()
        model.max_length_buckets = 4
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
        g1 = torch.autograd.grad(model.score(img, txt).sum(), txt["words"], retain_graph=True)[0]
        model.max_length_buckets = 1
        g2 = torch.autograd.grad(model.score(img, txt).sum(), txt["words"])[0]
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=0)
    else:
        model.train()
        assert len(model._length_groups(lengths)[1]) == 1  # per-caption BN order is preserved


def test_saf_train_mode_per_caption_batchnorm_equals_sequential_reference():
    model = tiny("saf", dropout=0.0).train()  # no dropout: only the BatchNorm statistics differ
    randomise_bn(model, 3)
    twin = copy.deepcopy(model)
    feats, ids, lengths = make_batch(4, 6, 8, seed=3)
    fast = model(feats, ids, lengths)
    slow = reference_scores(twin, feats, ids, lengths)  # calls the BatchNorm once per caption
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert int(model.sim_enc.SAF_module.bn.num_batches_tracked) == 6  # once per caption
    # The "pooled" option really differs (one statistic for the block, one update).
    pooled = tiny("saf", dropout=0.0, saf_bn_stats="pooled").train()
    pooled.load_state_dict(twin.state_dict())
    out = pooled(feats, ids, lengths)
    assert not torch.allclose(out, fast, atol=1e-4)


def test_train_mode_needs_two_images_and_the_right_region_count():
    model = tiny("sgr").train()
    feats, ids, lengths = make_batch(1, 2, 5)
    with pytest.raises(DataError, match="at least 2 images"):
        model(feats, ids, lengths)
    model.eval()
    assert model(feats, ids, lengths).shape == (1, 2)  # eval mode is fine with one image
    with pytest.raises(DataError, match="num_regions=5"):
        model(torch.rand(2, 5, F_), ids, lengths)
    with pytest.raises(DataError, match="lengths"):
        model(torch.rand(2, 4, F_), ids, torch.tensor([0, 3]))


def test_config_validation():
    with pytest.raises(ConfigError, match="module_name"):
        SGRAFConfig(module_name="AVE").validate()
    with pytest.raises(ConfigError, match="saf_bn_stats"):
        SAFConfig(saf_bn_stats="mean").validate()
    with pytest.raises(ConfigError, match="'saf'"):
        SGRModel(SGRAFConfig(module_name="SAF", vocab_size=V, img_dim=F_, embed_size=D, sim_dim=S))
    with pytest.raises(ConfigError, match="smooth"):
        SGRAFConfig(smooth=0.0).validate()
    assert SGRAFConfig().module_name == "SGR" and SAFConfig().module_name == "SAF"
    assert SGRAFConfig().smooth == 9.0 and SGRAFConfig().saf_bn_stats == "per_caption"


# ------------------------------------------------------------------------------------------------
# explain
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_explain(kind):
    model = tiny(kind).eval()
    feats, ids, lengths = make_batch(3, 4, 6, seed=4)
    ex = model.explain(feats, ids, lengths)
    mask = ex.mask
    torch.testing.assert_close(ex.sims, model(feats, ids, lengths).detach(), atol=1e-6, rtol=0)
    a = ex.attention["t2i"]
    assert a.shape == (3, 4, 6, 4) and not a.requires_grad
    valid = a[:, mask]  # (B, n_valid, R)
    torch.testing.assert_close(valid.sum(-1), torch.ones(valid.shape[:2]))
    assert ex.node_layout["t2i"] == ["global", "local"]
    node_mask = torch.cat([torch.ones(4, 1, dtype=torch.bool), mask], 1)
    if kind == "sgr":
        assert len(ex.edges["t2i"]) == 3
        for e in ex.edges["t2i"]:
            assert e.shape == (3, 4, 7, 7)
            torch.testing.assert_close(e.sum(-1), torch.ones(3, 4, 7))
            assert (e.masked_select(~node_mask[None, :, None, :].expand_as(e)) == 0).all()
        assert ex.gates == {}
    else:
        (beta,) = ex.gates["t2i"]
        full = ex.extras["beta_with_global"]
        assert beta.shape == (3, 4, 6) and full.shape == (3, 4, 7)
        torch.testing.assert_close(full[..., 1:], beta)
        torch.testing.assert_close(full.sum(-1), torch.ones(3, 4), atol=1e-6, rtol=0)
        assert (beta.masked_select(~mask.expand_as(beta)) == 0).all()


# ------------------------------------------------------------------------------------------------
# training behaviour
# ------------------------------------------------------------------------------------------------
def _batch(b: int, length: int, seed: int):
    feats, ids, lengths = make_batch(b, b, length, seed=seed)
    return types.SimpleNamespace(
        images=feats,
        ids=ids,
        lengths=lengths,
        mask=lengths_to_mask(lengths, length),
        image_index=torch.arange(b),
        caption_index=torch.arange(b),
    )


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_gradients_reach_every_parameter(kind):
    model = tiny(kind).train()
    loss, logs = model.training_loss(_batch(4, 6, 5), ContrastiveLoss(0.2, max_violation=False))
    loss.backward()
    assert "loss_rank" in logs
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert missing == []
    # Each SGR layer's key bias adds the same amount to all key logits of a query, which the softmax
    # removes: its gradient is zero up to rounding (as in the official code). Every other gradient is non-zero.
    key_bias = {f"sim_enc.SGR_module.{k}.graph_key_w.bias" for k in range(model.config.sgr_step)}
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n not in key_bias)


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_loss_falls_in_a_short_run(kind):
    torch.manual_seed(0)
    model = tiny(kind, embed_size=16, img_dim=16).train()
    g = torch.Generator().manual_seed(0)
    batch = _batch(8, 7, 6)
    batch.images = torch.randn(8, 4, 16, generator=g)
    crit = ContrastiveLoss(0.2, max_violation=False)  # hardest negatives plateau for epochs (spec §8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss, _ = model.training_loss(batch, crit)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_determinism_under_a_seed(kind):
    feats, ids, lengths = make_batch(3, 4, 6, seed=7)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = tiny(kind).eval()
        with torch.no_grad():
            outs.append(model(feats, ids, lengths))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_config_round_trip(kind):
    model = tiny(kind, sgr_step=2, smooth=5.0).eval()
    randomise_bn(model)
    cfg = model.config.to_dict()
    clone = type(model)(type(model).config_class.from_dict(cfg))
    clone.load_state_dict(model.state_dict())
    clone.eval()
    feats, ids, lengths = make_batch(3, 4, 6, seed=8)
    with torch.no_grad():
        assert torch.equal(clone(feats, ids, lengths), model(feats, ids, lengths))
    try:
        from thsrn_lib.models import create

        made = create(kind, **cfg)
    except ModuleNotFoundError as exc:  # the registry imports every built-in model module
        pytest.skip(f"registry cannot load all built-in models yet: {exc}")
    assert type(made) is type(model) and made.config == model.config
    made.load_state_dict(model.state_dict())
    made.eval()
    with torch.no_grad():
        assert torch.equal(made(feats, ids, lengths), model(feats, ids, lengths))


def test_autocast_bf16_is_finite_and_close():
    model = tiny("saf").eval()
    feats, ids, lengths = make_batch(3, 4, 6, seed=9)
    with torch.no_grad():
        ref = model(feats, ids, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(feats, ids, lengths)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=0)


# ------------------------------------------------------------------------------------------------
# parameter counts (spec §6) at the default configuration
# ------------------------------------------------------------------------------------------------
def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_spec():
    sgr, saf = SGRModel(SGRAFConfig()), SAFModel(SAFConfig())
    assert _count(sgr) == 18_109_175 and _count(saf) == 17_517_306
    for m in (sgr, saf):
        assert _count(m.img_enc) == 2_098_176
        assert _count(m.txt_enc) == 10_691_244
        assert _count(m.sim_enc.v_global_w) == 2_102_345
        assert _count(m.sim_enc.t_global_w) == 2_100_225
        assert _count(m.sim_enc.sim_tranloc_w) == _count(m.sim_enc.sim_tranglo_w) == 262_400
        assert _count(m.sim_enc.sim_eval_w) == 257
    assert _count(sgr.sim_enc) == 5_319_755 and _count(saf.sim_enc) == 4_727_886
    assert _count(sgr.sim_enc.SGR_module) == 592_128 and _count(saf.sim_enc.SAF_module) == 259
    assert _count(TextEncoder(11_353, 300, 1024)) == 11_552_844  # COCO vocabulary
    # Official state-dict layout (spec §10.3): key counts per part.
    assert len(sgr.img_enc.state_dict()) == 2 and len(sgr.txt_enc.state_dict()) == 9
    assert len(sgr.sim_enc.state_dict()) == 46 and len(saf.sim_enc.state_dict()) == 35
    sd = sgr.sim_enc.state_dict()
    assert sd["v_global_w.embedding_local.1.running_mean"].shape == (36,)
    assert sd["SGR_module.2.sim_graph_w.weight"].shape == (256, 256)
    assert saf.sim_enc.state_dict()["SAF_module.attn_sim_w.weight"].shape == (1, 256)


@torch.no_grad()
def test_initialisation_follows_the_spec():
    model = tiny("sgr")
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            r = (6.0 / (m.in_features + m.out_features)) ** 0.5
            assert float(m.weight.abs().max()) <= r + 1e-7, name
            assert float(m.weight.abs().max()) > 0.5 * r, name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        elif isinstance(m, nn.BatchNorm1d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    assert float(model.txt_enc.embed.weight.abs().max()) <= 0.1


# ------------------------------------------------------------------------------------------------
# official checkpoints
# ------------------------------------------------------------------------------------------------
def _opt(model, **over) -> argparse.Namespace:
    c = model.config
    values = dict(
        data_path="/data",
        data_name="f30k_precomp",
        vocab_path="./vocab/",
        model_name="./runs/x",
        logger_name="./runs/log",
        batch_size=128,
        num_epochs=40,
        lr_update=30,
        learning_rate=2e-4,
        workers=10,
        log_step=10,
        val_step=1000,
        grad_clip=2.0,
        margin=0.2,
        max_violation=True,
        img_dim=c.img_dim,
        word_dim=c.word_dim,
        embed_size=c.embed_size,
        sim_dim=c.sim_dim,
        num_layers=c.num_layers,
        bi_gru=c.bi_gru,
        no_imgnorm=False,
        no_txtnorm=False,
        module_name=c.module_name,
        sgr_step=c.sgr_step,
        vocab_size=c.vocab_size,
    )
    values.update(over)
    return argparse.Namespace(**values)


def save_official(model, path: Path, sds=None, **opt_over) -> Path:
    if sds is None:
        sds = [model.img_enc.state_dict(), model.txt_enc.state_dict(), model.sim_enc.state_dict()]
    torch.save({"epoch": 12, "model": sds, "best_rsum": 480.5, "opt": _opt(model, **opt_over), "Eiters": 13596}, path)
    return path


@pytest.mark.parametrize("kind", ["sgr", "saf"])
@pytest.mark.parametrize("regions", [36, 4])
def test_official_round_trip(tmp_path, kind, regions):
    model = tiny(kind, num_regions=regions).eval()
    randomise_bn(model, 5)
    path = save_official(model, tmp_path / "model_best.pth.tar")
    ckpt = load_official_checkpoint(path)
    loaded = ckpt.model
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config
    assert (ckpt.epoch, ckpt.best_rsum, ckpt.eiters) == (12, 480.5, 13596)
    assert ckpt.vocab is None  # no f30k_precomp_vocab.json next to the file
    feats, ids, lengths = make_batch(3, 5, 7, r=regions, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(feats, ids, lengths), model(feats, ids, lengths))
        torch.testing.assert_close(
            loaded(feats, ids, lengths), reference_scores(loaded, feats, ids, lengths), atol=1e-5, rtol=0
        )


def test_official_without_num_batches_tracked_and_cuda_saved_options(tmp_path):
    model = tiny("saf", num_regions=36).eval()
    sds = [
        model.img_enc.state_dict(),
        model.txt_enc.state_dict(),
        {k: v for k, v in model.sim_enc.state_dict().items() if not k.endswith("num_batches_tracked")},
    ]
    path = save_official(model, tmp_path / "ckpt.pth.tar", sds=sds, bi_gru=True, some_future_flag="ignored")
    loaded = from_official_checkpoint(path, map_location="cpu")
    feats, ids, lengths = make_batch(2, 3, 5, r=36)
    with torch.no_grad():
        assert torch.equal(loaded(feats, ids, lengths), model(feats, ids, lengths))


def _tamper(model, part: int, fn):
    sds = [dict(model.img_enc.state_dict()), dict(model.txt_enc.state_dict()), dict(model.sim_enc.state_dict())]
    fn(sds[part])
    return sds


@pytest.mark.parametrize(
    "part, fn, match",
    [
        (2, lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)), "extra.weight"),
        (0, lambda sd: sd.pop("fc.bias"), "fc.bias"),
        (2, lambda sd: sd.__setitem__("sim_eval_w.bias", torch.zeros(2)), r"sim_eval_w.bias has shape \(2,\)"),
        (2, lambda sd: sd.__setitem__("SAF_module.bn.weight", torch.ones(1)), "exactly one of"),
        (1, lambda sd: sd.pop("embed.weight"), "embed.weight"),
    ],
)
def test_tampered_state_dicts_are_refused(tmp_path, part, fn, match):
    model = tiny("sgr", num_regions=36)
    path = save_official(model, tmp_path / "bad.pth.tar", sds=_tamper(model, part, fn))
    with pytest.raises(CheckpointError, match=match) as info:
        from_official_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "key, value", [("embed_size", 1024), ("module_name", "SAF"), ("vocab_size", 8481), ("sgr_step", 4)]
)
def test_opt_disagreeing_with_tensors_is_refused(tmp_path, key, value):
    model = tiny("sgr", num_regions=36)
    path = save_official(model, tmp_path / "opt.pth.tar", **{key: value})
    with pytest.raises(CheckpointError) as info:
        from_official_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and key in msg and repr(value) in msg


class _Smuggled:
    """A custom class: not allow-listed, must never be instantiated by the loader."""

    created = False

    def __setstate__(self, state):
        _Smuggled.created = True


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_not_executed(tmp_path):
    model = tiny("sgr", num_regions=36)
    marker = tmp_path / "pwned"
    sds = [model.img_enc.state_dict(), model.txt_enc.state_dict(), model.sim_enc.state_dict()]
    evil = tmp_path / "evil.pth.tar"
    torch.save({"epoch": 1, "model": sds, "best_rsum": 0.0, "opt": _Payload(str(marker)), "Eiters": 1}, evil)
    with pytest.raises(CheckpointError, match="refused") as info:
        from_official_checkpoint(evil)
    assert str(evil) in str(info.value)
    assert not marker.exists()
    custom = tmp_path / "custom.pth.tar"
    torch.save({"epoch": 1, "model": sds, "best_rsum": 0.0, "opt": _opt(model), "Eiters": 1, "x": _Smuggled()}, custom)
    with pytest.raises(CheckpointError, match="_Smuggled"):
        from_official_checkpoint(custom)
    assert _Smuggled.created is False


def test_broken_files_and_layouts(tmp_path):
    model = tiny("sgr", num_regions=36)
    good = save_official(model, tmp_path / "good.pth.tar")
    data = good.read_bytes()
    cases = {
        "missing.pth.tar": None,
        "garbage.pth.tar": b"this is not a checkpoint" * 20,
        "truncated.pth.tar": data[: len(data) // 2],
        "empty.pth.tar": b"",
    }
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            from_official_checkpoint(p)
        assert str(p) in str(info.value), name
    sds = [model.img_enc.state_dict(), model.txt_enc.state_dict(), model.sim_enc.state_dict()]
    layouts = {
        "list.pth.tar": (sds, "not a dict"),
        "two.pth.tar": ({"model": sds[:2], "opt": _opt(model)}, "list of 3"),
        "noopt.pth.tar": ({"model": sds}, "'opt'"),
        "dictmodel.pth.tar": ({"model": {"a": sds[0]}, "opt": _opt(model)}, "list of 3"),
        "nontensor.pth.tar": ({"model": [sds[0], {"embed.weight": 3}, sds[2]], "opt": _opt(model)}, "non-tensor"),
    }
    for name, (obj, match) in layouts.items():
        p = tmp_path / name
        torch.save(obj, p)
        with pytest.raises(CheckpointError, match=match):
            from_official_checkpoint(p)


def _vocab(size: int) -> Vocab:
    return Vocab(list(SPECIAL_TOKENS) + [f"w{i}" for i in range(size - len(SPECIAL_TOKENS))])


def test_vocab_check_and_conversion(tmp_path):
    model = tiny("saf", num_regions=36).eval()
    randomise_bn(model, 2)
    path = save_official(model, tmp_path / "model_best.pth.tar")
    _vocab(V).save(tmp_path / "f30k_precomp_vocab.json")  # found next to the checkpoint
    ckpt = load_official_checkpoint(path)
    assert ckpt.vocab is not None and len(ckpt.vocab) == V
    wrong = tmp_path / "other_vocab.json"
    _vocab(V + 3).save(wrong)
    with pytest.raises(CheckpointError, match=f"{V + 3} words") as info:
        from_official_checkpoint(path, vocab_path=wrong)
    assert str(wrong) in str(info.value) and str(path) in str(info.value)

    out = convert_official_checkpoint(
        path, tmp_path / "converted" / "saf.pt", vocab_path=tmp_path / "f30k_precomp_vocab.json"
    )
    raw = torch.load(out, weights_only=True)  # plain data only
    assert raw["format"] == "thsrn-model" and raw["model_name"] == "saf"
    assert raw["config"] == model.config.to_dict() and raw["vocab"]["idx"] == V
    again, vocab = load_converted(out)
    assert vocab == ckpt.vocab and not again.training
    feats, ids, lengths = make_batch(2, 3, 6, r=36)
    with torch.no_grad():
        assert torch.equal(again(feats, ids, lengths), model(feats, ids, lengths))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_converted(tmp_path / "junk.pt")


def test_real_vocab_sizes(tmp_path, scan_captions_dir):
    model = tiny("sgr", num_regions=36, vocab_size=8481).eval()
    path = save_official(model, tmp_path / "f30k.pth.tar")
    vocab_dir = scan_captions_dir / "vocab"
    ckpt = load_official_checkpoint(path, vocab_path=vocab_dir / "f30k_precomp_vocab.json")
    assert len(ckpt.vocab) == 8481
    with pytest.raises(CheckpointError, match="11353 words"):
        from_official_checkpoint(path, vocab_path=vocab_dir / "coco_precomp_vocab.json")


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_fast_inference_path_equals_plain_path_and_reference(kind):
    """The packed, tiled inference path (tiny tiles: several tiles per block) equals the plain
    vectorised path and the per-caption loop."""
    model = tiny(kind).eval()
    randomise_bn(model, 9)
    feats, ids, lengths = make_batch(5, 11, 9, seed=9, min_len=2)
    model.tile_images, model.tile_captions = 2, 3
    with torch.no_grad():
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
        assert model._use_fast_path(img, txt)
        fast = model.score(img, txt)
        model.use_fast_path = False
        plain = model.score(img, txt)
        slow = reference_scores(model, feats, ids, lengths)
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    assert not model._use_fast_path(img, txt) or not model.use_fast_path
    model.use_fast_path = True
    assert not model.train()._use_fast_path(img, txt)  # train mode keeps the plain path
