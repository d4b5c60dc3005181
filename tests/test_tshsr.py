"""TSHSR (reconstruction): contract tests for the default config and the main switch combinations,
vectorised scoring vs the per-caption reference, BatchNorm semantics, SGR equivalence, spec counts."""
from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import nn

from thsrn_lib.errors import ConfigError, DataError
from thsrn_lib.losses import ContrastiveLoss
from thsrn_lib.models.base import select
from thsrn_lib.models.layers import lengths_to_mask
from thsrn_lib.models.similarity import SGRStep
from thsrn_lib.models.tshsr import HSRB, TSHSR, TSHSRConfig, sgr_step

V, F_, W, D, S, R = 40, 24, 12, 16, 8, 4

# Key switch combinations; every contract test runs on each of them.
VARIANTS: dict[str, dict] = {
    "default": {},
    "hsr_B": dict(hsr="B"),
    "hsr_sgr": dict(hsr="sgr"),
    "hsr_saf": dict(hsr="saf"),
    "hsr_mean": dict(hsr="mean"),
    "fusion_learned": dict(fusion="learned"),
    # With fusion="mlp" the per-stream heads only feed the auxiliary loss: gamma > 0 trains them.
    "fusion_mlp": dict(fusion="mlp", aux_stream_loss_weight=1.0),
    "t2i_only": dict(streams=("t2i",)),
    "i2t_only": dict(streams=("i2t",)),
    "readout_concat": dict(readout="concat"),
    "share_hsr_and_global": dict(share_hsr=True, share_global_proj=True),
    "share_hsr_B": dict(share_hsr=True, hsr="B", hsrb_kernel_sizes=(2, 4), hsrb_num_queries=3, hsrb_steps=2),
    "A0_no_gate_norm": dict(context_conditioning=False, context_gate_norm="none", hsr_levels=2),
    "bn_pooled_H4": dict(bn_stats="pooled", hsr_levels=4),
}


def tiny(**over) -> TSHSR:
    values = dict(vocab_size=V, img_dim=F_, word_dim=W, embed_size=D, num_regions=R, sim_dim=S)
    values.update(over)
    return TSHSR(TSHSRConfig(**values))


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics / affine and fusion weight, so eval mode exercises them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.6 - 0.3)
        if getattr(model, "fusion_logit", None) is not None:
            model.fusion_logit.fill_(0.7)


