"""Vectorised similarity blocks (thsrn_lib.models.similarity) against literal per-pair computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thsrn_lib.errors import ConfigError
from thsrn_lib.models.layers import l1norm, l2norm, lengths_to_mask
from thsrn_lib.models.similarity import (
    GatedPooling,
    SGRStep,
    attended_context,
    caption_batchnorm,
    cross_logits,
    global_similarity,
    i2t_attention,
    similarity_vectors,
    t2i_attention,
)

B, N, R, L, D, S = 3, 5, 4, 6, 8, 6
SMOOTH = 9.0


def _block(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    regions = l2norm(torch.randn(B, R, D, generator=g))
    lengths = torch.tensor([6, 2, 4, 1, 5])
    mask = lengths_to_mask(lengths, L)
    words = l2norm(torch.randn(N, L, D, generator=g)) * mask.unsqueeze(-1)  # padded rows exactly 0
    return regions, words, mask, lengths


def _pad_words(words, mask, extra):
    return (
        torch.cat([words, torch.zeros(N, extra, D)], dim=1),
        torch.cat([mask, torch.zeros(N, extra, dtype=torch.bool)], dim=1),
    )


def test_t2i_attention_matches_per_pair_loop_on_valid_words():
    regions, words, mask, lengths = _block()
    attn = t2i_attention(regions, words, mask, SMOOTH)
    assert attn.shape == (B, N, L, R)
    for b in range(B):
        for n in range(N):
            k = int(lengths[n])
            c = F.leaky_relu(regions[b] @ words[n, :k].T, 0.1)  # (R, k)
            c = c / (c.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8)  # over the words, per region
            expect = torch.softmax(SMOOTH * c.T, dim=-1)  # (k, R)
            torch.testing.assert_close(attn[b, n, :k], expect, atol=1e-6, rtol=0)
    valid_rows = attn[:, mask]  # (B, n_valid, R)
    torch.testing.assert_close(valid_rows.sum(-1), torch.ones(valid_rows.shape[:2]))
    assert torch.isfinite(attn).all()


def test_t2i_attention_ignores_padding_even_if_padded_rows_are_not_zero():
    regions, words, mask, _ = _block()
    ref = t2i_attention(regions, words, mask, SMOOTH)
    noisy = words.clone()
    noisy[~mask] = 5.0  # garbage in padded rows must not leak into the word-axis norm
    out = t2i_attention(regions, noisy, mask, SMOOTH)
    torch.testing.assert_close(out[:, mask], ref[:, mask])
    w2, m2 = _pad_words(words, mask, 3)
    torch.testing.assert_close(t2i_attention(regions, w2, m2, SMOOTH)[:, :, :L][:, mask], ref[:, mask])


def test_i2t_attention_matches_per_pair_loop_and_zeroes_padded_words():
    regions, words, mask, lengths = _block(1)
    attn = i2t_attention(regions, words, mask, 4.0)
    assert attn.shape == (B, N, R, L)
    for b in range(B):
        for n in range(N):
            k = int(lengths[n])
            c = F.leaky_relu(regions[b] @ words[n, :k].T, 0.1)  # (R, k)
            c = c / (c.pow(2).sum(dim=0, keepdim=True).sqrt() + 1e-8)  # over the regions, per word
            torch.testing.assert_close(attn[b, n, :, :k], torch.softmax(4.0 * c, dim=-1), atol=1e-6, rtol=0)
            assert (attn[b, n, :, k:] == 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, N, R))


def test_precomputed_logits_give_the_same_attention():
    regions, words, mask, _ = _block(2)
    logits = cross_logits(regions, words)
    assert logits.shape == (B, N, L, R)
    torch.testing.assert_close(
        t2i_attention(regions, words, mask, SMOOTH, logits=logits), t2i_attention(regions, words, mask, SMOOTH)
    )
    torch.testing.assert_close(
        i2t_attention(regions, words, mask, 4.0, logits=logits), i2t_attention(regions, words, mask, 4.0)
    )


def test_attended_context_both_streams():
    regions, words, mask, _ = _block(3)
    a = t2i_attention(regions, words, mask, SMOOTH)
    ctx = attended_context(a, regions, "t2i")
    expect = l2norm(torch.einsum("bnlr,brd->bnld", a, regions))
    assert ctx.shape == (B, N, L, D)
    torch.testing.assert_close(ctx, expect)
    b_attn = i2t_attention(regions, words, mask, 4.0)
    ctx2 = attended_context(b_attn, words, "i2t")
    assert ctx2.shape == (B, N, R, D)
    for b in range(B):
        for n in range(N):
            torch.testing.assert_close(ctx2[b, n], l2norm(b_attn[b, n] @ words[n]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="stream='i2t'"):
        attended_context(b_attn, words, "t2i")  # i2t weights with the default stream


def test_similarity_vectors_broadcast_and_do_not_modify_inputs():
    regions, words, mask, _ = _block(4)
    proj = nn.Linear(D, S)
    ctx = attended_context(t2i_attention(regions, words, mask, SMOOTH), regions)
    ctx_copy, words_copy = ctx.clone(), words.clone()
    with torch.no_grad():  # the in-place eval path
        fast = similarity_vectors(ctx, words, proj, "t2i")
    torch.testing.assert_close(ctx, ctx_copy, atol=0, rtol=0)
    torch.testing.assert_close(words, words_copy, atol=0, rtol=0)
    slow = l2norm(proj((ctx - words.unsqueeze(0).expand(B, N, L, D)) ** 2))
    assert fast.shape == (B, N, L, S)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(similarity_vectors(ctx, words, proj), slow)  # autograd path agrees
    ctx_i = attended_context(i2t_attention(regions, words, mask, 4.0), words, "i2t")
    out = similarity_vectors(ctx_i, regions, proj, "i2t")
    assert out.shape == (B, N, R, S)
    for n in range(N):
        torch.testing.assert_close(out[:, n], l2norm(proj((ctx_i[:, n] - regions) ** 2)))
    with pytest.raises(ValueError, match="i2t query"):
        similarity_vectors(ctx_i, words, proj, "i2t")


def test_global_similarity_all_pairs():
    g = torch.Generator().manual_seed(5)
    vg, tg = torch.randn(B, D, generator=g), torch.randn(N, D, generator=g)
    proj = nn.Linear(D, S)
    out = global_similarity(vg, tg, proj)
    assert out.shape == (B, N, S)
    torch.testing.assert_close(out[1, 3], l2norm(proj((vg[1] - tg[3]) ** 2)))


def test_sgr_step_masked_equals_graph_on_valid_nodes_only():
    step = SGRStep(S)
    assert set(dict(step.named_parameters())) == {
        f"{m}.{p}" for m in ("graph_query_w", "graph_key_w", "sim_graph_w") for p in ("weight", "bias")
    }
    g = torch.Generator().manual_seed(6)
    p = 7
    nodes = torch.randn(B, N, p, S, generator=g)
    valid = torch.tensor([7, 1, 3, 5, 2])
    mask = lengths_to_mask(valid, p)
    new, edges = step(nodes, mask)
    assert new.shape == (B, N, p, S) and edges.shape == (B, N, p, p)
    assert (edges.masked_select(~mask[None, :, None, :].expand_as(edges)) == 0).all()
    torch.testing.assert_close(edges.sum(-1), torch.ones(B, N, p))
    for n in range(N):
        k = int(valid[n])
        x = nodes[:, n, :k]
        e = torch.softmax(step.graph_query_w(x) @ step.graph_key_w(x).transpose(1, 2), dim=-1)
        torch.testing.assert_close(new[:, n, :k], torch.relu(step.sim_graph_w(e @ x)), atol=1e-6, rtol=0)
    first, first_edges = step(nodes, mask, num_queries=1)
    assert first.shape == (B, N, 1, S)
    torch.testing.assert_close(first[..., 0, :], new[..., 0, :], atol=1e-6, rtol=0)
    torch.testing.assert_close(first_edges[..., 0, :], edges[..., 0, :], atol=1e-6, rtol=0)


def _random_bn(momentum=0.1) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(1, momentum=momentum)
    with torch.no_grad():
        bn.weight.fill_(1.3)
        bn.bias.fill_(-0.2)
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
        bn.num_batches_tracked.fill_(4)
    return bn


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_caption_batchnorm_train_equals_sequential_calls(momentum):
    g = torch.Generator().manual_seed(7)
    p = 7
    x = (torch.randn(B, N, p, generator=g) * 2 + 1).requires_grad_(True)
    valid = torch.tensor([7, 2, 4, 1, 6])  # B x 1 = 3 values for the shortest caption: still > 1
    mask = lengths_to_mask(valid, p)
    bn_vec = _random_bn(momentum).train()
    bn_seq = copy.deepcopy(bn_vec)
    y = caption_batchnorm(x, mask, bn_vec, "per_caption")
    assert y.shape == (B, N, p)
    ys = []
    for n in range(N):
        k = int(valid[n])
        yn = bn_seq(x[:, n, :k].unsqueeze(1)).squeeze(1)  # one official BatchNorm call per caption
        torch.testing.assert_close(y[:, n, :k], yn, atol=1e-5, rtol=0)
        ys.append(yn)
    torch.testing.assert_close(bn_vec.running_mean, bn_seq.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(bn_vec.running_var, bn_seq.running_var, atol=1e-6, rtol=0)
    assert int(bn_vec.num_batches_tracked) == int(bn_seq.num_batches_tracked) == 4 + N
    # Gradients (through the batch statistics) agree too.
    w = torch.randn(B, N, p, generator=g)
    (grad_vec,) = torch.autograd.grad((y * w * mask).sum(), x)
    (grad_seq,) = torch.autograd.grad(sum((yn * w[:, n, : yn.shape[1]]).sum() for n, yn in enumerate(ys)), x)
    torch.testing.assert_close(grad_vec, grad_seq, atol=1e-5, rtol=0)


def test_caption_batchnorm_pooled_eval_and_errors():
    g = torch.Generator().manual_seed(8)
    p = 5
    x = torch.randn(B, N, p, generator=g)
    mask = lengths_to_mask(torch.tensor([5, 2, 3, 1, 4]), p)
    bn_vec = _random_bn().train()
    bn_ref = copy.deepcopy(bn_vec)
    y = caption_batchnorm(x, mask, bn_vec, "pooled")
    flat = x[:, mask]  # (B, n_valid)
    torch.testing.assert_close(y[:, mask], bn_ref(flat.reshape(-1, 1)).reshape(flat.shape), atol=1e-5, rtol=0)
    torch.testing.assert_close(bn_vec.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn_vec.running_var, bn_ref.running_var)
    assert int(bn_vec.num_batches_tracked) == 5
    bn_vec.eval()
    bn_ref.eval()
    before = bn_vec.running_mean.clone()
    torch.testing.assert_close(caption_batchnorm(x, mask, bn_vec), bn_ref(x.reshape(-1, 1)).reshape(x.shape))
    assert torch.equal(bn_vec.running_mean, before)  # eval never moves the statistics
    with pytest.raises(ConfigError, match="per_caption"):
        caption_batchnorm(x, mask, bn_vec, "batch")
    bn_vec.train()
    with pytest.raises(ValueError, match="at least 2 images"):
        caption_batchnorm(x[:1], mask, bn_vec)  # 1 image x 1 valid node for caption 3


def test_gated_pooling_masks_and_matches_official_form():
    pool = GatedPooling(S)
    assert set(pool.state_dict()) == {
        "attn_sim_w.weight",
        "attn_sim_w.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    with torch.no_grad():
        pool.bn.running_mean.fill_(0.2)
        pool.bn.running_var.fill_(1.5)
    pool.eval()
    g = torch.Generator().manual_seed(9)
    p = 6
    nodes = torch.randn(B, N, p, S, generator=g)
    valid = torch.tensor([6, 1, 3, 2, 5])
    mask = lengths_to_mask(valid, p)
    pooled, beta = pool(nodes, mask)
    assert pooled.shape == (B, N, S) and beta.shape == (B, N, p)
    assert (beta.masked_select(~mask.expand_as(beta)) == 0).all()
    torch.testing.assert_close(beta.sum(-1), torch.ones(B, N), atol=1e-6, rtol=0)
    for n in range(N):
        k = int(valid[n])
        x = nodes[:, n, :k]  # (B, k, S)
        e = pool.bn(pool.attn_sim_w(x).transpose(1, 2))  # (B, 1, k), official layout
        bt = l1norm(torch.sigmoid(e), dim=-1)
        torch.testing.assert_close(pooled[:, n], l2norm((bt @ x).squeeze(1)), atol=1e-6, rtol=0)
    cond = torch.randn(B, N, S, generator=g)
    pooled_c, beta_c = pool(nodes, mask, condition=cond)
    e_c = pool.bn(pool.attn_sim_w(nodes[:, 0] * cond[:, 0, None]).transpose(1, 2))
    torch.testing.assert_close(beta_c[:, 0], l1norm(torch.sigmoid(e_c), dim=-1).squeeze(1), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError):
        GatedPooling(S, bn_stats="nope")


# ------------------------------------------------------------------------------------------------
# folded SGR step, zero-safe attention gradients, conditioned gate, packed fast path
# ------------------------------------------------------------------------------------------------
def test_sgr_step_folded_equals_literal_two_projection_form():
    torch.manual_seed(0)
    step = SGRStep(S)
    with torch.no_grad():
        for p in step.parameters():
            p.normal_(0, 0.5)  # non-zero biases: every term of the folded logits matters
    nodes = torch.randn(3, 4, 7, S)
    key_mask = torch.rand(4, 7) > 0.3
    key_mask[:, 0] = True
    for n_q in (None, 1, 3):
        ref_nodes, ref_edges = step.reference_forward(nodes, key_mask, num_queries=n_q)
        got_nodes, got_edges = step(nodes, key_mask, num_queries=n_q)
        torch.testing.assert_close(got_edges, ref_edges, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_nodes, ref_nodes, atol=1e-5, rtol=1e-5)
        # inference skips the per-query logit constant (it cancels in the softmax) and works in place
        with torch.no_grad():
            inf_nodes, inf_edges = step(nodes, key_mask, num_queries=n_q)
        torch.testing.assert_close(inf_edges, ref_edges, atol=1e-6, rtol=0)
        torch.testing.assert_close(inf_nodes, ref_nodes, atol=1e-5, rtol=1e-5)
    # the no-grad cache is refreshed when a parameter changes in place
    with torch.no_grad():
        before = step(nodes, key_mask)[0]
        step.graph_key_w.weight.mul_(2.0)
        after = step(nodes, key_mask)[0]
        torch.testing.assert_close(after, step.reference_forward(nodes, key_mask)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


def test_attention_gradients_are_finite_with_padded_words():
    regions, words, mask, _ = _block(3)
    regions.requires_grad_(True)
    words = words.clone().requires_grad_(True)
    for fn in (t2i_attention, i2t_attention):
        out = fn(regions, words, mask, SMOOTH)
        gr, gw = torch.autograd.grad((out.nan_to_num() * torch.randn_like(out)).sum(), (regions, words))
        assert torch.isfinite(gr).all() and torch.isfinite(gw).all(), fn.__name__


def test_gated_pooling_condition_and_no_norm_match_the_literal_formula():
    torch.manual_seed(1)
    pool = GatedPooling(S, norm="none")
    assert pool.bn is None
    with torch.no_grad():
        pool.attn_sim_w.bias.fill_(0.3)
    nodes, cond = torch.randn(B, N, L, S), torch.randn(B, N, S)
    _, _, mask, _ = _block()
    pooled, beta = pool(nodes, mask, cond)
    e = pool.attn_sim_w(nodes * cond.unsqueeze(2)).squeeze(-1)  # the materialised product
    expect_beta = l1norm(torch.sigmoid(e) * mask, dim=-1)
    torch.testing.assert_close(beta, expect_beta, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, l2norm((expect_beta.unsqueeze(-1) * nodes).sum(2)), atol=1e-6, rtol=0)
    all_valid, _ = pool(nodes, None, cond)
    torch.testing.assert_close(all_valid, pool(nodes, torch.ones(N, L, dtype=torch.bool), cond)[0])
    with pytest.raises(ConfigError):
        GatedPooling(S, norm="layer")


@pytest.mark.parametrize("chunk", ["auto", None, 3])
def test_packed_fast_path_equals_plain_formulas(chunk):
    """``chunk``: the CPU's cache-sized row chunks (auto), the whole tile at once (the accelerator
    path), and a chunk of 3 rows that splits images and captions mid-way (remainders)."""
    from thsrn_lib.models.similarity import (
        PackedWords,
        packed_cross_logits,
        packed_i2t_attention,
        packed_i2t_similarity,
        packed_t2i_attention,
        packed_t2i_similarity,
    )

    regions, words, mask, lengths = _block(5)
    torch.manual_seed(2)
    proj = nn.Linear(D, S)
    with torch.no_grad():
        packed = PackedWords.from_padded(words, mask)
        assert packed.words.shape == (int(lengths.sum()), D)
        logits = packed_cross_logits(regions, packed)  # (B, R, T)
        i2t = packed_i2t_attention(logits, packed, 4.0)
        t2i = packed_t2i_attention(logits.clone(), packed, SMOOTH)
        ref_t2i = t2i_attention(regions, words, mask, SMOOTH)  # (B, N, L, R)
        ref_i2t = i2t_attention(regions, words, mask, 4.0)  # (B, N, R, L)
        torch.testing.assert_close(t2i.transpose(1, 2), ref_t2i[:, mask], atol=1e-6, rtol=0)
        torch.testing.assert_close(i2t, ref_i2t.permute(0, 2, 1, 3)[:, :, mask], atol=1e-6, rtol=0)
        # the fused normalise-subtract-square pass equals the plain formula (t2i), per valid word
        local = packed.unpack(packed_t2i_similarity(t2i, regions, packed, proj, chunk))  # (B, N, L, S)
        ref_local = similarity_vectors(attended_context(ref_t2i, regions, "t2i"), words, proj, "t2i")
        torch.testing.assert_close(local[:, mask], ref_local[:, mask], atol=1e-5, rtol=0)
        assert torch.equal(local[:, ~mask], torch.zeros_like(local[:, ~mask]))  # padded rows are zero
        local_i2t = packed_i2t_similarity(i2t, regions, packed, proj, chunk)  # (B, N, R, S)
        ref_i2t_local = similarity_vectors(attended_context(ref_i2t, words, "i2t"), regions, proj, "i2t")
        torch.testing.assert_close(local_i2t, ref_i2t_local, atol=1e-5, rtol=0)
        nodes = packed.unpack(packed_t2i_similarity(t2i, regions, packed, proj, chunk), lead=1)
        torch.testing.assert_close(nodes[:, :, 1:], local)
        assert torch.equal(nodes[:, :, 0], torch.zeros(B, N, S))
    with pytest.raises(RuntimeError, match="inference-only"):
        packed_cross_logits(regions.clone().requires_grad_(True), packed)


def test_length_groups_sorts_and_declines_uniform_lengths():
    from thsrn_lib.models.similarity import length_groups

    lengths = torch.tensor([3] * 20 + [30] * 4)
    order, chunks = length_groups(lengths, 4, 4)
    assert torch.equal(torch.sort(torch.cat(chunks)).values, torch.arange(24))
    assert all(int(lengths[c].max()) <= int(lengths[d].min()) for c, d in zip(chunks, chunks[1:]))
    assert length_groups(torch.full((40,), 12), 4, 8) is None  # uniform: no gain
    assert length_groups(lengths[:10], 4, 8) is None  # too few captions for two groups
