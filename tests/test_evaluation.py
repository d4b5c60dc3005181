"""Sharded evaluation engine, evaluate(), two-stage retrieval and the `thsrn eval` CLI on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from thsrn_lib.checkpoint import model_payload, save_checkpoint
from thsrn_lib.cli import main as thsrn_main
from thsrn_lib.data import PrecompDataset, Vocab, collate_texts
from thsrn_lib.errors import ConfigError, DataError
from thsrn_lib.evaluation import (
    Protocol,
    choose_shards,
    encode_images,
    encode_texts,
    estimate_pair_bytes,
    evaluate,
    evaluate_sims,
    ranks_i2t,
    ranks_t2i,
    score_matrix,
    two_stage_retrieval,
)
from thsrn_lib.evaluation.engine import num_items
from thsrn_lib.models import create

N_IMAGES, REGIONS, FEAT_DIM = 12, 5, 12
WORDS = "a the red blue green circle square star big small left right of to and above".split()


def write_precomp(root: Path, n_images: int = N_IMAGES, split: str = "test", seed: int = 0) -> Vocab:
    """A tiny SCAN-precomp split: random features, 5 random captions of 1-10 words per image."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / f"{split}_ims.npy", rng.standard_normal((n_images, REGIONS, FEAT_DIM)).astype(np.float32))
    caps = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 11)))) for _ in range(5 * n_images)]
    (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
    vocab = Vocab.build(caps, min_count=1)
    vocab.save(root / "vocab.json")
    return vocab


def tiny(name: str, vocab: Vocab, **extra):
    dims = dict(vocab_size=len(vocab), img_dim=FEAT_DIM, word_dim=8, embed_size=8, num_regions=REGIONS)
    if name in ("sgr", "saf", "tshsr"):
        dims["sim_dim"] = 8
    if name == "sgr":
        dims["sgr_step"] = 1
    if name == "hje":
        dims.update(global_dim=8, local_dim=8)
    torch.manual_seed(0)
    return create(name, **{**dims, **extra}).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("precomp")
    vocab = write_precomp(root)
    return PrecompDataset(root, "test", vocab)


@pytest.fixture(scope="module")
def sgr(data):
    return tiny("sgr", data.vocab)


def one_block_reference(model, ds) -> np.ndarray:
    """All images against all captions in one forward call (eval mode)."""
    batch = collate_texts([ds.texts()[k] for k in range(ds.n_captions)])
    model.eval()
    with torch.no_grad():
        return model(ds.image_batch(range(ds.n_images)), batch.ids, batch.lengths).numpy()


# ------------------------------------------------------------------------------- score_matrix
@pytest.mark.parametrize("name", ["sgr", "tshsr", "hje"])
@pytest.mark.parametrize("shards", [(1, 30), (5, 7), (100, 1000)])
def test_sharded_score_matrix_equals_one_block(data, name, shards):
    model = tiny(name, data.vocab)
    ref = one_block_reference(model, data)
    img = encode_images(model, data, batch_size=5)
    txt = encode_texts(model, data, batch_size=4, shard_size=shards[1])
    sims = score_matrix(model, img, txt, *shards)
    assert sims.dtype == np.float32 and sims.shape == (N_IMAGES, 5 * N_IMAGES)
    np.testing.assert_allclose(sims, ref, atol=1e-5)


def test_text_shards_are_length_sorted_with_minimal_padding(data, sgr):
    shards = encode_texts(sgr, data, batch_size=4, shard_size=8)
    lengths = [len(data.caption_ids(k)) for k in range(data.n_captions)]
    order = torch.cat([s.caption_index for s in shards]).tolist()
    assert sorted(order) == list(range(data.n_captions))  # every caption once
    assert [lengths[k] for k in order] == sorted(lengths, reverse=True)
    for s in shards:
        assert len(s) <= 8
        assert torch.equal(s.caption_index, s.position)  # all captions encoded -> column = caption index
        # padded width = longest caption of the shard's first encoding batch = its longest caption
        assert s.emb["mask"].shape[1] == max(lengths[k] for k in s.caption_index.tolist())


def test_images_encoded_once_and_never_copied_per_caption(data, sgr, monkeypatch):
    seen_rows: list[torch.Tensor] = []
    blocks: list[tuple[int, int]] = []
    orig_encode, orig_score = sgr.encode_images, sgr.score

    def counting_encode(feats):
        seen_rows.append(feats.clone())
        return orig_encode(feats)

    def recording_score(img_emb, txt_emb):
        blocks.append((num_items(img_emb), num_items(txt_emb)))
        return orig_score(img_emb, txt_emb)

    monkeypatch.setattr(sgr, "encode_images", counting_encode)
    monkeypatch.setattr(sgr, "score", recording_score)
    res = evaluate(sgr, data, batch_size=5, image_shard=4, caption_shard=9, progress=False)
    feats = torch.cat(seen_rows)
    assert feats.shape[0] == N_IMAGES  # one encoding per logical image, not per caption
    torch.testing.assert_close(feats, data.image_batch(range(N_IMAGES)))
    # every block holds at most image_shard images (no per-caption image copies) and every pair is scored once
    assert all(b <= 4 and n <= 9 for b, n in blocks)
    assert sum(b * n for b, n in blocks) == N_IMAGES * 5 * N_IMAGES
    assert res.info["pairs_scored"] == N_IMAGES * 5 * N_IMAGES


def test_memory_budget_bounds_the_block(data, sgr, monkeypatch):
    blocks: list[tuple[int, int]] = []
    orig_score = sgr.score
    monkeypatch.setattr(sgr, "score", lambda i, t: (blocks.append((num_items(i), num_items(t))), orig_score(i, t))[1])
    budget_mb = 0.05
    res = evaluate(sgr, data, memory_budget_mb=budget_mb, progress=False)
    pair_bytes = res.info["shards"]["pair_bytes_estimate"]
    assert pair_bytes > 8
    assert max(b * n for b, n in blocks) * pair_bytes <= budget_mb * 2**20
    assert max(b * n for b, n in blocks) < N_IMAGES * 5 * N_IMAGES  # the budget really split the matrix
    np.testing.assert_allclose(res.sims, one_block_reference(sgr, data), atol=1e-5)


def test_choose_shards():
    # COCO-5K shape, 200 kB per pair, 1 GiB: the block fits the budget and is far smaller than the matrix
    b, c = choose_shards(5000, 25000, 200_000, 1024)
    assert b * c * 200_000 <= 1024 * 2**20 and b >= 1 and c >= 1
    assert choose_shards(5000, 25000, 8, 1024) == (5000, 25000)  # an embedding model: one block
    assert choose_shards(10, 50, 1000, 0.01, image_shard=3) == (3, 3)  # 10,485 B -> 10 pairs -> 3 x 3
    assert choose_shards(10, 50, 1000, 1024, image_shard=30, caption_shard=7) == (10, 7)  # clipped
    assert choose_shards(10, 50, 10**9, 1) == (1, 1)  # never below one pair
    with pytest.raises(ConfigError):
        choose_shards(10, 50, 100, -1)
    with pytest.raises(ConfigError):
        choose_shards(10, 50, 100, 1, image_shard=0)


def test_pair_bytes_estimate(data):
    hje, sgr = tiny("hje", data.vocab), tiny("sgr", data.vocab)
    assert estimate_pair_bytes(hje, encode_images(hje, data), encode_texts(hje, data)) == 8
    img, txt = encode_images(sgr, data), encode_texts(sgr, data, batch_size=4)
    longest = max(s.emb["words"][0].numel() * 4 for s in txt)
    assert estimate_pair_bytes(sgr, img, txt) >= 4 * longest


# ------------------------------------------------------------------------------------ evaluate
def test_evaluate_writes_sims_and_metrics(data, sgr, tmp_path):
    res = evaluate(sgr, data, "scenes", out_dir=tmp_path / "out", progress=False, metadata={"note": "x"})
    sims = np.load(tmp_path / "out" / "sims.npy")
    np.testing.assert_array_equal(sims, res.sims)
    np.testing.assert_allclose(sims, one_block_reference(sgr, data), atol=1e-5)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["protocol"] == "scenes" and saved["metrics"] == res.metrics == evaluate_sims(sims)
    info = saved["info"]
    assert info["model"]["name"] == "sgr" and info["model"]["config"]["sgr_step"] == 1
    assert info["data"] == {"root": str(data.root), "split": "test", "n_images": N_IMAGES, "n_captions": 5 * N_IMAGES}
    assert {"encode_images_s", "encode_texts_s", "score_s", "total_s", "pairs_per_s"} <= set(info["timing"])
    assert info["metadata"] == {"note": "x"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "sims.npy"]  # no temp files


def test_evaluate_memmap_output(data, sgr, tmp_path):
    ref = evaluate(sgr, data, progress=False)
    res = evaluate(sgr, data, out_dir=tmp_path, memmap=True, image_shard=5, caption_shard=11, progress=False)
    assert isinstance(res.sims, np.memmap)
    np.testing.assert_allclose(np.load(tmp_path / "sims.npy"), ref.sims, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "sims.npy"]
    with pytest.raises(ConfigError, match="out_dir"):
        evaluate(sgr, data, memmap=True, progress=False)


def test_multi_fold_protocol_scores_only_diagonal_blocks(data, sgr):
    full = evaluate(sgr, data, progress=False).sims
    three = Protocol("three_folds", "test", folds=3, description="3 folds of 4 images")
    res = evaluate(sgr, data, three, progress=False)
    assert res.sims.shape == (3, 4, 20)
    for f in range(3):
        np.testing.assert_allclose(res.sims[f], full[4 * f : 4 * f + 4, 20 * f : 20 * f + 20], atol=1e-6)
    assert res.info["pairs_scored"] == 3 * 4 * 20
    assert res.metrics == pytest.approx(evaluate_sims(full, folds=3))
    assert len(res.info["folds"]) == 3


def test_evaluate_ensemble_averages_scores(data):
    a, b = tiny("sgr", data.vocab), tiny("saf", data.vocab)
    ens = evaluate([a, b], data, progress=False)
    sa, sb = evaluate(a, data, progress=False).sims, evaluate(b, data, progress=False).sims
    np.testing.assert_allclose(ens.sims, (sa + sb) / 2, atol=1e-6)
    assert [m["name"] for m in ens.info["model"]["members"]] == ["sgr", "saf"]
    w = evaluate([a, b], data, ensemble_weights=[3, 1], progress=False)
    np.testing.assert_allclose(w.sims, 0.75 * sa + 0.25 * sb, atol=1e-6)


def test_evaluate_refuses_wrong_protocol_and_data(data, sgr):
    with pytest.raises(DataError, match="exactly 1,000 images"):
        evaluate(sgr, data, "f30k", progress=False)
    with pytest.raises(DataError, match="testall"):
        evaluate(sgr, data, "coco1k", progress=False)
    wide = tiny("sgr", data.vocab, img_dim=FEAT_DIM + 4)
    with pytest.raises(DataError, match="img_dim=16"):
        evaluate(wide, data, progress=False)
    other_regions = tiny("sgr", data.vocab, num_regions=REGIONS + 1)  # R must match the BatchNorm slots
    with pytest.raises(DataError, match="regions"):
        evaluate(other_regions, data, progress=False)
    small_vocab = tiny("sgr", data.vocab, vocab_size=5)
    with pytest.raises(DataError, match="vocab_size=5"):
        evaluate(small_vocab, data, progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate(sgr, data, batch_size=0, progress=False)


# ----------------------------------------------------------------------------------- two-stage
def test_two_stage_with_all_candidates_equals_full_scoring(data, sgr):
    res = two_stage_retrieval(sgr, data, None, ks=(5 * N_IMAGES,))
    full = res.full
    k = res.per_k[0]
    assert (k["k_i2t"], k["k_t2i"]) == (5 * N_IMAGES, N_IMAGES)
    assert k["pairs_scored"] == full["pairs"] == N_IMAGES * 5 * N_IMAGES
    assert k["metrics"] == full["metrics"]
    assert all(v == 0 for v in k["recall_loss"].values())


def reference_two_stage(s1: np.ndarray, s2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Slow reference: shortlist by s1, order the shortlist by s2, the rest by s1; count unique pairs."""
    n_img, n_cap = s1.shape
    pairs = set()

    def final_rank(first: np.ndarray, second: np.ndarray, targets: set[int]) -> tuple[int, list[int]]:
        order1 = sorted(range(len(first)), key=lambda c: (-first[c], c))
        short = order1[:k]
        order = sorted(short, key=lambda c: (-second[c], c)) + order1[k:]
        return min(order.index(t) for t in targets), short

    i2t = []
    for i in range(n_img):
        r, short = final_rank(s1[i], s2[i], set(range(5 * i, 5 * i + 5)))
        i2t.append(r)
        pairs.update((i, c) for c in short)
    t2i = []
    for j in range(n_cap):
        r, short = final_rank(s1[:, j], s2[:, j], {j // 5})
        t2i.append(r)
        pairs.update((i, j) for i in short)
    return np.array(i2t), np.array(t2i), len(pairs)


@pytest.mark.parametrize("first_stage", ["own_global", "hje"])
def test_two_stage_small_k_matches_reference(data, sgr, first_stage):
    fs_model = tiny("hje", data.vocab) if first_stage == "hje" else None
    k = 3
    res = two_stage_retrieval(sgr, data, fs_model, ks=(k, 2))
    s2 = evaluate(sgr, data, progress=False).sims
    model1 = fs_model if fs_model is not None else sgr
    with torch.no_grad():
        gi = model1.global_image_vectors(model1.encode_images(data.image_batch(range(N_IMAGES))))
        batch = collate_texts([data.texts()[j] for j in range(data.n_captions)])
        gt = model1.global_text_vectors(model1.encode_texts(batch.ids, batch.lengths))
    s1 = (gi @ gt.T).numpy()
    ref_i2t, ref_t2i, ref_pairs = reference_two_stage(s1, s2, k)
    got = next(r for r in res.per_k if r["k"] == k)
    assert got["pairs_scored"] == ref_pairs < N_IMAGES * 5 * N_IMAGES
    from thsrn_lib.evaluation import metrics_from_ranks

    assert got["metrics"] == pytest.approx(metrics_from_ranks(ref_i2t, ref_t2i))
    assert res.first_stage_metrics == pytest.approx(metrics_from_ranks(ranks_i2t(s1), ranks_t2i(s1)))
    assert [r["k"] for r in res.per_k] == [2, 3]
    assert "two-stage k=3" in res.table()


def test_two_stage_needs_a_first_stage(data):
    class NoVectors(type(tiny("sgr", data.vocab))):
        def global_image_vectors(self, img_emb):
            return None

    model = NoVectors(tiny("sgr", data.vocab).config).eval()
    with pytest.raises(ConfigError, match="first_stage"):
        two_stage_retrieval(model, data, None, ks=(3,), compare_full=False)
    with pytest.raises(ConfigError, match="ks"):
        two_stage_retrieval(model, data, None, ks=(0,))


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data, sgr):
    path = tmp_path_factory.mktemp("ckpt") / "sgr.pt"
    save_checkpoint(path, model_payload(sgr, data.vocab))
    return path


def test_cli_success_writes_results(data, checkpoint, tmp_path, capsys):
    out = tmp_path / "res"
    rc = thsrn_main(
        [
            "eval",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(data.root),
            "--protocol",
            "generic",
            "--out",
            str(out),
            "--no-progress",
            "--shard-images",
            "5",
            "--two-stage",
            "3",
            "100",
        ]
    )
    stdout = capsys.readouterr().out
    assert rc == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["info"]["metadata"]["checkpoints"] == [str(checkpoint)]
    line = next(x for x in stdout.splitlines() if x.startswith("image -> text"))
    assert f"{saved['metrics']['i2t_r1']:.2f}" in line
    assert f"{saved['metrics']['rsum']:.2f}" in next(x for x in stdout.splitlines() if x.startswith("rsum"))
    assert "two-stage k=3" in stdout
    two = json.loads((out / "two_stage.json").read_text())
    assert two["per_k"][1]["metrics"] == pytest.approx(saved["metrics"])  # k=100 covers every candidate
    np.testing.assert_allclose(np.load(out / "sims.npy"), evaluate(sgr_from(checkpoint), data, progress=False).sims)


def sgr_from(path):
    from thsrn_lib.checkpoint import load_model

    return load_model(path).model


def test_cli_ensemble_of_two_checkpoints(data, checkpoint, tmp_path, capsys):
    rc = thsrn_main(
        [
            "eval",
            "--checkpoint",
            str(checkpoint),
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(data.root),
            "--out",
            str(tmp_path),
            "--no-progress",
            "--weights",
            "1",
            "3",
        ]
    )
    assert rc == 0
    single = evaluate(sgr_from(checkpoint), data, progress=False).sims
    np.testing.assert_allclose(np.load(tmp_path / "sims.npy"), single, atol=1e-6)
    assert "ensemble" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{missing}", "--data", "{data}"], "not found"),
        (["--checkpoint", "{ckpt}", "--data", "{nodata}"], "does not exist"),
        (["--checkpoint", "{ckpt}", "--data", "{data}", "--split", "train"], "train_caps.txt not found"),
        (["--checkpoint", "{ckpt}", "--data", "{data}", "--protocol", "f30k"], "exactly 1,000 images"),
        (["--checkpoint", "{ckpt}", "--data", "{data}", "--protocol", "coco1k", "--split", "test"], "testall"),
        (["--checkpoint", "{ckpt}", "--data", "{data}", "--device", "cuda:7"], "--device"),
        (["--checkpoint", "{ckpt}", "--data", "{data}", "--device", "tpu"], "--device"),
        (["--checkpoint", "{ckpt}", "--data", "{data}", "--weights", "1", "2"], "one per checkpoint"),
        (["--checkpoint", "{ckpt}", "--data", "{data}", "--first-stage", "{ckpt}"], "--two-stage"),
        (["--checkpoint", "{ckpt}", "--data", "{data}", "--memmap"], "--out"),
        (["--checkpoint", "{ckpt}", "--data", "{data}", "--protocol", "coco1k", "--two-stage", "5"], "coco5k"),
        (["--checkpoint", "{garbage}", "--data", "{data}"], "garbage.pt"),
        (["--checkpoint", "{ckpt}", "--data", "{baddata}"], "rows"),
    ],
)
def test_cli_errors_are_one_clear_message(data, checkpoint, tmp_path, capsys, args, message):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    bad = tmp_path / "bad"
    write_precomp(bad)
    np.save(bad / "test_ims.npy", np.zeros((N_IMAGES + 1, REGIONS, FEAT_DIM), dtype=np.float32))  # 13 rows, 60 captions
    fill = {
        "missing": str(tmp_path / "nope.pt"),
        "data": str(data.root),
        "nodata": str(tmp_path / "nodir"),
        "ckpt": str(checkpoint),
        "garbage": str(garbage),
        "baddata": str(bad),
    }
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device exists here; the unavailable-device path cannot be checked")
    rc = thsrn_main(["eval", *[a.format(**fill) for a in args], "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("thsrn eval: error:") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "bad", [["--batch-size", "0"], ["--memory-budget-mb", "-3"], ["--shard-images", "x"], ["--protocol", "coco"]]
)
def test_cli_rejects_bad_numbers_before_running(data, checkpoint, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        thsrn_main(["eval", "--checkpoint", str(checkpoint), "--data", str(data.root), *bad])
    assert exc.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        thsrn_main(["eval", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in (
        "--checkpoint",
        "--data",
        "--split",
        "--protocol",
        "--out",
        "--vocab",
        "--weights",
        "--batch-size",
        "--shard-images",
        "--shard-captions",
        "--memory-budget-mb",
        "--device",
        "--num-workers",
        "--memmap",
        "--two-stage",
        "--first-stage",
        "--no-progress",
    ):
        assert opt in text
    for proto in ("f30k", "coco1k", "coco5k", "generic"):
        assert proto in text