def make_batch(b: int, n: int, length: int, seed: int = 0, min_len: int = 2):
    """Features (b, R, F), ids (n, length) with <start> ... <end> then <pad>, lengths (n,) in random order."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(b, R, F_, generator=g)
    lengths = torch.randint(min_len, length + 1, (n,), generator=g)
    lengths[0] = length  # at least one caption without padding
    ids = torch.randint(4, V, (n, length), generator=g)
    ids[:, 0] = 1
    ids[torch.arange(n), lengths - 1] = 2
    ids = ids.masked_fill(~lengths_to_mask(lengths, length), 0)
    return feats, ids, lengths


def _train_batch(b: int, length: int, seed: int):
    feats, ids, lengths = make_batch(b, b, length, seed=seed)
    return types.SimpleNamespace(
        images=feats, ids=ids, lengths=lengths, mask=lengths_to_mask(lengths, length),
        image_index=torch.arange(b), caption_index=torch.arange(b),
    )


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


variants = pytest.mark.parametrize("variant", list(VARIANTS))


# ------------------------------------------------------------------------------------------------
# configuration and spec numbers
# ------------------------------------------------------------------------------------------------
def test_defaults_are_the_spec_reconstruction():
    cfg = TSHSRConfig()
    assert (cfg.embed_size, cfg.sim_dim, cfg.word_dim, cfg.img_dim, cfg.num_regions) == (1024, 256, 300, 2048, 36)
    assert (cfg.lambda_t2i, cfg.lambda_i2t, cfg.streams, cfg.share_global_proj) == (9.0, 4.0, ("t2i", "i2t"), False)
    assert (cfg.hsr, cfg.hsr_levels, cfg.context_conditioning, cfg.context_gate_norm, cfg.bn_stats) == (
        "A", 3, True, "bn", "per_caption"
    )
    assert (cfg.readout, cfg.share_hsr, cfg.fusion, cfg.aux_stream_loss_weight) == ("global", False, "mean", 0.0)
    assert (cfg.hsrb_kernel_sizes, cfg.hsrb_num_queries, cfg.hsrb_steps) == ((2, 3), 4, 3)
    assert cfg.exclude_same_image_negatives is False and cfg.dropout == 0.4
    assert TSHSR.__doc__ and "arxiv.org/abs/2203.05349" in TSHSR.__doc__ and "abstract" in TSHSR.__doc__


def test_parameter_count_matches_spec():
    """Spec §5: 19,227,914 with the F30K vocabulary (8,481); 1,117,962 per stream."""
    model = TSHSR(TSHSRConfig(vocab_size=8481))  # built, never run

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(model) == 19_227_914
    assert count(model.img_enc) + count(model.txt_enc) == 12_789_420
    assert count(model.v_global_w) + count(model.t_global_w) == 4_202_570
    for s in ("t2i", "i2t"):
        stream = model.streams[s]
        assert count(stream) == 1_117_962
        assert count(stream.hsr.levels[0]) == 197_635  # gate 257 + BN 2 + SGR 197,376


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(streams=()), "streams"),
        (dict(streams=("t2i", "t2i")), "streams"),
        (dict(streams=("img",)), "streams"),
        (dict(hsr="C"), "hsr"),
        (dict(fusion="max"), "fusion"),
        (dict(fusion="learned", streams=("t2i",)), "fusion"),
        (dict(readout="concat", hsr="sgr"), "readout"),
        (dict(context_gate_norm="ln"), "context_gate_norm"),
        (dict(bn_stats="batch"), "bn_stats"),
        (dict(hsr_levels=0), "hsr_levels"),
        (dict(lambda_i2t=0.0), "lambda_i2t"),
        (dict(hsrb_kernel_sizes=(2, 2)), "hsrb_kernel_sizes"),
        (dict(aux_stream_loss_weight=-1.0), "aux_stream_loss_weight"),
        (dict(sim_dim=2.5), "sim_dim"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_invalid_configs_are_refused(over, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**over)


def test_bad_inputs_raise_data_errors():
    model = tiny().eval()
    feats, ids, lengths = make_batch(2, 3, 5)
    with pytest.raises(DataError, match="num_regions"):
        model.encode_images(torch.rand(2, R + 1, F_))
    with pytest.raises(DataError, match="lengths"):
        model.encode_texts(ids, torch.tensor([6, 2, 2]))
    with pytest.raises(DataError, match="lengths"):
        model.encode_texts(ids, lengths[:2])
    with pytest.raises(DataError, match="at least 2 images"):
        model.train().encode_images(feats[:1])


# ------------------------------------------------------------------------------------------------
# contract tests, on every variant
# ------------------------------------------------------------------------------------------------
@variants
def test_shapes_parts_and_global_vectors(variant):
    model = tiny(**VARIANTS[variant]).eval()
    feats, ids, lengths = make_batch(3, 5, 7)
    with torch.no_grad():
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
        sims, parts = model.score_parts(img, txt)
    assert img["regions"].shape == (3, R, D) and img["global"].shape == (3, D)
    assert txt["words"].shape == (5, 7, D) and txt["global"].shape == (5, D)
    assert txt["mask"].dtype == torch.bool and torch.equal(txt["lengths"], lengths)
    assert sims.shape == (3, 5) and ((sims > 0) & (sims < 1)).all()
    assert set(parts) == set(model.config.streams) and all(p.shape == (3, 5) for p in parts.values())
    if model.config.fusion == "mean" and len(parts) == 2:
        torch.testing.assert_close(sims, (parts["t2i"] + parts["i2t"]) / 2)
    if len(parts) == 1:
        assert torch.equal(sims, next(iter(parts.values())))
    assert torch.equal(model.global_image_vectors(img), img["global"])
    assert torch.equal(model.global_text_vectors(txt), txt["global"])
    torch.testing.assert_close(img["global"].norm(dim=-1), torch.ones(3))


@variants
def test_vectorised_equals_per_caption_reference_in_eval(variant):
    model = tiny(**VARIANTS[variant]).eval()
    randomise(model, 1)
    feats, ids, lengths = make_batch(4, 7, 9, seed=2, min_len=1)
    with torch.no_grad():
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
        fast, fast_parts = model.score_parts(img, txt)
        slow, slow_parts = model.reference_score_parts(img, txt)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    for s in slow_parts:
        torch.testing.assert_close(fast_parts[s], slow_parts[s], atol=1e-5, rtol=0)


@variants
def test_eval_scores_ignore_padding_order_and_blocks(variant):
    model = tiny(**VARIANTS[variant]).eval()
    randomise(model, 2)
    feats, ids, lengths = make_batch(4, 6, 7, seed=3)
    with torch.no_grad():
        base = model(feats, ids, lengths)
        padded = model(feats, torch.cat([ids, torch.zeros(6, 4, dtype=torch.long)], 1), lengths)
        perm = torch.randperm(6)
        shuffled = model(feats, ids[perm], lengths[perm])
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
        top = model.score(select(img, slice(0, 1)), select(txt, slice(0, 2)))
        rest = model.score(select(img, slice(1, 4)), select(txt, slice(2, 6)))
        split_imgs = torch.cat([model(feats[:1], ids, lengths), model(feats[1:], ids, lengths)], 0)
    torch.testing.assert_close(padded, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(shuffled, base[:, perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(top, base[:1, :2], atol=1e-6, rtol=0)
    torch.testing.assert_close(rest, base[1:, 2:], atol=1e-6, rtol=0)
    torch.testing.assert_close(split_imgs, base, atol=1e-6, rtol=0)


@variants
def test_gradients_reach_every_parameter(variant):
    model = tiny(**VARIANTS[variant]).train()
    loss, logs = model.training_loss(_train_batch(4, 6, 5), ContrastiveLoss(0.2, max_violation=False))
    loss.backward()
    assert "loss_rank" in logs and torch.isfinite(loss)
    bad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert bad == []
    # Structurally zero up to rounding (as in SGRAF): a bias that shifts every logit of a softmax
    # equally (SGR keys, the self-attention scores) or that precedes a train-mode BatchNorm (the
    # gates) cancels. Every other gradient must be non-zero.
    gate_bn = model.config.context_gate_norm == "bn" or model.config.hsr == "saf"
    exempt = ("graph_key_w.bias", "embedding_common.0.bias") + (("attn_sim_w.bias",) if gate_bn else ())
    dead = [n for n, p in model.named_parameters() if not n.endswith(exempt) and float(p.grad.abs().sum()) == 0]
    assert dead == []


@variants
def test_determinism_under_a_seed(variant):
    feats, ids, lengths = make_batch(3, 4, 6, seed=7)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = tiny(**VARIANTS[variant]).eval()
        with torch.no_grad():
            outs.append(model(feats, ids, lengths))
    assert torch.equal(outs[0], outs[1])


@variants
def test_config_round_trip(variant):
    model = tiny(**VARIANTS[variant]).eval()
    randomise(model, 3)
    cfg = model.config.to_dict()
    clone = TSHSR(TSHSRConfig.from_dict(cfg))
    assert clone.config == model.config
    clone.load_state_dict(model.state_dict())
    clone.eval()
    feats, ids, lengths = make_batch(3, 4, 6, seed=8)
    with torch.no_grad():
        assert torch.equal(clone(feats, ids, lengths), model(feats, ids, lengths))
    try:
        from thsrn_lib.models import create

        made = create("tshsr", **cfg)
    except ModuleNotFoundError as exc:  # the registry imports every built-in model module
        pytest.skip(f"registry cannot load all built-in models yet: {exc}")
    assert type(made) is TSHSR and made.config == model.config
    made.load_state_dict(model.state_dict())
    made.eval()
    with torch.no_grad():
        assert torch.equal(made(feats, ids, lengths), model(feats, ids, lengths))


@variants
def test_explain_maps(variant):
    model = tiny(**VARIANTS[variant]).eval()
    randomise(model, 4)
    b, n, length = 3, 4, 7
    feats, ids, lengths = make_batch(b, n, length, seed=5)
    expl = model.explain(feats, ids, lengths)
    mask = lengths_to_mask(lengths, length)
    with torch.no_grad():
        sims = model(feats, ids, lengths)
    torch.testing.assert_close(expl.sims, sims, atol=1e-6, rtol=0)
    assert torch.equal(expl.mask, mask)
    assert set(expl.stream_scores) == set(model.config.streams) | {"fused"}
    assert torch.equal(expl.stream_scores["fused"], expl.sims)
    levels = {"A": model.config.hsr_levels, "sgr": model.config.hsr_levels, "B": model.config.hsrb_steps}
    for s in model.config.streams:
        n_local = length if s == "t2i" else R
        local_mask = mask if s == "t2i" else torch.ones(n, R, dtype=torch.bool)
        att = expl.attention[s]
        if s == "t2i":
            assert att.shape == (b, n, length, R)
            torch.testing.assert_close(att.sum(-1), mask.expand(b, n, length).float())
        else:
            assert att.shape == (b, n, R, length)
            torch.testing.assert_close(att.sum(-1), torch.ones(b, n, R))
            assert (att.masked_select(~mask[None, :, None, :].expand_as(att)) == 0).all()
        sizes = expl.extras["node_group_sizes"][s]
        layout = expl.node_layout[s]
        assert len(sizes) == len(layout) and layout[0] == "global" and layout[-1] == "local" and sizes[-1] == n_local
        edges = expl.edges[s]
        assert len(edges) == levels.get(model.config.hsr, 0)
        for e, valid in zip(edges, expl.extras["edge_masks"][s]):
            p = sum(sizes)
            assert e.shape == (b, n, p, p) and valid.shape == (n, p)
            row_sums = e.sum(-1)
            torch.testing.assert_close(row_sums * valid, valid.float().expand_as(row_sums))  # rows of present nodes
            assert (e.masked_select(~valid[None, :, None, :].expand_as(e)) == 0).all()  # absent / padded keys
        if model.config.hsr == "A":
            assert layout == ["global"] + [f"context:{h + 1}" for h in range(model.config.hsr_levels)] + ["local"]
        if model.config.hsr in ("A", "saf"):
            gates = expl.gates[s]
            assert len(gates) == (model.config.hsr_levels if model.config.hsr == "A" else 1)
            for g in gates:
                assert g.shape == (b, n, n_local)
                assert (g.masked_select(~local_mask.expand(b, n, n_local)) == 0).all()
                if model.config.hsr == "A":  # the context gate is normalised over the local nodes
                    torch.testing.assert_close(g.sum(-1), torch.ones(b, n), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# model-specific behaviour
# ------------------------------------------------------------------------------------------------
def test_hsr_a_edges_keep_a_common_layout_across_levels():
    model = tiny(hsr_levels=3).eval()
    feats, ids, lengths = make_batch(2, 3, 6, seed=6)
    expl = model.explain(feats, ids, lengths)
    for s in ("t2i", "i2t"):
        for h, (e, valid) in enumerate(zip(expl.edges[s], expl.extras["edge_masks"][s]), start=1):
            present_contexts = valid[:, 1:4]
            assert present_contexts[:, :h].all() and not present_contexts[:, h:].any()
            assert (e[:, :, 1 + h : 4].abs().sum() == 0) and (e[:, :, :, 1 + h : 4].abs().sum() == 0)


def test_hsr_b_phrase_nodes_overlapping_padding_are_masked():
    model = tiny(hsr="B", hsrb_kernel_sizes=(2, 3), streams=("t2i",)).eval()
    length = 6
    feats, ids, lengths = make_batch(2, 4, length, seed=9)
    lengths = torch.tensor([6, 2, 3, 5])
    ids = ids.masked_fill(~lengths_to_mask(lengths, length), 0)
    expl = model.explain(feats, ids, lengths)
    assert expl.node_layout["t2i"] == ["global", "phrase:2", "phrase:3", "local"]
    assert expl.extras["node_group_sizes"]["t2i"] == [1, length - 1, length - 2, length]
    valid = expl.extras["edge_masks"]["t2i"][0]
    k2, k3 = valid[:, 1:length], valid[:, length : 2 * length - 2]
    assert k2.sum(1).tolist() == [5, 1, 2, 4] and k3.sum(1).tolist() == [4, 0, 1, 3]
    assert all(bool(valid[j, 1 : 1 + int(lengths[j]) - 1].all()) for j in range(4))  # valid ones come first


def test_hsr_b_clusters_are_soft_assignments_over_regions():
    model = tiny(hsr="B", streams=("i2t",), hsrb_num_queries=3).eval()
    feats, ids, lengths = make_batch(2, 3, 5, seed=10)
    expl = model.explain(feats, ids, lengths)
    alpha = expl.extras["cluster_weights"]["i2t"]
    assert alpha.shape == (2, 3, 3, R)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 3, 3))
    assert expl.node_layout["i2t"] == ["global", "cluster:1", "cluster:2", "cluster:3", "local"]


@pytest.mark.parametrize("variant", ["default", "hsr_B"])
def test_length_grouping_is_exact(variant):
    """Large caption blocks are scored in length groups, each trimmed; equal to one block and the loop."""
    model = tiny(**VARIANTS[variant]).eval()
    randomise(model, 5)
    feats, ids, lengths = make_batch(3, 32, 14, seed=11)
    assert model._length_groups(lengths) is not None  # the grouped path really runs
    with torch.no_grad():
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
        grouped, grouped_parts = model.score_parts(img, txt)
        model.max_length_buckets = 1
        whole, whole_parts = model.score_parts(img, txt)
        slow, _ = model.reference_score_parts(img, txt)
    torch.testing.assert_close(grouped, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped_parts["i2t"], whole_parts["i2t"], atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped, slow, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["default", "share_hsr_and_global", "hsr_saf", "readout_concat"])
def test_train_mode_per_caption_batchnorm_equals_sequential_calls(variant):
    """Train mode: the vectorised gate BatchNorm equals one BatchNorm call per caption in caption
    order (the reference loop), for the normalised scores and the running statistics."""
    model = tiny(**VARIANTS[variant]).train()
    randomise(model, 6)
    feats, ids, lengths = make_batch(3, 6, 8, seed=12)
    with torch.no_grad():
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
    twin = copy.deepcopy(model)
    before = _bn_state(model)
    with torch.no_grad():
        fast, fast_parts = model.score_parts(img, txt)
        slow, slow_parts = twin.reference_score_parts(img, txt)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    after_fast, after_slow = _bn_state(model), _bn_state(twin)
    gate_keys = [k for k in after_fast if "streams" in k or "shared_hsr" in k]
    assert gate_keys, "the variant has gate BatchNorms"
    for k in gate_keys:
        torch.testing.assert_close(after_fast[k], after_slow[k], atol=1e-6, rtol=0)
        assert not torch.equal(after_fast[k], before[k])  # statistics actually moved
    per_call = 2 * 6 if variant == "share_hsr_and_global" else 6  # one update per caption (and stream)
    assert all(int(after_fast[k] - before[k]) == per_call for k in gate_keys if k.endswith("num_batches_tracked"))


def test_pooled_batchnorm_updates_once_per_block_and_differs_from_per_caption():
    pooled = tiny(bn_stats="pooled").train()
    per_caption = tiny(bn_stats="per_caption").train()
    per_caption.load_state_dict(pooled.state_dict())
    feats, ids, lengths = make_batch(3, 6, 8, seed=13)
    with torch.no_grad():
        img, txt = pooled.encode_images(feats), pooled.encode_texts(ids, lengths)
        a = pooled.score(img, txt)
        b = per_caption.score(img, txt)
    assert not torch.allclose(a, b, atol=1e-4)
    assert int(pooled.streams["t2i"].hsr.levels[0].gate.bn.num_batches_tracked) == 1
    assert int(per_caption.streams["t2i"].hsr.levels[0].gate.bn.num_batches_tracked) == 6


def test_folded_sgr_step_equals_sgr_step():
    torch.manual_seed(0)
    step = SGRStep(S)
    with torch.no_grad():
        for p in step.parameters():
            p.normal_(0, 0.5)  # non-zero biases, so every term of the folded logits matters
    nodes = torch.randn(3, 4, 7, S)
    key_mask = torch.rand(4, 7) > 0.3
    key_mask[:, 0] = True
    for n_q in (None, 1, 3):
        ref_nodes, ref_edges = step(nodes, key_mask, num_queries=n_q)
        got_nodes, got_edges = sgr_step(step, nodes, key_mask, num_queries=n_q)
        torch.testing.assert_close(got_edges, ref_edges, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_nodes, ref_nodes, atol=1e-5, rtol=1e-5)


def test_flat_sgr_t2i_reproduces_sgraf_sgr():
    """hsr="sgr", streams=("t2i",) with SGR's weights copied in scores exactly as SGRAF's SGR (spec §5)."""
    from thsrn_lib.models.sgraf import SGRAFConfig, SGRModel

    dims = dict(vocab_size=V, img_dim=F_, word_dim=W, embed_size=D, num_regions=R, sim_dim=S)
    sgr = SGRModel(SGRAFConfig(sgr_step=3, smooth=9.0, **dims)).eval()
    randomise(sgr, 7)
    model = tiny(hsr="sgr", streams=("t2i",), hsr_levels=3, lambda_t2i=9.0).eval()
    renames = [
        ("sim_enc.v_global_w.", "v_global_w."),
        ("sim_enc.t_global_w.", "t_global_w."),
        ("sim_enc.sim_tranloc_w.", "streams.t2i.sim_tranloc_w."),
        ("sim_enc.sim_tranglo_w.", "streams.t2i.sim_tranglo_w."),
        ("sim_enc.sim_eval_w.", "streams.t2i.sim_eval_w."),
        ("sim_enc.SGR_module.", "streams.t2i.hsr.steps."),
    ]
    state = {}
    for key, value in sgr.state_dict().items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        state[key] = value
    model.load_state_dict(state, strict=True)
    feats, ids, lengths = make_batch(3, 5, 8, seed=14)
    with torch.no_grad():
        ours, theirs = model(feats, ids, lengths), sgr(feats, ids, lengths)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    e_ours, e_theirs = model.explain(feats, ids, lengths), sgr.explain(feats, ids, lengths)
    torch.testing.assert_close(e_ours.attention["t2i"], e_theirs.attention["t2i"].masked_fill(
        ~e_theirs.mask[None, :, :, None], 0.0))
    valid = e_theirs.mask[None, :, :, None]  # rows of real words (and the global node)
    for a, b in zip(e_ours.edges["t2i"], e_theirs.edges["t2i"]):
        rows = torch.cat([torch.ones_like(valid[:, :, :1]), valid], dim=2)
        torch.testing.assert_close(a * rows, b * rows, atol=1e-6, rtol=0)


def test_learned_fusion_starts_as_the_mean_and_mixes_with_sigmoid_theta():
    model = tiny(fusion="learned").eval()
    feats, ids, lengths = make_batch(2, 3, 5, seed=15)
    with torch.no_grad():
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
        sims, parts = model.score_parts(img, txt)
        torch.testing.assert_close(sims, (parts["t2i"] + parts["i2t"]) / 2)
        model.fusion_logit.fill_(1.5)
        mu = 1 / (1 + math.exp(-1.5))
        sims, parts = model.score_parts(img, txt)
        torch.testing.assert_close(sims, mu * parts["i2t"] + (1 - mu) * parts["t2i"])


def test_auxiliary_stream_losses():
    batch = _train_batch(4, 6, 16)
    crit = ContrastiveLoss(0.2, max_violation=True)
    torch.manual_seed(1)
    plain = tiny().train()
    assert plain.aux_loss_weight() == 0.0
    torch.manual_seed(1)
    aux = tiny(aux_stream_loss_weight=0.5).train()
    assert aux.aux_loss_weight() == 0.5
    aux.load_state_dict(plain.state_dict())
    torch.manual_seed(2)
    loss_plain, logs_plain = plain.training_loss(batch, crit)
    torch.manual_seed(2)
    loss_aux, logs = aux.training_loss(batch, crit)
    assert set(logs) == {"loss_rank", "loss_t2i", "loss_i2t"} and set(logs_plain) == {"loss_rank"}
    torch.testing.assert_close(logs["loss_rank"], logs_plain["loss_rank"])
    torch.testing.assert_close(loss_aux, loss_plain + 0.5 * (logs["loss_t2i"] + logs["loss_i2t"]))


def test_initialisation_follows_the_spec():
    torch.manual_seed(0)
    model = tiny(sim_dim=64, hsr="B", share_hsr=True, hsrb_num_queries=256)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.startswith(("img_enc",)):
            bound = math.sqrt(6.0 / (m.in_features + m.out_features))
            w = m.weight.detach().abs().max()
            assert 0.8 * bound < float(w) <= bound + 1e-7, name
            assert not m.bias.any(), name
        if isinstance(m, nn.BatchNorm1d):
            assert bool((m.weight == 1).all()) and not m.bias.any(), name
    hsr = model.shared_hsr
    assert isinstance(hsr, HSRB)
    for conv, k in zip(hsr.phrase_convs, hsr.kernel_sizes):
        bound = math.sqrt(6.0 / (2 * 64 * k))  # fans include the kernel size
        assert 0.8 * bound < float(conv.weight.detach().abs().max()) <= bound + 1e-7
        assert not conv.bias.any()
    assert abs(float(hsr.queries.detach().std()) - 1 / math.sqrt(64)) < 0.1 / math.sqrt(64)
    gate = tiny().streams["t2i"].hsr.levels[0].gate
    assert bool((gate.bn.weight == 1).all()) and not gate.bn.bias.any()


@pytest.mark.parametrize("variant", ["default", "hsr_B"])
def test_loss_falls_in_a_short_run(variant):
    torch.manual_seed(0)
    model = tiny(**VARIANTS[variant], embed_size=16, img_dim=16, sim_dim=16).train()
    g = torch.Generator().manual_seed(0)
    batch = _train_batch(8, 7, 6)
    batch.images = torch.randn(8, R, 16, generator=g)
    crit = ContrastiveLoss(0.2, max_violation=False)  # hardest negatives plateau early (spec §9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = model.training_loss(batch, crit)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_autocast_bf16_is_finite_and_close():
    model = tiny().eval()
    randomise(model, 8)
    feats, ids, lengths = make_batch(3, 4, 6, seed=17)
    with torch.no_grad():
        ref = model(feats, ids, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(feats, ids, lengths)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.training_loss(_train_batch(4, 6, 18), ContrastiveLoss(0.2))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("variant", ["default", "hsr_B", "share_hsr_and_global"])
def test_fast_inference_path_equals_plain_path_and_reference(variant):
    """Packed, tiled inference (several tiles per block) == plain vectorised path == per-caption loop."""
    model = tiny(**VARIANTS[variant]).eval()
    randomise(model, 21)
    feats, ids, lengths = make_batch(5, 11, 9, seed=21)
    model.tile_images, model.tile_captions = 2, 3
    with torch.no_grad():
        img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
        assert model._use_fast_path(img, txt)
        fast, fast_parts = model.score_parts(img, txt)
        model.use_fast_path = False
        plain, plain_parts = model.score_parts(img, txt)
        slow, _ = model.reference_score_parts(img, txt)
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=0)
    for s in fast_parts:
        torch.testing.assert_close(fast_parts[s], plain_parts[s], atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_gradients_finite_with_padded_words_in_both_streams():
    model = tiny().eval()
    feats, ids, lengths = make_batch(3, 4, 9, seed=22)
    lengths[0] = 2  # much padding
    img, txt = model.encode_images(feats), model.encode_texts(ids, lengths)
    assert not model._use_fast_path(img, txt)  # autograd: the plain path
    model.score(img, txt).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
