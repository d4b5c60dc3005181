"""Pointing accuracy (thsrn_lib.pointing): the scorer on constructed maps (oracle = 1, uniform = chance),
the driver on every method, and the benchmark script."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_viz import tiny_model  # noqa: E402  (tests/ is on sys.path: pytest prepend mode)

from thsrn_lib.data import PrecompDataset, find_vocab
from thsrn_lib.data.scenes import pointing_targets
from thsrn_lib.errors import ConfigError, DataError
from thsrn_lib.models.base import Explanation
from thsrn_lib.pointing import (
    format_pointing_table,
    load_split,
    pointing_accuracy,
    pointing_from_explanation,
    top_region_hits,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ds(scenes_tiny) -> PrecompDataset:
    return PrecompDataset(scenes_tiny, "test", vocab=find_vocab(scenes_tiny))


def test_top_region_hits_with_ties():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [1.0, 1.0, 1.0], [0.0, 0.2, 0.9]])
    gt = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=bool)
    np.testing.assert_allclose(top_region_hits(scores, gt), [1.0, 0.5, 1 / 3, 0.0])
    with pytest.raises(ConfigError, match="both be"):
        top_region_hits(scores, gt[:, :2])


def _block(ds, captions):
    """One image's captions as a block: ids, lengths, records (all captions of image captions[0] // 5)."""
    records = [ds.alignments()[k] for k in captions]
    seqs = [ds.caption_ids(k) for k in captions]
    lengths = torch.tensor([len(s) for s in seqs])
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    return records, lengths, mask


def _oracle_and_uniform(ds, captions):
    records, lengths, mask = _block(ds, captions)
    n, length, r = len(captions), mask.shape[1], ds.num_regions
    oracle = torch.full((1, n, length, r), 1.0 / r)
    for j, rec in enumerate(records):
        for t in pointing_targets(rec):
            if t["regions"]:
                row = torch.zeros(r)
                row[t["regions"]] = 1.0 / len(t["regions"])
                oracle[0, j, t["token"] + 1] = row
    uniform = torch.full((1, n, length, r), 1.0 / r)
    return records, mask, oracle, uniform


def test_oracle_scores_one_and_uniform_scores_chance(ds):
    captions = list(range(10, 15))
    records, mask, oracle, uniform = _oracle_and_uniform(ds, captions)
    sims = torch.zeros(1, len(captions))
    # i2t maps: each region's weights over words, read per word; the oracle puts the word's mass on its GT regions.
    i2t_oracle = oracle.transpose(2, 3).contiguous()
    expl = Explanation(sims=sims, mask=mask, attention={"t2i": oracle, "i2t": i2t_oracle})
    res = pointing_from_explanation(expl, records)
    assert res.streams == ["t2i", "i2t"]
    assert res.accuracy("t2i") == 1.0 and res.accuracy("i2t") == 1.0
    for wt in res.word_types():
        assert res.accuracy("t2i", wt) == 1.0
    n_tokens = sum(1 for rec in records for t in pointing_targets(rec) if t["regions"])
    assert len(res._select("t2i", "all")) == n_tokens > 0
    # Chance = mean |GT| / R over the tokens.
    expected_chance = np.mean([len(t["regions"]) / ds.num_regions for rec in records for t in pointing_targets(rec)
                               if t["regions"]])
    assert res.chance("t2i") == pytest.approx(expected_chance)
    uni = pointing_from_explanation(Explanation(sims=sims, mask=mask, attention={"t2i": uniform}), records)
    assert uni.accuracy("t2i") == pytest.approx(uni.chance("t2i"))  # ties are a random tie-break
    # An anti-oracle (all mass off the GT regions) scores 0.
    anti = torch.where(oracle > 1.0 / ds.num_regions, torch.zeros_like(oracle), oracle)
    zero = pointing_from_explanation(Explanation(sims=sims, mask=mask, attention={"t2i": anti + 1e-3 * (oracle == 0)}),
                                     records)
    assert zero.accuracy("t2i") == 0.0


def test_table_breaks_down_by_type_and_relation(ds):
    captions = list(range(0, ds.n_captions))
    records, mask, oracle, _ = _oracle_and_uniform(ds, captions)
    res = pointing_from_explanation(Explanation(sims=torch.zeros(1, len(captions)), mask=mask,
                                                attention={"t2i": oracle}), records, pairs=[(0, k) for k in captions])
    table = res.table()
    types = {row["type"] for row in table}
    assert {"all", "colour", "shape"} <= types
    assert all(row["accuracy"] == 1.0 for row in table)
    rel = [t for rec in records for t in pointing_targets(rec) if t["regions"] and t["in_relation"]]
    if rel:
        assert next(row for row in table if row["type"] == "in_relation")["tokens"] == len(rel)
    text = format_pointing_table([res])
    assert "| model | method | stream | all |" in text and "100.0" in text


