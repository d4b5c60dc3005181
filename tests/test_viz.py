"""Views (thsrn_lib.viz): alignment panels and heat-map fallback, reasoning graph, streams, galleries.

Tiny untrained models on the Scenes ``tiny`` preset; the checks are about what the figures show
(panel counts, ground-truth marks, fallbacks announced in the title), not about model quality.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from thsrn_lib.data import PrecompDataset, find_vocab
from thsrn_lib.errors import ConfigError, DataError
from thsrn_lib.models import create
from thsrn_lib.viz import style
from thsrn_lib.viz.alignment import (
    FALLBACK_NOTE,
    attention_vs_attribution,
    pair_attention,
    region_to_word,
    word_region_heatmap,
    word_to_region,
)
from thsrn_lib.viz.gallery import caption_gallery, image_gallery, top_k
from thsrn_lib.viz.graph import gate_weights, pair_gates, pair_reasoning, reasoning_graph
from thsrn_lib.viz.maps import VisualContext, explain_block, pair_maps, word_region_maps
from thsrn_lib.viz.streams import disagreements, gt_image_ranks, part_score_matrices, stream_disagreement, stream_scores


def tiny_model(name: str, ds: PrecompDataset, **extra):
    torch.manual_seed(0)
    common = dict(vocab_size=len(ds.vocab), img_dim=ds.feature_dim, num_regions=ds.num_regions, embed_size=16, word_dim=16)
    if name in ("sgr", "saf", "tshsr", "sgraf"):
        common["sim_dim"] = 8
    if name == "shan":
        common["word_init"] = "learned"
    if name == "hje":
        common.update(local_dim=16, global_dim=16)
    return create(name, **common, **extra).eval()


@pytest.fixture(scope="module")
def ds(scenes_tiny) -> PrecompDataset:
    return PrecompDataset(scenes_tiny, "test", vocab=find_vocab(scenes_tiny))


@pytest.fixture(scope="module")
def models(ds):
    return {name: tiny_model(name, ds) for name in ("sgr", "saf", "tshsr", "shan", "hje", "sgraf")}


def panels(fig: Figure) -> list:
    """Panel axes (plots) and panel title texts of mosaic figures (image panels are tiles of one image)."""
    axes = [ax for ax in fig.axes if ax.get_label() == "panel" and ax.get_visible()]
    texts = [t for ax in fig.axes if ax.get_label() == "mosaic" for t in ax.texts if t.get_gid() in ("panel", "gt")]
    return axes + texts


def panel_titles(fig: Figure) -> list[str]:
    return [p.get_title() if hasattr(p, "get_title") else p.get_text() for p in panels(fig)]


def title_of(fig: Figure) -> str:
    return fig._suptitle.get_text() if fig._suptitle is not None else ""


# ------------------------------------------------------------------------------------ maps
def test_pair_maps_streams_and_ground_truth(ds, models):
    record = ds.alignments()[3]
    pair = pair_maps(models["tshsr"], ds, 0, caption_index=3)
    n = len(ds.caption_ids(3))
    assert pair.tokens[0] == "<start>" and pair.tokens[-1] == "<end>" and len(pair.tokens) == n
    assert set(pair.streams) == {"t2i", "i2t"}
    assert pair.word_region["t2i"].shape == (n, ds.num_regions)
    np.testing.assert_allclose(pair.word_region["t2i"].sum(1), 1.0, atol=1e-5)  # each word's softmax over regions
    np.testing.assert_allclose(pair.region_word["i2t"].sum(1), 1.0, atol=1e-5)  # each region's softmax over words
    np.testing.assert_allclose(pair.word_region["i2t"], pair.region_word["i2t"].T)
    # Alignment token p is model position p + 1, and the word there is the aligned word.
    for a in record["align"]:
        assert pair.tokens[a["token"] + 1] == a["word"]
        assert set(a["regions"]) <= set(pair.gt_regions[a["token"] + 1])
        assert pair.gt_types[a["token"] + 1] == a["type"]
    # Edges cover only the pair's valid nodes (global + contexts + n words for t2i; R regions for i2t).
    groups = pair.node_groups["t2i"]
    assert groups[-1] == ("local", n)
    p = sum(s for _, s in groups)
    assert all(e.shape == (p, p) for e in pair.edges["t2i"])
    assert pair.node_groups["i2t"][-1] == ("local", ds.num_regions)


def test_ensemble_map_is_member_weighted_average(ds, models):
    model = models["sgraf"]
    feats = ds.image_batch([0, 1])
    ids = torch.tensor([ds.caption_ids(0)])
    expl = model.explain(feats, ids, torch.tensor([ids.shape[1]]))
    maps = word_region_maps(expl, model)
    assert {"sgr:t2i", "saf:t2i", "t2i"} <= set(maps)
    w = model.weights
    torch.testing.assert_close(maps["t2i"], w[0] * maps["sgr:t2i"] + w[1] * maps["saf:t2i"])


def test_hje_affinity_stream(ds, models):
    pair = pair_maps(models["hje"], ds, 1, caption_index=5)
    assert pair.streams == ["affinity"] and pair.sources["affinity"] == "hje_local_affinity"
    aff, disp = pair.word_region["affinity"], pair.display["affinity"]
    assert np.all(np.abs(aff) <= 1 + 1e-5)  # cosines
    np.testing.assert_allclose(disp.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(aff.argmax(1), disp.argmax(1))  # the display keeps the ranking


def test_explain_block_restores_train_mode(ds):
    model = tiny_model("sgr", ds).train()
    explain_block(model, ds.image_batch([0]), torch.tensor([ds.caption_ids(0)]), torch.tensor([len(ds.caption_ids(0))]))
    assert model.training


# ------------------------------------------------------------------------------------ alignment
def test_word_panels_one_per_valid_word_over_image(ds, models, tmp_path):
    pair = pair_maps(models["sgr"], ds, 2, caption_index=10)
    visual = VisualContext.from_dataset(ds)
    assert visual.missing(2) is None
    out = tmp_path / "t2i.png"
    fig = pair_attention(pair, "t2i", visual, save_to=out)
    assert isinstance(fig, Figure)
    assert len(panels(fig)) == len(pair.tokens) == len(ds.caption_ids(10))
    assert not any(ax.get_label() == "heatmap" for ax in fig.axes)
    # Aligned words get a ✓/✗ verdict in their panel title (green / red), the others none.
    titles = panel_titles(fig)
    for pos, title in enumerate(titles):
        assert title.endswith(("✓", "✗")) == (pos in pair.gt_regions)
        top = int(np.argmax(pair.display["t2i"][pos]))
        assert f"→ r{top}" in title
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temp left behind


def test_heatmap_fallback_without_image_or_boxes(ds, models):
    pair = pair_maps(models["tshsr"], ds, 0, caption_index=0)
    fig = pair_attention(pair, "t2i", VisualContext())  # real features: no boxes, no images
    assert [ax.get_label() for ax in fig.axes].count("heatmap") == 1
    assert not panels(fig)
    assert "heat map" in title_of(fig) and "no region boxes" in title_of(fig)
    hm = next(ax for ax in fig.axes if ax.get_label() == "heatmap")
    assert len(hm.get_yticklabels()) == len(pair.tokens)
    # Without any visual context at all the note still says why.
    fig2 = word_to_region(pair.display["t2i"], pair.tokens)
    assert FALLBACK_NOTE in title_of(fig2)
    # GT cells are framed green in the heat map.
    framed = [p for p in hm.patches if p.get_edgecolor()[:3] == pytest.approx((0x2C / 255, 0xA0 / 255, 0x2C / 255))]
    assert len(framed) == sum(len(v) for v in pair.gt_regions.values())


def test_boxes_without_image_draw_on_blank_canvas(ds, models):
    pair = pair_maps(models["sgr"], ds, 0, caption_index=1)
    visual = VisualContext(boxes=ds.boxes)
    fig = pair_attention(pair, "t2i", visual, positions=[1, 2])
    assert len(panels(fig)) == 2 and "blank canvas" in title_of(fig)


def test_region_panels_for_image_to_text(ds, models):
    pair = pair_maps(models["shan"], ds, 1, caption_index=6)
    visual = VisualContext.from_dataset(ds)
    fig = pair_attention(pair, "i2t", visual, regions=[0, 3, 5])
    assert len(panels(fig)) == 3
    assert [t.split("\n")[0].split(" ")[0] for t in panel_titles(fig)] == ["r0", "r3", "r5"]
    # The title lists the region's strongest word first.
    best = pair.tokens[int(np.argmax(pair.region_word["i2t"][3]))]
    assert panel_titles(fig)[1].split("\n")[1].startswith(best[:8])
    fig2 = region_to_word(pair.region_word["i2t"], pair.tokens)  # no boxes -> heat map, regions as rows
    hm = next(ax for ax in fig2.axes if ax.get_label() == "heatmap")
    assert len(hm.get_yticklabels()) == ds.num_regions and "heat map" in title_of(fig2)


def test_alignment_input_checks(ds):
    with pytest.raises(ConfigError, match="rows"):
        word_region_heatmap(np.zeros((3, 4)), ["a", "b"])
    with pytest.raises(ConfigError, match="boxes"):
        word_to_region(np.zeros((2, 4)), ["a", "b"], boxes=np.zeros((5, 4)))


def test_attention_vs_attribution_side_by_side(ds, models):
    pair = pair_maps(models["sgr"], ds, 0, caption_index=0)
    n, r = len(pair.tokens), ds.num_regions
    rng = np.random.default_rng(0)
    fig = attention_vs_attribution(pair.tokens, pair.display["t2i"], rng.normal(size=n), rng.normal(size=(n, r)),
                                   image=VisualContext.from_dataset(ds).image(0), boxes=ds.boxes[0],
                                   positions=[1, 2], gt_regions=pair.gt_regions)
    titles = panel_titles(fig)
    assert len(titles) == 4 and sum("attention" in t for t in titles) == 2
    fig2 = attention_vs_attribution(pair.tokens, pair.display["t2i"], np.zeros(n), np.zeros(r))
    assert FALLBACK_NOTE in title_of(fig2)


# ------------------------------------------------------------------------------------ graph
def test_reasoning_graph_and_gates(ds, models):
    pair = pair_maps(models["tshsr"], ds, 0, caption_index=2)
    steps = len(pair.edges["t2i"])
    fig = pair_reasoning(pair, "t2i")
    assert len(panels(fig)) == steps
    fig_m = pair_reasoning(pair, "i2t", kind="matrix")
    p = sum(s for _, s in pair.node_groups["i2t"])
    ax = panels(fig_m)[0]
    assert len(ax.get_xticklabels()) == p and ax.get_yticklabels()[0].get_text() == "G"
    fig_g = pair_gates(pair, "t2i")
    hm = panels(fig_g)[0]
    assert len(hm.get_yticklabels()) == len(pair.gates["t2i"]) and len(hm.get_xticklabels()) == len(pair.tokens)
    saf = pair_maps(models["saf"], ds, 0, caption_index=2)
    assert len(panels(pair_gates(saf))) == 1
    with pytest.raises(ConfigError, match="no reasoning graph"):
        pair_reasoning(pair_maps(models["shan"], ds, 0, caption_index=2))
    with pytest.raises(ConfigError, match="P = 3"):
        reasoning_graph([np.eye(4)], [("global", 1), ("local", 2)])
    with pytest.raises(ConfigError, match="one per word"):
        gate_weights([np.ones(3)], ["a", "b"])


def test_graph_draws_strongest_edges():
    e = np.array([[0.0, 0.9, 0.1], [0.5, 0.0, 0.5], [0.2, 0.8, 0.0]])
    fig = reasoning_graph([e], [("global", 1), ("local", 2)], ["x", "y"], top_k=1)
    edges = [p for p in panels(fig)[0].patches if p.get_gid() == "edge"]
    assert len(edges) == 3  # one strongest edge per node
    widths = sorted(round(p.get_linewidth(), 3) for p in edges)
    assert widths[-1] == pytest.approx(0.6 + 3.0)  # the strongest edge (0.9) is the widest


# ------------------------------------------------------------------------------------ streams
def test_part_score_matrices_match_model(ds, models):
    model = models["tshsr"]
    mats = part_score_matrices(model, ds, image_indices=[0, 3, 4], caption_indices=list(range(10)))
    assert set(mats) == {"score", "t2i", "i2t"} and mats["score"].shape == (3, 10)
    np.testing.assert_allclose(mats["score"], (mats["t2i"] + mats["i2t"]) / 2, atol=1e-6)  # fusion="mean"
    from thsrn_lib.data import collate_texts

    batch = collate_texts([(torch.tensor(ds.caption_ids(k)), k) for k in range(10)])
    with torch.no_grad():
        direct = model(ds.image_batch([0, 3, 4]), batch.ids, batch.lengths).numpy()
    np.testing.assert_allclose(mats["score"], direct, atol=1e-5)


def test_gt_ranks_and_disagreements():
    # 2 images x 10 captions; stream a ranks every caption's image first, b ranks it second for image 0's captions.
    a = np.zeros((2, 10))
    a[0, :5], a[1, 5:] = 1.0, 1.0
    b = a.copy()
    b[1, :5] = 2.0
    np.testing.assert_array_equal(gt_image_ranks(a), np.ones(10))
    np.testing.assert_array_equal(gt_image_ranks(b), [2] * 5 + [1] * 5)
    rows = disagreements({"a": a, "b": b}, "a", "b", captions=[f"c{i}" for i in range(10)], k=10)
    assert [r["caption"] for r in rows] == [0, 1, 2, 3, 4] and all(r["better"] == "a" for r in rows)
    fig = stream_disagreement({"a": a, "b": b}, "a", "b", captions=[f"c{i}" for i in range(10)])
    assert len(panels(fig)) == 2
    fig2 = stream_scores({"score": a, "a": a, "b": b})
    assert len(panels(fig2)) == 3  # a, b, and a vs b
    with pytest.raises(ConfigError, match="no score matrix"):
        stream_scores({"a": a}, streams=["zz"])


# ------------------------------------------------------------------------------------ galleries
def test_top_k_is_stable():
    np.testing.assert_array_equal(top_k([0.1, 0.5, 0.5, 0.2], 3), [1, 2, 3])


def test_image_gallery_marks_ground_truth(ds, tmp_path):
    scores = np.linspace(0, 1, ds.n_images)[::-1].copy()  # image 0 best
    visual = VisualContext.from_dataset(ds)
    fig = image_gallery(scores, visual, k=4, gt={2}, query="a query", save_to=tmp_path / "g")
    gt_titles = [p.get_text() for p in panels(fig) if p.get_gid() == "gt"]
    assert len(panels(fig)) == 4 and len(gt_titles) == 1 and "img 2" in gt_titles[0] and "GT" in gt_titles[0]
    assert "rank 3" in title_of(fig)
    assert (tmp_path / "g.png").is_file()
    fig2 = image_gallery(scores, None, k=4, gt={9})  # GT outside the top 4; no images -> tiles
    assert not [p for p in panels(fig2) if p.get_gid() == "gt"] and "rank 10" in title_of(fig2)
    assert "no image files" in title_of(fig2)


def test_caption_gallery_marks_ground_truth(ds):
    scores = np.zeros(ds.n_captions)
    scores[[5, 6, 20]] = [3.0, 2.0, 1.0]
    fig = caption_gallery(scores, ds.captions, k=3, gt={5, 6, 7, 8, 9})
    ax = next(a for a in fig.axes if a.get_label() == "captions")
    gids = [t.get_gid() for t in ax.texts]
    assert gids == ["gt", "gt", "caption"]
    assert ds.captions[5][:20] in ax.texts[0].get_text()


# ------------------------------------------------------------------------------------ real data
def _real_like(tmp_path: Path, src: Path) -> Path:
    """A SCAN-format folder (f30k_precomp layout) with features and captions only: no boxes, no images."""
    root = tmp_path / "f30k_precomp"
    root.mkdir()
    for name in ("test_caps.txt", "test_ims.npy"):
        shutil.copy(src / name, root / name)
    shutil.copy(src / "vocab.json", root / "f30k_precomp_vocab.json")
    return root


def test_real_data_official_checkpoint_falls_back_then_draws_with_user_boxes(tmp_path, scenes_tiny, ds):
    from thsrn_lib.models.sgraf import from_official_checkpoint

    root = _real_like(tmp_path, scenes_tiny)
    real = PrecompDataset(root, "test", vocab=find_vocab(root))
    assert real.boxes is None and real.image_ids is None and real.alignments() is None
    model = tiny_model("sgr", real)
    c = model.config
    opt = argparse.Namespace(data_name="f30k_precomp", img_dim=c.img_dim, word_dim=c.word_dim, embed_size=c.embed_size,
                             sim_dim=c.sim_dim, num_layers=1, bi_gru=True, no_imgnorm=False, no_txtnorm=False,
                             module_name="SGR", sgr_step=c.sgr_step, vocab_size=c.vocab_size)
    sds = [model.img_enc.state_dict(), model.txt_enc.state_dict(), model.sim_enc.state_dict()]
    ckpt = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 1, "model": sds, "opt": opt}, ckpt)
    official = from_official_checkpoint(ckpt)
    pair = pair_maps(official, real, 0, caption_index=0)
    assert not pair.gt_regions
    fig = pair_attention(pair, "t2i", VisualContext.from_dataset(real))
    assert "heat map" in title_of(fig) and not panels(fig)
    # The user supplies the boxes and an image folder (named by their own ids): now it draws over images.
    ids_file = root / "test_ids.txt"
    ids_file.write_text("\n".join(ds.image_ids) + "\n", encoding="utf-8")
    real2 = PrecompDataset(root, "test", vocab=find_vocab(root))
    boxes_file = tmp_path / "boxes.npy"
    np.save(boxes_file, ds.boxes)
    visual = VisualContext.from_dataset(real2, boxes=boxes_file, image_dir=scenes_tiny / "images" / "test")
    assert visual.missing(0) is None
    fig2 = pair_attention(pair, "t2i", visual)
    assert len(panels(fig2)) == len(pair.tokens) and "heat map" not in title_of(fig2)
    with pytest.raises(DataError, match="expected"):
        VisualContext.from_dataset(real2, boxes=np.zeros((2, 3, 4)))


def test_style_conventions():
    n = style.signed_norm([-1.0, 3.0])
    assert n.vmin == -3.0 and n.vmax == 3.0 and n.vcenter == 0.0
    assert style.stream_color("t2i") == style.STREAM_COLORS["t2i"] == style.stream_color("sgr:t2i")
    assert style.weight_norm([0.0, 0.0]).vmax > 0
