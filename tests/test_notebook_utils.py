"""thsrn_lib.notebook_utils: the helpers the notebooks share (no kernel needed)."""
from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from thsrn_lib import notebook_utils as nbu  # noqa: E402
from thsrn_lib.errors import ConfigError, DataError  # noqa: E402


def test_region_heatmap_sums_covering_boxes():
    boxes = np.array([[0, 0, 2, 2], [1, 1, 4, 3]], dtype=np.float32)  # x2, y2 exclusive
    hm = nbu.region_heatmap(boxes, np.array([1.0, 10.0]), height=4, width=5)
    assert hm.shape == (4, 5)
    assert hm[0, 0] == 1 and hm[1, 1] == 11 and hm[2, 3] == 10
    assert hm[0, 2] == 0 and hm[3, 1] == 0 and hm[1, 4] == 0
    assert hm.sum() == pytest.approx(1 * 4 + 10 * 6)


def test_save_metrics_is_strict_json(tmp_path):
    path = nbu.save_metrics(tmp_path, {"a": np.float32(0.5), "b": torch.tensor([1, 2]), "nan": float("nan"),
                                       "nested": {"p": tmp_path, "t": (1, np.int64(2))}}, summary={"rsum": 1.5})
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert data == {"a": 0.5, "b": [1, 2], "nan": None, "nested": {"p": str(tmp_path), "t": [1, 2]},
                    "summary": {"rsum": 1.5}}
    with pytest.raises(TypeError, match="cannot store object"):
        nbu.save_metrics(tmp_path, {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # the failed write left nothing


def test_save_figure_writes_png_atomically(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = nbu.save_figure(fig, tmp_path, "curve")
    assert path == tmp_path / "curve.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]
    with pytest.raises(ConfigError, match="plain file name"):
        nbu.save_figure(fig, tmp_path, "../escape")
    plt.close(fig)


def test_paths_and_data_resolution(tmp_path):
    assert nbu.resolve_path("notebooks") == nbu.project_root() / "notebooks"
    assert nbu.resolve_path(tmp_path) == tmp_path
    assert nbu.output_folder(str(tmp_path / "o"), "x") == tmp_path / "o" and (tmp_path / "o").is_dir()
    with pytest.raises(DataError, match="scenes:demo"):
        nbu.resolve_data(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="unknown Scenes preset"):
        nbu.resolve_data("scenes:huge", tmp_path)
    assert not nbu.is_scenes(tmp_path)


def test_ablation_variants():
    v = nbu.ablation_variants(["streams", "levels"], {"embed_size": 8, "hsr_levels": 3})
    assert list(v) == ["TSHSR", "T2I stream only", "I2T stream only", "1 context level"]  # 3 levels == reference
    assert v["T2I stream only"] == {"model": "tshsr", "group": "streams", "embed_size": 8, "hsr_levels": 3,
                                    "streams": ["t2i"]}
    with pytest.raises(ConfigError, match="valid groups"):
        nbu.ablation_variants(["depth"], {})
    assert nbu.model_options("sgr", {"embed_size": 8, "hsr_levels": 2}) == {"embed_size": 8}


def test_ranks_of_fold_stack_matches_blocks():
    rng = np.random.default_rng(0)
    blocks = rng.normal(size=(2, 3, 15))
    i2t, t2i = nbu.ranks_of(blocks)
    a, b = nbu.ranks_of(blocks[0]), nbu.ranks_of(blocks[1])
    assert np.array_equal(i2t, np.concatenate([a[0], b[0]])) and np.array_equal(t2i, np.concatenate([a[1], b[1]]))
    assert i2t.shape == (6,) and t2i.shape == (30,)


def test_live_curves_rejects_unknown_series():
    curves = nbu.LiveCurves({"loss": ["loss"]}, every_s=1e9)
    curves.update(1, loss=2.0)
    with pytest.raises(ConfigError, match="unknown series"):
        curves.update(2, los=1.0)
    assert curves.history["loss"] == ([1.0], [2.0])
    plt.close(curves.fig)


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    return nbu.resolve_data("scenes:tiny", tmp_path_factory.mktemp("scenes"))


def test_binding_scores_match_pairwise_scores(tiny_scenes):
    from thsrn_lib.data.scenes import load_swapped_captions
    from thsrn_lib.models import create

    ds = nbu.open_split(tiny_scenes, "binding")
    torch.manual_seed(0)
    model = create("sgr", vocab_size=len(ds.vocab), img_dim=ds.feature_dim, num_regions=ds.num_regions,
                   **nbu.tiny_model_config("sgr")).eval()
    true_s, swap_s = nbu.binding_scores(model, tiny_scenes, ds.vocab, chunk=3)  # chunks do not divide 10 images
    swapped = load_swapped_captions(tiny_scenes)
    for k in (0, 7, 26, ds.n_captions - 1):
        feats = ds.image_batch([k // 5])
        for text, expected in ((ds.captions[k], true_s[k]), (swapped[k], swap_s[k])):
            ids = torch.tensor([ds.vocab.encode(text)])
            with torch.no_grad():
                score = model(feats, ids, torch.tensor([ids.shape[1]]))[0, 0].item()
            assert math.isclose(score, float(expected), rel_tol=1e-5, abs_tol=1e-5)


def test_retrieval_helpers_order_by_score(tiny_scenes):
    ds = nbu.open_split(tiny_scenes, "test")
    sims = np.random.default_rng(1).normal(size=(ds.n_images, ds.n_captions)).astype(np.float32)
    rows = nbu.image_to_text_rows(ds, sims, image=2, k=4)
    assert [r["caption"] for r in rows] == np.argsort(-sims[2])[:4].tolist()
    assert all(r["own caption"] == (r["caption"] // 5 == 2) for r in rows)
    fig = nbu.text_to_image_figure(ds, sims, [0, 13], k=3)
    assert len(fig.axes) == 6
    plt.close(fig)
    fig = nbu.caption_grid(ds, [0, 1], boxes=True)
    assert len(fig.axes[0].patches) == ds.num_regions  # one rectangle per region box
    plt.close(fig)
