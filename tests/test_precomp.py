"""The SCAN precomp reader: real caption files, im_div / dev cap layouts, errors, batching."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import thsrn_lib.data.precomp as precomp
from thsrn_lib.data import (
    Batch,
    PrecompDataset,
    Sample,
    Vocab,
    collate,
    collate_images,
    collate_texts,
    find_vocab,
    validate_precomp,
)
from thsrn_lib.data.precomp import read_caption_file
from thsrn_lib.errors import ConfigError, DataError

R, D = 2, 4  # tiny synthetic features: (rows, R, D)


def _features(rows: int) -> np.ndarray:
    """Row r is filled with the value r, so a read row identifies itself."""
    return np.broadcast_to(np.arange(rows, dtype=np.float32)[:, None, None], (rows, R, D)).copy()


def make_split(root: Path, split: str, captions: list[str], rows: int | None = None, features=None) -> Path:
    """Write ``{split}_caps.txt`` and ``{split}_ims.npy`` (per image unless ``rows`` says otherwise)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    if features is None:
        features = _features(rows if rows is not None else len(captions) // 5)
    np.save(root / f"{split}_ims.npy", features)
    return root


CAPS = [f"a dog number {i} runs ." for i in range(20)]  # 4 images


@pytest.fixture
def vocab() -> Vocab:
    return Vocab.build(CAPS, min_count=1)


# ------------------------------------------------------------------------------- real caption files
def test_f30k_test_has_no_trailing_newline(scan_captions_dir):
    path = scan_captions_dir / "f30k_precomp" / "test_caps.txt"
    raw = path.read_bytes()
    assert not raw.endswith(b"\n") and raw.count(b"\n") == 4999
    assert len(read_caption_file(path)) == 5000


@pytest.mark.parametrize(
    "data, split, n",
    [("f30k", "dev", 5070), ("f30k", "test", 5000), ("coco", "dev", 5000), ("coco", "test", 5000),
     ("coco", "testall", 25000)],
)
def test_real_caption_counts(scan_captions_dir, data, split, n):
    lines = read_caption_file(scan_captions_dir / f"{data}_precomp" / f"{split}_caps.txt")
    assert len(lines) == n and all(lines)


def test_coco_testall_folds_and_test_quirk(scan_captions_dir):
    test = read_caption_file(scan_captions_dir / "coco_precomp" / "test_caps.txt")
    testall = read_caption_file(scan_captions_dir / "coco_precomp" / "testall_caps.txt")
    assert len(testall) == 25000 == 5 * 5000
    folds = [testall[5000 * k : 5000 * (k + 1)] for k in range(5)]
    assert [len(f) for f in folds] == [5000] * 5 and sum(folds, []) == testall
    differing = [i for i in range(5000) if test[i] != testall[i]]
    assert differing == [4999]  # 1-based line 5,000
    assert test[4999] == "There is some sort of cegetables in a bowl ."
    assert testall[4999] == "THERE IS SOME SORT OF VEGETABLES IN A BOWL"


@pytest.fixture(scope="module")
def f30k_dev_root(scan_captions_dir, tmp_path_factory) -> Path:
    """Real F30K dev captions with a synthetic per-caption dev_ims.npy of 5,070 rows."""
    root = tmp_path_factory.mktemp("f30k_precomp")
    shutil.copy(scan_captions_dir / "f30k_precomp" / "dev_caps.txt", root / "dev_caps.txt")
    np.save(root / "dev_ims.npy", _features(5070))
    return root


def test_f30k_dev_5070_rows_and_dev_cap(f30k_dev_root, scan_captions_dir):
    vocab = Vocab.load(scan_captions_dir / "vocab" / "f30k_precomp_vocab.json")
    ds = PrecompDataset(f30k_dev_root, "dev", vocab)
    assert ds.im_div == 1
    assert (ds.n_captions, ds.n_images, len(ds)) == (5000, 1000, 5000)
    assert ds.captions == read_caption_file(f30k_dev_root / "dev_caps.txt")[:5000]
    assert (ds.num_regions, ds.feature_dim) == (R, D)
    for i in (0, 1, 7, 999):
        assert ds.image_row(i) == 5 * i
        assert np.all(ds.image_features(i) == 5 * i)
    sample = ds[4998]
    assert isinstance(sample, Sample)
    assert (sample.caption_index, sample.image_index) == (4998, 999)
    assert torch.all(sample.features == 4995) and sample.features.dtype == torch.float32
    assert sample.ids.dtype == torch.int64 and sample.ids.tolist() == vocab.encode(ds.captions[4998])
    with pytest.raises(IndexError):
        ds[5000]
    with pytest.raises(IndexError):
        ds.image_features(1000)
    full = PrecompDataset(f30k_dev_root, "dev", vocab, max_captions=None, check_finite="none")
    assert (full.n_captions, full.n_images) == (5070, 1014)
    assert np.all(full.image_features(1013) == 5065)


def test_per_image_layout_has_im_div_5(tmp_path, vocab):
    ds = PrecompDataset(make_split(tmp_path, "test", CAPS), "test", vocab)
    assert ds.im_div == 5 and (ds.n_captions, ds.n_images) == (20, 4)
    assert [ds.image_row(i) for i in range(4)] == [0, 1, 2, 3]
    assert np.all(ds.image_features(3) == 3)
    assert [ds[k].image_index for k in range(20)] == [k // 5 for k in range(20)]
    assert torch.equal(ds.image_batch([3, 0, 3]), torch.from_numpy(_features(4)[[3, 0, 3]]))


def test_explicit_and_auto_caps(tmp_path, vocab):
    make_split(tmp_path, "dev", CAPS)
    assert PrecompDataset(tmp_path, "dev", vocab).n_captions == 20  # auto cap 5,000 > 20: keep all
    ds = PrecompDataset(tmp_path, "dev", vocab, max_captions=10)
    assert (ds.n_captions, ds.n_images, ds.im_div) == (10, 2, 5)
    for bad in (7, 0, -5, "all", 2.5, True):
        with pytest.raises(ConfigError, match="max_captions"):
            PrecompDataset(tmp_path, "dev", vocab, max_captions=bad)


def test_captions_used_as_strings_without_vocab(tmp_path):
    ds = PrecompDataset(make_split(tmp_path, "test", CAPS), "test", None)
    assert ds.captions[3] == CAPS[3]
    with pytest.raises(DataError, match="no vocab"):
        ds.caption_ids(0)


def test_vocab_path_and_caption_ids_cache(tmp_path, vocab):
    make_split(tmp_path, "test", CAPS)
    vocab.save(tmp_path / "vocab.json")
    ds = PrecompDataset(tmp_path, "test", find_vocab(tmp_path))
    assert ds.vocab == vocab
    first = ds.caption_ids(2)
    assert first == vocab.encode(CAPS[2]) and ds.caption_ids(2) == first
    ds[2].ids[1] = 999  # a caller modifying an item must not corrupt the cache
    assert ds.caption_ids(2) == first
    ds.encode_all()
    assert all(ids is not None for ids in ds._ids_cache)
    assert [ds.caption_ids(k) for k in range(20)] == [vocab.encode(c) for c in CAPS]


# ------------------------------------------------------------------------------- errors
def _message(exc_info) -> str:
    return str(exc_info.value)


def test_missing_files(tmp_path, vocab):
    with pytest.raises(DataError, match="does not exist"):
        PrecompDataset(tmp_path / "nowhere", "test", vocab)
    (tmp_path / "test_caps.txt").write_text("\n".join(CAPS))
    with pytest.raises(DataError) as info:
        PrecompDataset(tmp_path, "test", vocab)
    msg = _message(info)
    assert "test_ims.npy" in msg and "kuanghueilee/scan-features" in msg and "thsrn scenes --preset demo" in msg
    with pytest.raises(DataError, match="Splits with captions in .*'test'"):
        PrecompDataset(tmp_path, "train", vocab)
    with pytest.raises(ConfigError):
        PrecompDataset(tmp_path, "../test", vocab)


def test_two_dimensional_and_integer_features(tmp_path, vocab):
    make_split(tmp_path, "test", CAPS, features=np.zeros((4, 8), np.float32))
    with pytest.raises(DataError, match=r"shape \(4, 8\); expected 3-D") as info:
        PrecompDataset(tmp_path, "test", vocab)
    assert "test_ims.npy" in _message(info)
    make_split(tmp_path, "test", CAPS, features=np.zeros((4, R, D), np.int32))
    with pytest.raises(DataError, match="dtype int32"):
        PrecompDataset(tmp_path, "test", vocab)
    (tmp_path / "test_ims.npy").write_bytes(b"not a numpy file")
    with pytest.raises(DataError, match="cannot be read"):
        PrecompDataset(tmp_path, "test", vocab)


def test_inconsistent_counts_name_both_files(tmp_path, vocab):
    captions = [f"caption {i}" for i in range(4990)]
    make_split(tmp_path, "test", captions, rows=1000)
    with pytest.raises(DataError) as info:
        PrecompDataset(tmp_path, "test", vocab)
    msg = _message(info)
    assert "test_ims.npy has 1000 rows" in msg and "test_caps.txt has 4990 captions" in msg


def test_caption_count_not_multiple_of_five(tmp_path, vocab):
    make_split(tmp_path, "test", CAPS[:12], rows=12)  # rows == captions, but 12 is not 5 per image
    with pytest.raises(DataError, match="12 captions .* not a multiple of 5"):
        PrecompDataset(tmp_path, "test", vocab)


@pytest.mark.parametrize("scan_bytes", [10**9, 1])  # one chunk; one image per chunk
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nonfinite_row_reported(tmp_path, vocab, monkeypatch, scan_bytes, bad_value):
    monkeypatch.setattr(precomp, "_FINITE_SCAN_BYTES", scan_bytes)
    feats = _features(4)
    feats[2, 1, 3] = bad_value
    make_split(tmp_path, "test", CAPS, features=feats)
    with pytest.raises(DataError, match=r"row 2 \(image 2\) contains NaN or inf") as info:
        PrecompDataset(tmp_path, "test", vocab)
    assert "test_ims.npy" in _message(info)
    ds = PrecompDataset(tmp_path, "test", vocab, check_finite="none")  # documented opt-out
    assert np.isnan(ds.image_features(2)).any() == np.isnan(bad_value)


def test_nonfinite_row_reported_for_per_caption_layout(tmp_path, vocab):
    feats = _features(20)
    feats[13, 0, 0] = np.nan  # row 13 is never read (image 2 reads row 10): no error
    make_split(tmp_path, "test", CAPS, features=feats)
    PrecompDataset(tmp_path, "test", vocab)
    feats[15, 0, 0] = np.nan  # image 3 reads row 15
    make_split(tmp_path, "test", CAPS, features=feats)
    with pytest.raises(DataError, match=r"row 15 \(image 3\)"):
        PrecompDataset(tmp_path, "test", vocab)


def test_check_finite_argument(tmp_path, vocab):
    with pytest.raises(ConfigError, match="check_finite"):
        PrecompDataset(make_split(tmp_path, "test", CAPS), "test", vocab, check_finite="sample")


def test_empty_caption_line_reported(tmp_path, vocab):
    make_split(tmp_path, "test", CAPS)
    lines = list(CAPS)
    lines[6] = "   "
    (tmp_path / "test_caps.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"test_caps.txt: line 7 is empty"):
        PrecompDataset(tmp_path, "test", vocab)
    (tmp_path / "test_caps.txt").write_text("\n".join(CAPS) + "\n\n")
    with pytest.raises(DataError, match=r"line 21 is empty"):
        PrecompDataset(tmp_path, "test", vocab)


def test_non_utf8_line_reported(tmp_path, vocab):
    make_split(tmp_path, "test", CAPS)
    raw = "\n".join(CAPS).encode()
    lines = raw.split(b"\n")
    lines[9] = b"a caf\xe9 table ."  # latin-1, not UTF-8
    (tmp_path / "test_caps.txt").write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"test_caps.txt: line 10 is not valid UTF-8"):
        PrecompDataset(tmp_path, "test", vocab)
    (tmp_path / "test_caps.txt").write_bytes(b"\xff" + raw)
    with pytest.raises(DataError, match=r"line 1 is not valid UTF-8"):
        PrecompDataset(tmp_path, "test", vocab)


def test_line_ends_and_byte_order_mark(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_bytes("\ufeffa dog .\r\nthe cat\rtwo\u2028birds\n".encode())
    # CRLF and CR end lines; U+2028 inside a caption does not; the BOM is dropped
    assert read_caption_file(path) == ["a dog .", "the cat", "two\u2028birds"]


def test_boxes_wrong_shape(tmp_path, vocab):
    make_split(tmp_path, "test", CAPS)
    np.save(tmp_path / "test_boxes.npy", np.zeros((4, R + 1, 4), np.float32))
    with pytest.raises(DataError, match=r"test_boxes.npy has shape \(4, 3, 4\)"):
        PrecompDataset(tmp_path, "test", vocab)
    np.save(tmp_path / "test_boxes.npy", np.zeros((3, R, 4), np.float32))
    with pytest.raises(DataError, match="test_boxes.npy has 3 entries"):
        PrecompDataset(tmp_path, "test", vocab)
    np.save(tmp_path / "test_boxes.npy", np.zeros((4, R), np.float32))
    with pytest.raises(DataError, match="test_boxes.npy has shape"):
        PrecompDataset(tmp_path, "test", vocab)


def test_ids_wrong_count(tmp_path, vocab):
    make_split(tmp_path, "test", CAPS)
    (tmp_path / "test_ids.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match="test_ids.txt has 3 lines"):
        PrecompDataset(tmp_path, "test", vocab)


# ------------------------------------------------------------------------------- optional side files
def test_optional_side_files_per_image(tmp_path, vocab):
    make_split(tmp_path, "test", CAPS)
    assert PrecompDataset(tmp_path, "test", vocab).image_ids is None
    ids = ["img0", "img1", "img2", "img3"]
    (tmp_path / "test_ids.txt").write_text("\n".join(ids))
    boxes = np.arange(4 * R * 4, dtype=np.float32).reshape(4, R, 4)
    np.save(tmp_path / "test_boxes.npy", boxes)
    (tmp_path / "images" / "test").mkdir(parents=True)
    (tmp_path / "images" / "test" / "img1.png").write_bytes(b"png")
    rows = [{"caption": k, "tokens": [[1, 0, [k % R]]]} for k in range(20)]
    (tmp_path / "test_alignments.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = PrecompDataset(tmp_path, "test", vocab, max_captions=15)
    assert ds.image_ids == ids[:3]
    np.testing.assert_array_equal(ds.boxes, boxes[:3])
    assert ds.image_path(1) == tmp_path / "images" / "test" / "img1.png"
    assert ds.image_path(0) is None
    assert ds.alignments() == rows[:15]
    other = tmp_path / "raw"
    other.mkdir()
    (other / "img0.jpg").write_bytes(b"jpg")
    assert PrecompDataset(tmp_path, "test", vocab, image_dir=other).image_path(0) == other / "img0.jpg"


def test_optional_side_files_per_row(tmp_path, vocab):
    make_split(tmp_path, "test", CAPS, rows=20)  # per-caption storage: ids/boxes may be per row too
    (tmp_path / "test_ids.txt").write_text("\n".join(f"img{k // 5}" for k in range(20)))
    boxes = np.repeat(np.arange(4, dtype=np.float32), 5)[:, None, None] * np.ones((1, R, 4), np.float32)
    np.save(tmp_path / "test_boxes.npy", boxes)
    ds = PrecompDataset(tmp_path, "test", vocab)
    assert ds.im_div == 1 and ds.image_ids == ["img0", "img1", "img2", "img3"]
    assert ds.boxes.shape == (4, R, 4) and np.all(ds.boxes[:, 0, 0] == [0, 1, 2, 3])


def test_alignment_file_errors(tmp_path, vocab):
    make_split(tmp_path, "test", CAPS)
    (tmp_path / "test_alignments.jsonl").write_text("{}\n" * 19)
    with pytest.raises(DataError, match="19 lines"):
        PrecompDataset(tmp_path, "test", vocab).alignments()
    (tmp_path / "test_alignments.jsonl").write_text("{}\n" * 5 + "[1]\n" + "{}\n" * 14)
    with pytest.raises(DataError, match="line 6 is not a JSON object"):
        PrecompDataset(tmp_path, "test", vocab).alignments()


# ------------------------------------------------------------------------------- views and batching
def test_collate_pads_masks_and_sorts():
    feats = [torch.full((R, D), float(i)) for i in range(4)]
    ids = [torch.tensor([1, 5, 2]), torch.tensor([1, 5, 6, 7, 2]), torch.tensor([1, 9, 2]), torch.tensor([1, 4, 4, 2])]
    batch = collate([Sample(f, t, 10 + i, i // 2) for i, (f, t) in enumerate(zip(feats, ids))])
    assert isinstance(batch, Batch) and len(batch) == 4
    assert batch.caption_index.tolist() == [11, 13, 10, 12]  # longest first, ties keep input order
    assert batch.image_index.tolist() == [0, 1, 0, 1]
    assert batch.lengths.tolist() == [5, 4, 3, 3] and batch.lengths.dtype == torch.int64
    assert batch.ids.tolist() == [[1, 5, 6, 7, 2], [1, 4, 4, 2, 0], [1, 5, 2, 0, 0], [1, 9, 2, 0, 0]]
    assert batch.mask.dtype == torch.bool and batch.mask.tolist() == (batch.ids != 0).tolist()
    assert batch.images.shape == (4, R, D) and batch.images[:, 0, 0].tolist() == [1.0, 3.0, 0.0, 2.0]
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.ids, batch.ids)
    with pytest.raises(ValueError):
        collate([])


def test_loader_over_dataset_and_views(tmp_path, vocab):
    ds = PrecompDataset(make_split(tmp_path, "test", CAPS), "test", vocab)
    batches = list(DataLoader(ds, batch_size=8, collate_fn=collate))
    assert [len(b) for b in batches] == [8, 8, 4]
    b = batches[0]
    assert torch.equal(b.image_index, b.caption_index // 5)
    assert torch.equal(b.images[:, 0, 0], b.image_index.float())
    assert sorted(torch.cat([x.caption_index for x in batches]).tolist()) == list(range(20))

    images = ds.images()
    assert len(images) == 4
    ib = next(iter(DataLoader(images, batch_size=4, collate_fn=collate_images)))
    assert ib.image_index.tolist() == [0, 1, 2, 3] and ib.images.shape == (4, R, D)
    assert torch.equal(ib.images, ds.image_batch(range(4)))

    texts = ds.texts()
    assert len(texts) == 20
    tb = collate_texts([texts[k] for k in (4, 0, 11)])
    assert tb.caption_index.tolist() == [4, 0, 11]  # no sorting
    assert tb.ids[0, : tb.lengths[0]].tolist() == ds.caption_ids(4)
    assert tb.mask.sum(1).tolist() == tb.lengths.tolist()


def test_pickle_reopens_memmap(tmp_path, vocab):
    ds = PrecompDataset(make_split(tmp_path, "test", CAPS), "test", vocab)
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # the features are not serialised
    clone = pickle.loads(blob)
    assert isinstance(clone.features, np.memmap)
    assert np.array_equal(clone.image_features(3), ds.image_features(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pin_memory_and_to_device(tmp_path, vocab):
    ds = PrecompDataset(make_split(tmp_path, "test", CAPS), "test", vocab)
    batch = collate([ds[k] for k in range(6)])
    pinned = batch.pin_memory()
    assert pinned.images.is_pinned() and pinned.mask.is_pinned()
    gpu = pinned.to("cuda", non_blocking=True)
    assert gpu.ids.is_cuda and torch.equal(gpu.ids.cpu(), batch.ids)


# ------------------------------------------------------------------------------- helpers
def test_validate_precomp_summary(tmp_path, vocab):
    root = make_split(tmp_path / "f30k_precomp", "dev", [f"caption {i}" for i in range(25)], rows=25)
    summary = validate_precomp(root, "dev", max_captions=10)
    assert summary["im_div"] == 1 and summary["rows"] == 25 and summary["caption_lines"] == 25
    assert (summary["n_captions"], summary["n_images"], summary["dropped_captions"]) == (10, 2, 15)
    assert (summary["num_regions"], summary["feature_dim"], summary["dtype"]) == (R, D, "float32")
    assert summary["vocab"] is None and summary["has_ids"] is False
    (tmp_path / "vocab").mkdir()
    vocab.save(tmp_path / "vocab" / "f30k_precomp_vocab.json")
    summary = validate_precomp(root, "dev")
    assert summary["vocab"] == str(tmp_path / "vocab" / "f30k_precomp_vocab.json")
    assert summary["vocab_size"] == len(vocab)
    with pytest.raises(DataError, match="kuanghueilee/scan-features"):
        validate_precomp(root, "test")


def test_find_vocab_search_order(tmp_path, vocab):
    root = tmp_path / "coco_precomp"
    root.mkdir()
    with pytest.raises(DataError, match="no vocab JSON found"):
        find_vocab(root)
    (tmp_path / "vocab").mkdir()
    vocab.save(tmp_path / "vocab" / "coco_precomp_vocab.json")
    assert find_vocab(root) == tmp_path / "vocab" / "coco_precomp_vocab.json"
    with pytest.raises(DataError):
        find_vocab(root, data_name="f30k_precomp")
    vocab.save(root / "coco_precomp_vocab.json")
    assert find_vocab(root) == root / "coco_precomp_vocab.json"
    vocab.save(root / "vocab.json")
    assert find_vocab(root) == root / "vocab.json"


def test_real_layout_find_vocab(scan_captions_dir):
    assert find_vocab(scan_captions_dir / "f30k_precomp") == scan_captions_dir / "vocab" / "f30k_precomp_vocab.json"
