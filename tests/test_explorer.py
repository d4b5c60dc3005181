"""Explorer (thsrn_lib.explorer): handlers update the state and the figures, caches are reused, the
ipywidgets layer only calls the handlers. No browser, no timing asserts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from test_viz import panel_titles, panels, tiny_model  # noqa: E402  (tests/ is on sys.path: pytest prepend mode)

from thsrn_lib.data import PrecompDataset, collate_texts, find_vocab
from thsrn_lib.errors import ConfigError
from thsrn_lib.explorer import Explorer, ExplorerApp, first_stage_vectors


@pytest.fixture(scope="module")
def ds(scenes_tiny) -> PrecompDataset:
    return PrecompDataset(scenes_tiny, "test", vocab=find_vocab(scenes_tiny))


@pytest.fixture()
def explorer(ds) -> Explorer:
    models = {name: tiny_model(name, ds) for name in ("tshsr", "hje", "sgr")}
    return Explorer(ds, models, top_k=4, caption_k=6, shortlist=None)


def test_free_text_query_ranks_images_with_the_model(explorer, ds):
    fig = explorer.on_query_text("a red circle to the left of a blue square")
    st = explorer.state
    assert isinstance(fig, Figure) and explorer.figures["images"] is fig
    assert st.query_caption is None and st.query_ids[0] == 1 and st.query_ids[-1] == 2
    assert st.tokens[:3] == ["<start>", "a", "red"]
    # The cached scores are the model's own scores of (image, query).
    with torch.no_grad():
        ids = torch.tensor([st.query_ids])
        direct = explorer.model(ds.image_batch(range(ds.n_images)), ids, torch.tensor([ids.shape[1]]))[:, 0].numpy()
    np.testing.assert_allclose(st.image_scores, direct, atol=1e-5)
    assert st.image_ranking == list(np.argsort(-direct, kind="stable")[:4])
    # One overlay (R,) per gallery image: the query's t2i attention averaged over its words.
    assert set(st.overlays) == set(st.image_ranking)
    assert all(v.shape == (ds.num_regions,) for v in st.overlays.values())
    assert len(panels(fig)) == 4
    explorer.on_query_text("a zorblax circle")
    assert "not in the vocab" in explorer.state.message
    with pytest.raises(ConfigError, match="empty"):
        explorer.on_query_text("   ")


def test_pick_caption_marks_its_image_and_pick_image_ranks_captions(explorer, ds):
    explorer.on_pick_caption(12)  # a caption of image 2
    st = explorer.state
    assert st.query_caption == 12 and st.query == ds.captions[12]
    fig = explorer.figures["images"]
    assert "ground truth at rank" in fig._suptitle.get_text()
    rank_gt = int(np.sum(st.image_scores > st.image_scores[2])) + 1
    assert f"rank {rank_gt}" in fig._suptitle.get_text()
    cap_fig = explorer.on_pick_image(2)
    assert st.image == 2 and len(st.caption_ranking) == 6
    with torch.no_grad():
        batch = collate_texts([(torch.tensor(ds.caption_ids(k)), k) for k in range(ds.n_captions)])
        direct = explorer.model(ds.image_batch([2]), batch.ids, batch.lengths)[0].numpy()
    np.testing.assert_allclose(st.caption_scores, direct, atol=1e-5)
    ax = next(a for a in cap_fig.axes if a.get_label() == "captions")
    gt_shown = [t for t in ax.texts if t.get_gid() == "gt"]
    assert len(gt_shown) == len(set(st.caption_ranking) & set(range(10, 15)))
    # With a dataset caption of this image, the pair view carries the ground truth.
    assert st.pair is not None and st.pair.gt_regions and "pair" in explorer.figures
    with pytest.raises(ConfigError, match="out of range"):
        explorer.on_pick_image(ds.n_images)


def test_pick_word_shows_its_regions(explorer, ds):
    explorer.on_pick_caption(0)
    with pytest.raises(ConfigError, match="out of range"):
        explorer.on_pick_word(99)
    fig = explorer.on_pick_word(2)
    st = explorer.state
    assert st.word == 2 and st.image == st.image_ranking[0]  # no image picked yet: the best one
    assert len(panel_titles(fig)) == 1 and panel_titles(fig)[0].startswith(st.tokens[2])
    explorer.on_pick_image(0)
    fig_all = explorer.on_pick_word(None)
    assert explorer.state.word is None and len(panels(fig_all)) > 1


def test_switch_stream_and_model_keep_the_selection(explorer):
    explorer.on_pick_caption(5)
    explorer.on_pick_image(1)
    explorer.on_pick_word(3)
    assert explorer.streams() == ["t2i", "i2t"]
    explorer.on_switch_stream("i2t")
    st = explorer.state
    assert st.stream == "i2t" and st.image == 1 and st.word == 3 and st.query_caption == 5
    with pytest.raises(ConfigError, match="not available"):
        explorer.on_switch_stream("affinity")
    before = explorer._caches["tshsr"]
    explorer.on_switch_model("hje")
    st = explorer.state
    assert st.model == "hje" and st.stream == "affinity" and st.image == 1
    assert st.pair is not None and st.pair.sources["affinity"] == "hje_local_affinity"
    explorer.on_switch_model("tshsr")
    assert explorer._caches["tshsr"] is before  # embeddings are computed once per model
    with pytest.raises(ConfigError, match="unknown model"):
        explorer.on_switch_model("nope")
    assert set(explorer.state.timings) >= {"on_switch_model", "on_switch_stream", "on_pick_image"}


def test_caption_rows_are_memoised(explorer):
    explorer.on_pick_image(3)
    cache = explorer._caches[explorer.state.model]
    row = cache.caption_rows[3]
    explorer.on_pick_image(3)
    assert cache.caption_rows[3] is row


def test_pick_split(explorer):
    explorer.on_pick_split("dev")
    assert explorer.dataset.split == "dev" and explorer.state.query_caption == 0
    assert explorer.state.image_scores.shape == (explorer.dataset.n_images,)


def test_from_checkpoints_adds_sgraf(ds, scenes_tiny, tmp_path):
    from thsrn_lib.checkpoint import model_payload, save_checkpoint

    paths = []
    for name in ("sgr", "saf"):
        paths.append(save_checkpoint(tmp_path / name / "checkpoint_best.pt", model_payload(tiny_model(name, ds), ds.vocab)))
    ex = Explorer.from_checkpoints(scenes_tiny, "test", paths, top_k=3)
    assert list(ex.models) == ["sgr", "saf", "sgraf"]
    ex.on_switch_model("sgraf")
    assert ex.streams() == ["sgr:t2i", "saf:t2i", "t2i"]
    ex.on_pick_caption(1)
    assert len(ex.state.image_ranking) == 3
    with pytest.raises(ConfigError, match="at least one checkpoint"):
        Explorer.from_checkpoints(scenes_tiny, "test", [])


def test_widgets_call_the_handlers(explorer):
    app = ExplorerApp(explorer)
    assert app.split.options == ("dev", "test", "train") or "test" in app.split.options
    app.query.value = "a blue square"
    app.rank.click()
    st = explorer.state
    assert st.query == "a blue square" and len(app.ranked.options) == 4
    app.ranked.value = app.ranked.options[1][1]
    assert st.image == st.image_ranking[1]
    assert [v for _, v in app.words.options] == list(range(len(st.tokens)))
    app.words.value = 2
    assert explorer.state.word == 2
    app.caption.value = 7
    app.use_caption.click()
    assert explorer.state.query_caption == 7
    app.stream.value = "i2t"
    assert explorer.state.stream == "i2t"
    app.model.value = "sgr"
    assert explorer.state.model == "sgr" and list(app.stream.options) == ["t2i"]
    app.image.value = 99  # bounded: clipped to the last image
    app.show_image.click()
    assert explorer.state.image == explorer.dataset.n_images - 1
    assert "ms" in app.status.value


@pytest.mark.parametrize("name", ["tshsr", "shan", "sgraf"])
def test_two_stage_shortlist(ds, name):
    """Beyond ``shortlist`` candidates, only the nearest in the first-stage space get the model's score;
    the others rank below them in first-stage order."""
    model = tiny_model(name, ds)
    ex = Explorer(ds, {name: model}, top_k=4, caption_k=6, shortlist=20)
    ex.on_pick_caption(3)
    assert ex.state.image_scored == ds.n_images  # 12 images <= 20: exact
    fig = ex.on_pick_image(1)
    assert ex.state.caption_scored == 20 and "two-stage" in fig._suptitle.get_text()
    row = ex.state.caption_scores
    cache = ex._caches[name]
    first = (cache.caption_vecs @ cache.image_vecs[1]).numpy()
    keep = np.sort(np.argsort(-first, kind="stable")[:20])
    with torch.no_grad():
        batch = collate_texts([(torch.tensor(ds.caption_ids(k)), k) for k in keep.tolist()])
        exact = model(ds.image_batch([1]), batch.ids, batch.lengths)[0].numpy()
    np.testing.assert_allclose(row[keep], exact, atol=1e-5)
    rest = np.setdiff1d(np.arange(ds.n_captions), keep)
    assert row[rest].max() < row[keep].min()
    np.testing.assert_array_equal(np.argsort(-row[rest], kind="stable"), np.argsort(-first[rest], kind="stable"))
    if name == "sgraf":  # ensemble: members' unit vectors side by side
        emb = model.encode_images(ds.image_batch([0]))
        assert first_stage_vectors(model, emb, "image").shape[1] == 2 * model.members[0].config.embed_size
    with pytest.raises(ConfigError, match="shortlist"):
        Explorer(ds, {name: model}, top_k=8, caption_k=10, shortlist=5)
