"""Retrieval metrics and protocols on hand-made similarity matrices (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thsrn_lib.errors import ConfigError, DataError
from thsrn_lib.evaluation import (
    METRIC_KEYS,
    RECALL_KEYS,
    evaluate_protocol,
    evaluate_sims,
    fold_metrics,
    fold_slices,
    format_metrics_table,
    get_protocol,
    metrics_from_ranks,
    ranks_i2t,
    ranks_t2i,
    recall_at_k_curve,
)


def block_diag(n_images: int, cpi: int = 5) -> np.ndarray:
    """1 on every (image, own caption) pair, 0 elsewhere: a perfect ranking."""
    return np.repeat(np.eye(n_images, dtype=np.float32), cpi, axis=1)


def reference_ranks(sims: np.ndarray, cpi: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Slow reference: a stable sort by descending score (ties -> ascending index), then look up."""
    n_img, n_cap = sims.shape
    i2t = []
    for i in range(n_img):
        order = sorted(range(n_cap), key=lambda c: (-sims[i, c], c))
        i2t.append(min(order.index(c) for c in range(cpi * i, cpi * i + cpi)))
    t2i = []
    for j in range(n_cap):
        order = sorted(range(n_img), key=lambda r: (-sims[r, j], r))
        t2i.append(order.index(j // cpi))
    return np.array(i2t), np.array(t2i)


# ---------------------------------------------------------------------------------------- ranks
def test_perfect_ranking():
    m = evaluate_sims(block_diag(4))
    assert list(m) == list(METRIC_KEYS)
    assert all(m[k] == 100.0 for k in RECALL_KEYS)
    assert m["i2t_medr"] == m["t2i_medr"] == m["i2t_meanr"] == m["t2i_meanr"] == 1.0
    assert m["rsum"] == 600.0


def test_worst_ranking():
    # Every ground-truth pair scores below every other pair.
    sims = -block_diag(3)
    # i2t: the 10 foreign captions come first -> best ground truth at 0-based rank 10.
    np.testing.assert_array_equal(ranks_i2t(sims), [10, 10, 10])
    # t2i: both foreign images come first -> rank 2.
    np.testing.assert_array_equal(ranks_t2i(sims), [2] * 15)
    m = evaluate_sims(sims)
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"], m["i2t_medr"], m["i2t_meanr"]) == (0, 0, 0, 11, 11)
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_r10"], m["t2i_medr"], m["t2i_meanr"]) == (0, 100, 100, 3, 3)
    assert m["rsum"] == 200.0


def test_constant_scores_rank_by_index():
    # All ties: candidates are ordered by index, so a constant model gets no credit beyond that.
    sims = np.zeros((4, 20), dtype=np.float32)
    np.testing.assert_array_equal(ranks_i2t(sims), [0, 5, 10, 15])
    np.testing.assert_array_equal(ranks_t2i(sims), np.arange(20) // 5)


def test_tie_between_ground_truth_and_foreign_candidate():
    sims = np.zeros((2, 10), dtype=np.float32)
    sims[1, 7] = 0.5  # image 1's best ground truth (caption 7) ...
    sims[1, 2] = 0.5  # ... ties with foreign caption 2, which has the lower index and goes first
    assert ranks_i2t(sims)[1] == 1
    sims[1, 2] = 0.5 - 1e-3
    assert ranks_i2t(sims)[1] == 0
    # t2i: caption 7 (image 1) ties between images 0 and 1 -> image 0 first, rank 1.
    sims[0, 7] = 0.5
    assert ranks_t2i(sims)[7] == 1


def test_i2t_uses_best_of_five_captions():
    sims = np.full((2, 10), 0.5, dtype=np.float32)
    sims[0, :5] = [0.1, 0.9, 0.2, 0.3, 0.4]  # one ground truth beats every foreign caption
    sims[1, 5:] = [0.0, 0.0, 0.0, 0.6, 0.0]
    np.testing.assert_array_equal(ranks_i2t(sims), [0, 0])
    sims[0, 1] = 0.45  # now the best ground truth is behind the 5 foreign captions at 0.5
    assert ranks_i2t(sims)[0] == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_match_slow_reference_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    sims = rng.integers(0, 4, size=(6, 30)).astype(np.float32)  # 4 distinct values: ties everywhere
    ref_i2t, ref_t2i = reference_ranks(sims)
    np.testing.assert_array_equal(ranks_i2t(sims), ref_i2t)
    np.testing.assert_array_equal(ranks_t2i(sims), ref_t2i)


def test_chunked_ranks_equal_unchunked(monkeypatch):
    import thsrn_lib.evaluation.metrics as metrics

    rng = np.random.default_rng(3)
    sims = rng.standard_normal((12, 60)).astype(np.float32)
    full = ranks_i2t(sims), ranks_t2i(sims)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 100)  # forces blocks of 1-8 rows / columns
    np.testing.assert_array_equal(ranks_i2t(sims), full[0])
    np.testing.assert_array_equal(ranks_t2i(sims), full[1])


def test_torch_and_float16_inputs():
    rng = np.random.default_rng(4)
    sims = rng.standard_normal((5, 25)).astype(np.float32)
    ref = evaluate_sims(sims)
    assert evaluate_sims(torch.from_numpy(sims)) == ref
    assert evaluate_sims(torch.from_numpy(sims).to(torch.bfloat16)) == evaluate_sims(
        torch.from_numpy(sims).to(torch.bfloat16).float()
    )
    s16 = sims.astype(np.float16)
    np.testing.assert_array_equal(ranks_t2i(s16), reference_ranks(s16.astype(np.float32))[1])


# -------------------------------------------------------------------------------------- metrics
def test_medr_and_meanr_even_and_odd_counts():
    # even count: median of [0, 1, 4, 9] = 2.5 -> floor + 1 = 3; mean 3.5 -> meanr 4.5
    m = metrics_from_ranks([0, 1, 4, 9], [0, 3, 7])
    assert m["i2t_medr"] == 3.0 and m["i2t_meanr"] == 4.5
    # odd count: median 3 -> medr 4; mean 10/3 -> meanr 13/3
    assert m["t2i_medr"] == 4.0 and m["t2i_meanr"] == pytest.approx(13 / 3)
    assert m["i2t_r1"] == 25.0 and m["i2t_r5"] == 75.0 and m["i2t_r10"] == 100.0
    assert m["t2i_r1"] == pytest.approx(100 / 3) and m["t2i_r5"] == pytest.approx(200 / 3)
    # even count whose middle values average to an integer + 0.5 below: [2, 3] -> 2.5 -> 3
    assert metrics_from_ranks([2, 3], [0])["i2t_medr"] == 3.0


def test_rsum_is_sum_of_six_recalls():
    rng = np.random.default_rng(5)
    sims = rng.standard_normal((20, 100)).astype(np.float32) + 2 * block_diag(20)
    m = evaluate_sims(sims)
    assert m["rsum"] == pytest.approx(sum(m[k] for k in RECALL_KEYS))
    assert 0 < m["rsum"] < 600


def test_recall_at_k_curve():
    ks, r = recall_at_k_curve([0, 0, 2, 5])
    np.testing.assert_array_equal(ks, [1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(r, [50, 50, 75, 75, 75, 100])
    ks, r = recall_at_k_curve([0, 0, 2, 5], max_k=2)
    np.testing.assert_allclose(r, [50, 50])
    # the curve agrees with the R@K of the metrics
    rng = np.random.default_rng(6)
    sims = rng.standard_normal((10, 50)).astype(np.float32) + block_diag(10)
    _, curve = recall_at_k_curve(ranks_t2i(sims), max_k=10)
    m = evaluate_sims(sims)
    assert (curve[0], curve[4], curve[9]) == pytest.approx((m["t2i_r1"], m["t2i_r5"], m["t2i_r10"]))
    with pytest.raises(DataError):
        recall_at_k_curve([-1, 2])


def test_bad_inputs_are_refused():
    with pytest.raises(DataError, match="5 x n_images"):
        evaluate_sims(np.zeros((4, 19)))
    with pytest.raises(DataError, match="2-D"):
        evaluate_sims(np.zeros(20))
    bad = block_diag(3)
    bad[1, 4] = np.nan
    with pytest.raises(DataError, match="NaN"):
        evaluate_sims(bad)
    with pytest.raises(ConfigError):
        evaluate_sims(block_diag(3), folds=2)  # 3 images cannot form 2 equal folds


def test_table_labels_each_number_correctly():
    m = metrics_from_ranks([0, 1, 4, 20], [0, 0, 3, 12, 30])
    table = format_metrics_table(m, title="x")
    lines = table.splitlines()
    i2t_line = next(line for line in lines if line.startswith("image -> text"))
    t2i_line = next(line for line in lines if line.startswith("text -> image"))
    rsum_line = next(line for line in lines if line.startswith("rsum"))
    assert f"{m['i2t_r1']:.2f}" in i2t_line and f"{m['i2t_meanr']:.2f}" in i2t_line
    assert f"{m['t2i_r10']:.2f}" in t2i_line and f"{m['t2i_meanr']:.2f}" in t2i_line
    assert rsum_line.split()[-1] == f"{sum(m[k] for k in RECALL_KEYS):.2f}"


# -------------------------------------------------------------------------------- folds / protocols
def test_coco1k_fold_slices_on_indices():
    slices = fold_slices(5000, 5)
    assert len(slices) == 5
    images = np.arange(5000)
    captions = np.arange(25000)
    for k, (isl, csl) in enumerate(slices):
        np.testing.assert_array_equal(images[isl], np.arange(1000 * k, 1000 * k + 1000))
        np.testing.assert_array_equal(captions[csl], np.arange(5000 * k, 5000 * k + 5000))
        # every caption of the fold belongs to an image of the fold
        np.testing.assert_array_equal(np.unique(captions[csl] // 5), images[isl])
    assert get_protocol("coco1k").fold_slices(5000) == slices


def test_folds_ignore_off_diagonal_blocks_and_average():
    rng = np.random.default_rng(7)
    sims = rng.standard_normal((50, 250)).astype(np.float32) + 1.5 * block_diag(50)
    per_fold = fold_metrics(sims, folds=5)
    manual = [evaluate_sims(sims[10 * f : 10 * f + 10, 50 * f : 50 * f + 50]) for f in range(5)]
    assert per_fold == manual
    avg = evaluate_sims(sims, folds=5)
    for key in METRIC_KEYS:
        assert avg[key] == pytest.approx(np.mean([m[key] for m in manual]))
    # the mean of the per-fold rsums equals the sum of the fold-averaged recalls
    assert avg["rsum"] == pytest.approx(sum(avg[k] for k in RECALL_KEYS))
    # fold results do not depend on scores outside the diagonal blocks; the one-matrix result does
    spoiled = sims.copy()
    spoiled[:10, 50:] = 100.0
    assert evaluate_sims(spoiled, folds=5) == avg
    assert evaluate_sims(spoiled)["i2t_r1"] < evaluate_sims(sims)["i2t_r1"]
    # a (folds, n, 5n) stack of the diagonal blocks gives the same numbers
    stack = np.stack([sims[10 * f : 10 * f + 10, 50 * f : 50 * f + 50] for f in range(5)])
    assert evaluate_sims(stack) == avg


def test_coco1k_on_a_full_size_matrix_reads_only_diagonal_blocks():
    # 5,000 x 25,000 zeros are allocated lazily by the OS; only the 5 diagonal blocks (100 MB)
    # are ever written, which is all COCO 1K reads.
    sims = np.zeros((5000, 25000), dtype=np.float32)
    base = np.random.default_rng(8).integers(0, 64, size=(1000, 5000)).astype(np.float32)
    boost = block_diag(1000)
    expected = []
    for f, (isl, csl) in enumerate(fold_slices(5000, 5)):
        block = base + (8 + 8 * f) * boost  # a different ground-truth margin per fold
        sims[isl, csl] = block
        expected.append(evaluate_sims(block))
    m = evaluate_protocol(sims, "coco1k")
    for key in METRIC_KEYS:
        assert m[key] == pytest.approx(np.mean([e[key] for e in expected]))
    assert len({e["rsum"] for e in expected}) == 5  # the folds really differ


def test_protocol_size_checks():
    with pytest.raises(DataError, match=r"5,000 images.*testall"):
        evaluate_protocol(np.zeros((1000, 5000), dtype=np.float32), "coco1k")  # 5-fold on 1,000 images
    with pytest.raises(DataError, match="exactly 5,000"):
        get_protocol("coco5k").check_shape(1000, 5000)
    with pytest.raises(DataError, match="exactly 1,000"):
        get_protocol("f30k").check_shape(1014, 5070)
    with pytest.raises(DataError, match="5 captions per image"):
        get_protocol("generic").check_shape(10, 49)
    get_protocol("f30k").check_shape(1000, 5000)
    get_protocol("generic").check_shape(7, 35)
    m = evaluate_protocol(block_diag(1000), "f30k")
    assert m["rsum"] == 600.0
    with pytest.raises(ConfigError, match="valid protocols"):
        get_protocol("coco")
    with pytest.raises(ConfigError, match="equal non-empty folds"):
        fold_slices(3, 5)
    assert get_protocol("coco1k").default_split == "testall"
    assert get_protocol("f30k").default_split == "test"
    assert get_protocol("dev").default_split == "dev"
