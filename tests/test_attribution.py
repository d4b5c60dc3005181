"""Attributions (thsrn_lib.attribution): completeness of (layer) integrated gradients, exact occlusion,
word-specific region attributions, every registered model, eval mode restored."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_viz import panels, tiny_model  # noqa: E402  (tests/ is on sys.path: pytest prepend mode)

from thsrn_lib.attribution import (
    default_baseline,
    feature_mean,
    pad_baseline_ids,
    pair_attributions,
    region_attributions,
    region_occlusion,
    token_attributions,
    word_embedding_layer,
    word_embedding_layers,
    word_region_attributions,
)
from thsrn_lib.data import PrecompDataset, find_vocab
from thsrn_lib.errors import ConfigError, DataError
from thsrn_lib.models import available
from thsrn_lib.viz.alignment import attention_vs_attribution
from thsrn_lib.viz.maps import pair_maps

MODELS = ("sgr", "saf", "tshsr", "shan", "hje", "sgraf")


@pytest.fixture(scope="module")
def ds(scenes_tiny) -> PrecompDataset:
    return PrecompDataset(scenes_tiny, "test", vocab=find_vocab(scenes_tiny))


@pytest.fixture(scope="module")
def models(ds):
    return {name: tiny_model(name, ds) for name in MODELS}


def _caps(ds, ks):
    seqs = [ds.caption_ids(k) for k in ks]
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(s)
    return ids, lengths


def test_every_registered_model_has_an_embedding_layer(models):
    assert set(MODELS) <= set(available()) | {"sgraf"}
    for name, model in models.items():
        layers = word_embedding_layers(model)
        assert len(layers) == (2 if name == "sgraf" else 1)
        assert all(layer is m.txt_enc.embed for layer, m in zip(layers, getattr(model, "members", [model])))
    with pytest.raises(ConfigError, match="ensemble"):
        word_embedding_layer(models["sgraf"])
    with pytest.raises(ConfigError, match="txt_enc.embed"):
        word_embedding_layers(torch.nn.Linear(2, 2))


def test_pad_baseline_keeps_frame():
    ids = torch.tensor([[1, 7, 8, 2, 0], [1, 9, 2, 0, 0]])
    base = pad_baseline_ids(ids, torch.tensor([4, 3]))
    assert base.tolist() == [[1, 0, 0, 2, 0], [1, 0, 2, 0, 0]]


@pytest.mark.parametrize("name", ["sgr", "tshsr"])
def test_token_attributions_complete(ds, models, name):
    """Sum of the word attributions = score(caption) - score(<pad> frame), up to captum's delta."""
    model = models[name]
    ids, lengths = _caps(ds, [0, 1, 2])
    coarse = token_attributions(model, ds.image_batch([0])[0], ids, lengths, n_steps=8)
    res = token_attributions(model, ds.image_batch([0])[0], ids, lengths, n_steps=256)
    gap = res.score - res.baseline_score
    np.testing.assert_allclose(res.attributions.sum(1), gap + res.delta, atol=1e-6)  # delta's definition
    # ReLU / leaky-ReLU kinks make the integrand rough: the delta shrinks with the steps, not spectrally.
    assert np.all(np.abs(res.delta) <= 0.05 * np.abs(gap) + 1e-4), (res.delta, gap)
    assert np.abs(res.delta).sum() < np.abs(coarse.delta).sum()
    # <start>/<end> are kept in the baseline, so they get exactly 0; so do padded positions.
    for j, n in enumerate(lengths.tolist()):
        assert res.attributions[j, 0] == 0 and res.attributions[j, n - 1] == 0
        assert np.all(res.attributions[j, n:] == 0)
        assert np.any(res.attributions[j, 1 : n - 1] != 0)
    # The pair scores are the model's own.
    with torch.no_grad():
        direct = model(ds.image_batch([0]), ids, lengths)[0].numpy()
    np.testing.assert_allclose(res.score, direct, atol=1e-5)


@pytest.mark.parametrize("name", ["sgr", "hje"])
def test_region_integrated_gradients_complete(ds, models, name):
    model = models[name]
    ids, lengths = _caps(ds, [5, 6])
    coarse = region_attributions(model, ds.image_batch([1])[0], ids, lengths, n_steps=8)
    res = region_attributions(model, ds.image_batch([1])[0], ids, lengths, n_steps=512)
    gap = res.score - res.baseline_score
    assert res.attributions.shape == (2, ds.num_regions)
    np.testing.assert_allclose(res.attributions.sum(1), gap + res.delta, atol=1e-6)
    # ReLU / leaky-ReLU kinks make the integrand rough: the delta shrinks with the steps, not spectrally.
    assert np.all(np.abs(res.delta) <= 0.05 * np.abs(gap) + 1e-4), (res.delta, gap)
    assert np.abs(res.delta).sum() <= np.abs(coarse.delta).sum() + 1e-6
    # The image-mean baseline: every region replaced by the image's average region.
    x = ds.image_batch([1])
    with torch.no_grad():
        base = model(x.mean(1, keepdim=True).expand_as(x), ids, lengths)[0].numpy()
    np.testing.assert_allclose(res.baseline_score, base, atol=1e-5)


