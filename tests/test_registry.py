"""The model registry, configs, embeddings helpers and the score-level ensemble."""
from __future__ import annotations

import pytest
import torch

from thsrn_lib.errors import ConfigError
from thsrn_lib.losses import ContrastiveLoss
from thsrn_lib.models import Ensemble, available, build_config, concat, create, select

TINY = dict(vocab_size=30, img_dim=12, num_regions=4, embed_size=16, word_dim=8)


def _inputs(b: int = 3, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, 4, 12, generator=g)
    lengths = torch.tensor([5, 3, 6, 4])[:n]
    ids = torch.randint(4, 30, (n, 6), generator=g)
    ids[:, 0] = 1
    for j, k in enumerate(lengths.tolist()):
        ids[j, k - 1] = 2
        ids[j, k:] = 0
    return feats, ids, lengths


def test_available_lists_every_required_model():
    names = available()
    for required in ("tshsr", "sgr", "saf", "sgraf", "shan", "hje"):
        assert required in names


def test_unknown_model_and_unknown_option_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown model 'nope'.*available models"):
        create("nope")
    with pytest.raises(ConfigError, match="unknown option.*sim_dimm.*valid options.*sim_dim"):
        create("sgr", sim_dimm=8)


def test_config_round_trip_through_plain_data():
    cfg = build_config("tshsr", **TINY, sim_dim=8, hsr_levels=2)
    again = build_config("tshsr", **cfg.to_dict())
    assert again == cfg


def test_sgraf_ensemble_averages_member_scores():
    torch.manual_seed(0)
    ens = create("sgraf", **TINY, sim_dim=8).eval()
    assert isinstance(ens, Ensemble) and ens.names == ["sgr", "saf"]
    feats, ids, lengths = _inputs()
    with torch.no_grad():
        sims, parts = ens.score_parts(ens.encode_images(feats), ens.encode_texts(ids, lengths))
        expected = (ens.members[0](feats, ids, lengths) + ens.members[1](feats, ids, lengths)) / 2
    torch.testing.assert_close(sims, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(parts["sgr"], ens.members[0](feats, ids, lengths).detach())


def test_ensemble_weights_and_name_checks():
    a, b = create("sgr", **TINY, sim_dim=8).eval(), create("saf", **TINY, sim_dim=8).eval()
    feats, ids, lengths = _inputs()
    weighted = Ensemble([a, b], weights=[3, 1])
    with torch.no_grad():
        expected = 0.75 * a(feats, ids, lengths) + 0.25 * b(feats, ids, lengths)
        torch.testing.assert_close(weighted(feats, ids, lengths), expected, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="unique"):
        Ensemble([a, create("sgr", **TINY, sim_dim=8)])
    with pytest.raises(ConfigError, match="at least 2"):
        Ensemble([a])
    with pytest.raises(ConfigError, match="non-negative"):
        Ensemble([a, b], weights=[1, -1])


def test_select_and_concat_pad_text_embeddings():
    model = create("sgr", **TINY, sim_dim=8).eval()
    feats, ids, lengths = _inputs()
    with torch.no_grad():
        txt = model.encode_texts(ids, lengths)
        short = model.encode_texts(ids[1:2, :3], lengths[1:2])  # padded length 3 instead of 6
        joined = concat([select(txt, slice(0, 1)), short])
        assert joined["words"].shape == (2, 6, 16) and joined["mask"].shape == (2, 6)
        assert not joined["mask"][1, 3:].any()
        img = model.encode_images(feats)
        torch.testing.assert_close(model.score(img, joined)[:, 1], model.score(img, select(txt, slice(1, 2)))[:, 0])


def test_contrastive_loss_on_hand_made_matrices():
    loss = ContrastiveLoss(margin=0.2)
    perfect = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    assert loss(perfect).item() == 0.0
    # image 0: hardest negative caption 1 at 0.8 -> 0.2 + 0.8 - 0.5 = 0.5; caption 0: hardest image 1 at 0.6 -> 0.3
    s = torch.tensor([[0.5, 0.8], [0.6, 0.9]])
    # rows: i0 -> max(0.5)=0.5, i1 -> [0.2+0.6-0.9]+ = 0 ; cols: c0 -> [0.2+0.6-0.5]=0.3, c1 -> [0.2+0.8-0.9]=0.1
    assert loss(s).item() == pytest.approx(0.5 + 0.0 + 0.3 + 0.1)
    assert ContrastiveLoss(0.2, max_violation=False)(s).item() == pytest.approx(0.9)
    # same-image captions excluded from the negatives
    same = ContrastiveLoss(0.2, exclude_same_image=True)
    assert same(s, torch.tensor([7, 7])).item() == 0.0
    with pytest.raises(ValueError, match="square"):
        loss(torch.zeros(2, 3))