def test_block_shape_must_be_unambiguous(ds):
    records, mask, oracle, _ = _oracle_and_uniform(ds, [0, 1])
    expl = Explanation(sims=torch.zeros(3, 2), mask=mask, attention={"t2i": oracle.expand(3, -1, -1, -1)})
    with pytest.raises(ConfigError, match="ambiguous"):
        pointing_from_explanation(expl, records)
    with pytest.raises(ConfigError, match="no word-region"):
        pointing_from_explanation(Explanation(sims=torch.zeros(1, 2), mask=mask), records)


@pytest.mark.parametrize("name", ["tshsr", "hje", "sgraf"])
def test_attention_pointing_driver(ds, name):
    model = tiny_model(name, ds)
    res = pointing_accuracy(model, ds, "attention", images_per_block=3)
    expected_streams = {"tshsr": ["t2i", "i2t"], "hje": ["affinity"], "sgraf": ["sgr:t2i", "saf:t2i", "t2i"]}[name]
    assert res.streams == expected_streams
    n_tokens = sum(1 for rec in ds.alignments() for t in pointing_targets(rec) if t["regions"])
    for s in res.streams:
        assert len(res._select(s, "all")) == n_tokens
        assert 0.0 <= res.accuracy(s) <= 1.0
    if name == "hje":
        assert res.sources["affinity"] == "hje_local_affinity"
    # The driver's blocks do not change the outcome (each map depends only on its pair).
    res1 = pointing_accuracy(model, ds, "attention", images_per_block=1)
    key = lambda t: (t["stream"], t["caption"], t["position"])  # noqa: E731
    assert sorted((key(t), t["hit"]) for t in res1.tokens) == sorted((key(t), t["hit"]) for t in res.tokens)


def test_attribution_pointing_drivers_agree_on_tokens(ds):
    model = tiny_model("sgr", ds)
    att = pointing_accuracy(model, ds, "attention", max_captions=10)
    occ = pointing_accuracy(model, ds, "occlusion", max_captions=10)
    ig = pointing_accuracy(model, ds, "integrated_gradients", max_captions=10, n_steps=4)
    keys = lambda r, s: [(t["caption"], t["position"]) for t in r._select(s, "all")]  # noqa: E731
    assert keys(att, "t2i") == keys(occ, "pair") == keys(ig, "pair")
    assert att.chance("t2i") == pytest.approx(occ.chance("pair"))
    assert occ.sources == {"pair": "occlusion"} and occ.info["baseline"] == "zeros"
    assert ig.info["baseline"] == "image_mean" and ig.info["abs_delta_mean"] >= 0
    # Occlusion's top region for a word = the region whose removal hurts that word's contribution most.
    from thsrn_lib.attribution import word_region_attributions

    tok = occ._select("pair", "all")[0]
    wr = word_region_attributions(model, ds.image_batch([tok["image"]])[0], ds.caption_ids(tok["caption"]),
                                  [tok["position"]], method="occlusion")
    assert tok["top"] == int(np.argmax(wr.attributions[0]))


def test_split_loading_and_errors(ds, scenes_tiny, tmp_path):
    assert load_split(f"{scenes_tiny}:test").n_captions == ds.n_captions
    assert load_split((scenes_tiny, "dev")).split == "dev"
    with pytest.raises(ConfigError, match="method"):
        pointing_accuracy(tiny_model("sgr", ds), ds, "saliency")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("test_caps.txt", "test_ims.npy", "vocab.json"):
        shutil.copy(Path(scenes_tiny) / name, bare / name)
    with pytest.raises(DataError, match="alignments"):
        pointing_accuracy(tiny_model("sgr", ds), (bare, "test"))


def test_benchmark_script_prints_table(ds, scenes_tiny, tmp_path, capsys):
    from thsrn_lib.checkpoint import model_payload, save_checkpoint

    for name in ("sgr", "saf"):
        run = tmp_path / f"scenes_demo_{name}"
        run.mkdir()
        save_checkpoint(run / "checkpoint_best.pt", model_payload(tiny_model(name, ds), ds.vocab))
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.pointing import main
    finally:
        sys.path.remove(str(REPO))
    out_json = tmp_path / "pointing.json"
    rc = main(["--checkpoints", str(tmp_path / "scenes_demo_*" / "checkpoint_best.pt"), "--data", str(scenes_tiny),
               "--split", "test", "--methods", "attention,occlusion", "--max-captions", "10", "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| sgr | attention | t2i |" in text and "| sgraf | attention | t2i |" in text
    assert "| saf | occlusion | pair |" in text and "chance" in text
    import json

    data = json.loads(out_json.read_text())
    assert {r["model"] for r in data["results"]} == {"sgr", "saf", "sgraf"}