def test_occlusion_equals_manual_recomputation(ds, models):
    model = models["tshsr"]
    ids, lengths = _caps(ds, [10, 11, 12])
    feats = ds.image_batch([2])[0]
    res = region_occlusion(model, feats, ids, lengths)
    with torch.no_grad():
        full = model(feats[None], ids, lengths)[0]
        for r in (0, 4, ds.num_regions - 1):
            occ = feats.clone()
            occ[r] = 0.0
            manual = full - model(occ[None], ids, lengths)[0]
            np.testing.assert_allclose(res.attributions[:, r], manual.numpy(), atol=1e-6)
    # captum's Occlusion with a one-region window agrees.
    from captum.attr import Occlusion

    occ = Occlusion(lambda x: model(x, ids[:1], lengths[:1])[:, 0])
    with torch.no_grad():
        ref = occ.attribute(feats[None], sliding_window_shapes=(1, feats.shape[1]), strides=(1, feats.shape[1]),
                            baselines=0.0)
    np.testing.assert_allclose(res.attributions[0], ref[0, :, 0].numpy(), atol=1e-6)
    mean = feature_mean(ds)
    res_mean = region_occlusion(model, feats, ids, lengths, baseline=mean)
    with torch.no_grad():
        occ2 = feats.clone()
        occ2[3] = mean
        manual = full - model(occ2[None], ids, lengths)[0]
    np.testing.assert_allclose(res_mean.attributions[:, 3], manual.numpy(), atol=1e-6)


def test_word_region_occlusion_is_the_interaction(ds, models):
    model = models["sgr"]
    ids = ds.caption_ids(3)
    feats = ds.image_batch([0])[0]
    res = word_region_attributions(model, feats, ids, [1, 2], method="occlusion")
    assert res.attributions.shape == (2, ds.num_regions) and res.delta is None

    def s(x, c):
        with torch.no_grad():
            return float(model(x[None], torch.tensor([c]), torch.tensor([len(c)]))[0, 0])

    minus = list(ids)
    minus[2] = 0
    occ = feats.clone()
    occ[5] = 0.0
    expected = (s(feats, ids) - s(occ, ids)) - (s(feats, minus) - s(occ, minus))
    assert res.attributions[1, 5] == pytest.approx(expected, abs=1e-6)
    assert res.word_effect[1] == pytest.approx(s(feats, ids) - s(feats, minus), abs=1e-6)


def test_word_region_integrated_gradients_complete(ds, models):
    model = models["tshsr"]
    ids = ds.caption_ids(0)
    feats = ds.image_batch([0])[0]
    coarse = word_region_attributions(model, feats, ids, [1, 3], method="integrated_gradients", n_steps=16)
    res = word_region_attributions(model, feats, ids, [1, 3], method="integrated_gradients", n_steps=1024)
    assert default_baseline("integrated_gradients") == "image_mean"
    base = feats.mean(0, keepdim=True).expand_as(feats)
    with torch.no_grad():
        caps = torch.tensor([ids, *[[0 if i == p else t for i, t in enumerate(ids)] for p in (1, 3)]])
        s = model(torch.stack([feats, base]), caps, torch.full((3,), len(ids)))
    gap = (s[0, 0] - s[0, 1:]) - (s[1, 0] - s[1, 1:])
    np.testing.assert_allclose(res.word_effect, (s[0, 0] - s[0, 1:]).numpy(), atol=1e-6)
    np.testing.assert_allclose(res.attributions.sum(1), gap.numpy() + res.delta, atol=1e-6)
    # A difference of two scores' differences is small and rough: many steps are needed (the delta says so).
    assert np.all(np.abs(res.delta) <= 0.05 * np.abs(gap.numpy()) + 5e-5), (res.delta, gap)
    assert np.abs(res.delta).sum() < np.abs(coarse.delta).sum()
    with pytest.raises(DataError, match="between <start> and <end>"):
        word_region_attributions(model, feats, ids, [0])
    with pytest.raises(ConfigError, match="method"):
        word_region_attributions(model, feats, ids, [1], method="saliency")


@pytest.mark.parametrize("name", MODELS)
def test_every_model_attributes_in_eval_mode(ds, models, name):
    model = models[name].train()  # must be switched to eval for the call and restored after
    try:
        feats = ds.image_batch([3])[0]
        ids = ds.caption_ids(15)
        tok = token_attributions(model, feats, ids, n_steps=4)
        reg = region_attributions(model, feats, ids, n_steps=4)
        occ = region_occlusion(model, feats, ids)
        assert model.training
        assert tok.attributions.shape == (1, len(ids)) and np.isfinite(tok.delta).all()
        assert reg.attributions.shape == occ.attributions.shape == (1, ds.num_regions)
        model.eval()
        with torch.no_grad():
            direct = float(model(feats[None], torch.tensor([ids]), torch.tensor([len(ids)]))[0, 0])
        assert tok.score[0] == pytest.approx(direct, abs=1e-5) and occ.score[0] == pytest.approx(direct, abs=1e-5)
    finally:
        model.eval()


def test_baseline_errors(ds, models):
    feats = ds.image_batch([0])[0]
    with pytest.raises(ConfigError, match="feature_mean"):
        region_occlusion(models["sgr"], feats, ds.caption_ids(0), baseline="mean")
    with pytest.raises(ConfigError, match=r"\(F,\) or \(R, F\)"):
        region_occlusion(models["sgr"], feats, ds.caption_ids(0), baseline=torch.zeros(3))


def test_pair_attributions_feed_the_side_by_side_figure(ds, models):
    model = models["tshsr"]
    out = pair_attributions(model, ds, 1, caption_index=7, n_steps=8)
    pair = pair_maps(model, ds, 1, caption_index=7)
    n = len(out["ids"])
    assert out["tokens"] == pair.tokens and out["word_regions"].positions == list(range(1, n - 1))
    region_attr = np.zeros((n, ds.num_regions))
    region_attr[1 : n - 1] = out["word_regions"].attributions
    fig = attention_vs_attribution(pair.tokens, pair.display["t2i"], out["token"].attributions[0], region_attr,
                                   boxes=ds.boxes[1], gt_regions=pair.gt_regions)
    assert len(panels(fig)) == 2 * min(4, len(pair.gt_regions) or 4)
