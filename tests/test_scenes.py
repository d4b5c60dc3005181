"""Scenes benchmark: layout, determinism, alignments, pixel-only features, caching, crash safety."""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thsrn_lib.data import scenes as sc
from thsrn_lib.data.scenes.captions import COUNT_WORDS, SHAPE_WORDS, SIZE_WORDS
from thsrn_lib.data.scenes.cli import add_arguments, main, parse_overrides
from thsrn_lib.data.scenes.config import PRESETS, SPLITS, make_config
from thsrn_lib.data.scenes.features import FeatureSpec, RegionFeaturizer, RunningStats
from thsrn_lib.data.scenes.meaning import MeaningTable, SceneTable, fit_matrix
from thsrn_lib.data.scenes.regions import box_iou
from thsrn_lib.data.scenes.render import Renderer
from thsrn_lib.data.scenes.world import COLOURS, Scene
from thsrn_lib.data.tokenizer import tokenize
from thsrn_lib.data.vocab import Vocab
from thsrn_lib.errors import ConfigError

TINY = PRESETS["tiny"]
# the package re-exports the function `generate`, which shadows the submodule of the same name
gen_mod = importlib.import_module("thsrn_lib.data.scenes.generate")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return sc.generate("tiny", out=tmp_path_factory.mktemp("scenes_a"), seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in _lines(path)]


# ---------------------------------------------------------------------------- layout
def test_layout_shapes_and_counts(tiny):
    assert tiny.name == "tiny"
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["preset"] == "tiny" and meta["seed"] == 0 and len(meta["hash"]) == 64
    assert meta["params"]["n_regions"] == TINY.n_regions and meta["vocab"]["train_unk_tokens"] == 0
    for split in SPLITS:
        n = TINY.n_images(split)
        ims = np.load(tiny / f"{split}_ims.npy", mmap_mode="r")
        boxes = np.load(tiny / f"{split}_boxes.npy")
        assert ims.dtype == np.float32 and ims.shape == (n, TINY.n_regions, TINY.feature_dim)
        assert np.isfinite(ims).all()
        assert boxes.dtype == np.float32 and boxes.shape == (n, TINY.n_regions, 4)
        assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
        assert boxes.min() >= 0 and boxes.max() <= TINY.canvas
        ids = _lines(tiny / f"{split}_ids.txt")
        assert len(ids) == n and len(set(ids)) == n
        assert len(_lines(tiny / f"{split}_caps.txt")) == 5 * n
        assert len(_lines(tiny / f"{split}_alignments.jsonl")) == 5 * n
        assert len(_lines(tiny / f"{split}_scenes.jsonl")) == n
        for image_id in ids[:3]:
            with Image.open(tiny / "images" / split / f"{image_id}.png") as im:
                assert im.size == (TINY.canvas, TINY.canvas) and im.mode == "RGB"
        assert len(list((tiny / "images" / split).glob("*.png"))) == n
    assert sc.is_complete(tiny, meta["hash"])


def test_five_distinct_captions_per_image(tiny):
    for split in SPLITS:
        caps = _lines(tiny / f"{split}_caps.txt")
        for i in range(0, len(caps), 5):
            group = caps[i:i + 5]
            assert len(set(group)) == 5, group
            assert all(c.strip() == c and c for c in group)


def test_captions_have_variety(tiny):
    caps = [c for s in ("train", "dev", "test") for c in _lines(tiny / f"{s}_caps.txt")]
    words = {w for c in caps for w in tokenize(c)}
    assert {"left", "and", "there", "two"} & words == {"left", "and", "there", "two"} or len(words) > 40
    assert any(w in words for w in ("left", "right", "above", "below", "under", "next", "beside", "near"))
    assert len({c.split()[0] for c in caps}) >= 4  # several sentence frames


# ---------------------------------------------------------------------------- determinism
def test_same_seed_is_byte_identical_and_other_seed_differs(tiny, tmp_path):
    again = sc.generate("tiny", out=tmp_path / "b", seed=0)
    a, b = _files(tiny), _files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []

    # Each split's streams depend on the seed only (not on the split size), so a smaller data
    # set with seed 1 can be compared with the first images of the seed-0 one.
    other = sc.generate("tiny", out=tmp_path / "c", seed=1, n_train=10, n_dev=5, n_test=5, n_binding=3)
    assert other.name != "tiny"  # non-default seed -> its own folder
    assert _lines(other / "train_caps.txt") != _lines(tiny / "train_caps.txt")[:50]
    assert not np.array_equal(np.load(other / "train_boxes.npy"), np.load(tiny / "train_boxes.npy")[:10])
    assert not np.array_equal(np.load(other / "train_ims.npy"), np.load(tiny / "train_ims.npy")[:10])


# ---------------------------------------------------------------------------- alignments
def _word_describes(entry: dict, obj: dict, n_objects_for_token: int) -> bool:
    w, t = entry["word"], entry["type"]
    if t == "colour":
        return w == obj["colour"]
    if t == "shape":
        return any(w in pair for pair in SHAPE_WORDS[obj["shape"]])
    if t == "size":
        return w in SIZE_WORDS[obj["size"]]
    if t == "pattern":
        return w == obj["pattern"]
    if t == "count":
        return COUNT_WORDS[n_objects_for_token] == w
    raise AssertionError(f"unexpected type {t}")


def test_alignments_point_at_the_named_objects(tiny):
    n_checked = {t: 0 for t in ("colour", "shape", "size", "pattern", "count", "relation")}
    for split in SPLITS:
        scenes = _jsonl(tiny / f"{split}_scenes.jsonl")
        boxes = np.load(tiny / f"{split}_boxes.npy")
        caps = _lines(tiny / f"{split}_caps.txt")
        for rec in _jsonl(tiny / f"{split}_alignments.jsonl"):
            k, i = rec["caption"], rec["image"]
            assert i == k // 5
            assert rec["tokens"] == tokenize(caps[k])
            scene = scenes[i]
            objs = scene["objects"]
            per_token: dict[int, list[dict]] = {}
            for e in rec["align"]:
                per_token.setdefault(e["token"], []).append(e)
            for p, entries in per_token.items():
                for e in entries:
                    assert rec["tokens"][p] == e["word"]
                    obj = objs[e["object"]]
                    iou = box_iou(boxes[i], np.asarray([obj["box"]], dtype=np.float32))[:, 0]
                    assert e["regions"], "every named object has at least one matching region"
                    assert (iou[e["regions"]] >= 0.5).all()
                    assert sorted(e["regions"]) == sorted(np.nonzero(iou >= 0.5)[0].tolist())  # complete
                    if e["type"] == "relation":
                        assert e["in_relation"]
                    else:
                        assert _word_describes(e, obj, len(entries)), (caps[k], e, obj)
                    n_checked[e["type"]] += 1
            for r in rec["relations"]:
                (a,), (b,) = r["subject"], r["object"]
                assert [a, b] in scene["relations"][r["relation"]]
                assert rec["tokens"][r["head"]] in r["phrase"].split()
    assert all(n_checked[t] > 0 for t in ("colour", "shape", "size", "count", "relation")), n_checked


def test_pointing_targets_merge_objects_per_token():
    rec = {"align": [
        {"token": 1, "word": "two", "type": "count", "object": 0, "regions": [3], "in_relation": False},
        {"token": 1, "word": "two", "type": "count", "object": 2, "regions": [5, 1], "in_relation": False},
        {"token": 3, "word": "circles", "type": "shape", "object": 0, "regions": [3], "in_relation": False},
    ]}
    out = sc.pointing_targets(rec)
    assert [t["token"] for t in out] == [1, 3]
    assert out[0]["objects"] == [0, 2] and out[0]["regions"] == [1, 3, 5]


# ---------------------------------------------------------------------------- features
def _featurizer_and_stats(root: Path):
    cfg = make_config("tiny")
    fz = RegionFeaturizer(FeatureSpec.from_config(cfg))
    imgs = np.stack([np.asarray(Image.open(root / "images" / "train" / f"{i}.png"))
                     for i in _lines(root / "train_ids.txt")])
    stats = RunningStats(fz.spec.raw_dim)
    stats.update(fz.raw(imgs, np.load(root / "train_boxes.npy")).reshape(-1, fz.spec.raw_dim))
    return cfg, fz, stats.mean_std()


def test_features_are_a_function_of_the_pixels_in_each_box(tiny):
    cfg, fz, (mean, std) = _featurizer_and_stats(tiny)
    scenes = [Scene.from_record(r) for r in _jsonl(tiny / "test_scenes.jsonl")]
    boxes = np.load(tiny / "test_boxes.npy")
    renderer = Renderer(cfg.canvas, seed=0)
    images = renderer.render_batch(scenes)
    # re-rendering from the scene JSON reproduces the stored PNGs exactly
    for image_id, img in zip(_lines(tiny / "test_ids.txt"), images):
        assert np.array_equal(np.asarray(Image.open(tiny / "images" / "test" / f"{image_id}.png")), img)
    raw = fz.raw(images, boxes)
    assert np.array_equal(raw, fz.raw(images, boxes))  # same pixels -> same features
    stored = np.load(tiny / "test_ims.npy")
    np.testing.assert_allclose(fz.project(raw, mean, std), stored, rtol=1e-4, atol=1e-4)

    # recolour one object: regions whose box contains a changed pixel change, all others are untouched
    i = int(np.argmax([len(s.objects) for s in scenes]))
    scene = scenes[i]
    obj = scene.objects[0]
    new = next(c for c in COLOURS if c != obj.colour and np.abs(np.subtract(COLOURS[c], obj.rgb)).sum() > 200)
    recoloured = Scene.from_record(scene.to_record())
    recoloured.objects[0].rgb = COLOURS[new]
    before, after = renderer.render(scene), renderer.render(recoloured)
    changed = (before != after).any(axis=-1)
    assert changed.any()
    f0 = fz.raw(before[None], boxes[i:i + 1])[0]
    f1 = fz.raw(after[None], boxes[i:i + 1])[0]
    n_touching = 0
    for r, (x1, y1, x2, y2) in enumerate(boxes[i].astype(int)):
        if changed[y1:y2, x1:x2].any():
            n_touching += 1
            assert not np.array_equal(f0[r], f1[r]), f"region {r} contains recoloured pixels but kept its features"
        else:
            assert np.array_equal(f0[r], f1[r]), f"region {r} does not touch the object but its features changed"
    assert 0 < n_touching < len(boxes[i])

    # The sharpest case: boxes that border the object's tight box without containing any of
    # its pixels must not see it (no interpolation across the box edge), the box itself must.
    x1, y1, x2, y2 = obj.box
    c = cfg.canvas
    probes = np.array([[[x1, y1, x2, y2], [x2, y1, min(c, x2 + 6), y2], [max(0, x1 - 6), y1, x1, y2],
                        [x1, y2, x2, min(c, y2 + 6)], [x1, max(0, y1 - 6), x2, y1]]], dtype=np.float32)
    probes = probes[:, [0] + [k for k in range(1, 5) if (probes[0, k, 2:] - probes[0, k, :2] >= 2).all()]]
    assert probes.shape[1] >= 3
    g0, g1 = fz.raw(before[None], probes)[0], fz.raw(after[None], probes)[0]
    assert not np.array_equal(g0[0], g1[0])
    for k in range(1, probes.shape[1]):
        assert np.array_equal(g0[k], g1[k]), f"a box bordering the object at {probes[0, k]} saw its pixels"


def test_featurizer_rejects_bad_inputs():
    fz = RegionFeaturizer(FeatureSpec.from_config(make_config("tiny")))
    with pytest.raises(ValueError, match="uint8"):
        fz.raw(np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 2, 4)))
    with pytest.raises(ValueError, match="boxes"):
        fz.raw(np.zeros((1, 64, 64, 3), np.uint8), np.zeros((2, 2, 4)))


# ---------------------------------------------------------------------------- vocab
def test_vocab_is_valid_and_covers_train_captions(tiny):
    vocab = Vocab.load(tiny / "vocab.json")
    raw = json.loads((tiny / "vocab.json").read_text())
    assert raw["idx"] == len(vocab) and raw["idx2word"]["0"] == "<pad>" and raw["word2idx"]["<unk>"] == 3
    for split in ("train", "dev"):
        for cap in _lines(tiny / f"{split}_caps.txt"):
            ids = vocab.encode(cap)
            assert Vocab.UNK not in ids, cap
            assert ids[0] == Vocab.START and ids[-1] == Vocab.END


# ---------------------------------------------------------------------------- caching and crash safety
def test_second_call_reuses_without_rewriting(tiny):
    mtimes = {p: p.stat().st_mtime_ns for p in tiny.rglob("*") if p.is_file()}
    report = sc.generate_with_report("tiny", out=tiny.parent, seed=0)
    assert report.reused and report.path == tiny
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*") if p.is_file()} == mtimes


def test_stale_dataset_with_other_hash_is_replaced(tmp_path):
    root = sc.generate("tiny", out=tmp_path, n_train=10, n_dev=5, n_test=5, n_binding=3)
    meta = json.loads((root / "meta.json").read_text())
    meta["hash"] = "0" * 64  # as if written by an older generator version
    (root / "meta.json").write_text(json.dumps(meta))
    report = sc.generate_with_report("tiny", out=tmp_path, n_train=10, n_dev=5, n_test=5, n_binding=3)
    assert not report.reused and report.path == root
    assert json.loads((root / "meta.json").read_text())["hash"] != "0" * 64
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_crash_mid_generation_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(gen_mod, "_write_vocab", boom)  # after features and text files were written
    with pytest.raises(RuntimeError, match="simulated crash"):
        sc.generate("tiny", out=tmp_path, n_train=10, n_dev=5, n_test=5, n_binding=3)
    assert list(tmp_path.iterdir()) == []  # neither the final folder nor the temporary one
    assert not any(tmp_path.rglob("meta.json"))


def test_crash_during_forced_regeneration_keeps_the_old_dataset(tmp_path, monkeypatch):
    root = sc.generate("tiny", out=tmp_path, n_train=10, n_dev=5, n_test=5, n_binding=3)
    before = _files(root)
    monkeypatch.setattr(gen_mod, "_project_split", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        sc.generate("tiny", out=tmp_path, force=True, n_train=10, n_dev=5, n_test=5, n_binding=3)
    assert _files(root) == before
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


# ---------------------------------------------------------------------------- binding split
def test_binding_swapped_captions(tiny):
    original = _lines(tiny / "binding_caps.txt")
    swapped = sc.load_swapped_captions(tiny)
    assert len(swapped) == len(original) == 5 * TINY.n_binding
    scenes = _jsonl(tiny / "binding_scenes.jsonl")
    swaps = _jsonl(tiny / "binding_swaps.jsonl")
    for k, (o, s, info) in enumerate(zip(original, swapped, swaps)):
        assert o != s and info["caption"] == k and info["original"] == o and info["swapped"] == s
        to, ts = tokenize(o), tokenize(s)
        assert len(to) == len(ts) and ts[-1] == "."
        # same words, only rearranged (articles may switch between "a" and "an")
        norm = lambda toks: sorted("a" if t == "an" else t for t in toks)  # noqa: E731
        assert norm(to) == norm(ts)
        a, b = (scenes[k // 5]["objects"][j] for j in info["objects"])
        assert a[info["attribute"]] != b[info["attribute"]]


def test_binding_accuracy_helper():
    assert sc.binding_accuracy(np.array([1.0, 0.2, 0.5, 0.5]), np.array([0.0, 0.3, 0.4, 0.5])) == 0.5
    with pytest.raises(ValueError):
        sc.binding_accuracy(np.zeros(3), np.zeros(4))


# ---------------------------------------------------------------------------- meaning and the ceiling
def _brute_force_fits(meaning: dict, scene: dict) -> bool:
    objs = scene["objects"]

    def matches(m, o):
        return all(m[a] is None or m[a] == o[a] for a in ("shape", "colour", "size", "pattern"))

    mentions = meaning["mentions"]
    for m in mentions:
        if m["count"] and sum(matches(m, o) for o in objs) != m["count"]:
            return False
    slots = [j for j, m in enumerate(mentions) for _ in range(m["count"] or 1)]
    for perm in itertools.permutations(range(len(objs)), len(slots)):
        if not all(matches(mentions[j], objs[o]) for j, o in zip(slots, perm)):
            continue
        rel = meaning["relation"]
        if rel is None:
            return True
        a = perm[slots.index(rel["subject"])]
        b = perm[slots.index(rel["object"])]
        if [a, b] in scene["relations"][rel["type"]]:
            return True
    return False


def test_fit_matrix_matches_brute_force(tiny):
    scenes = _jsonl(tiny / "test_scenes.jsonl")
    meanings = [r["meaning"] for r in _jsonl(tiny / "test_alignments.jsonl")]
    fit = fit_matrix(MeaningTable.from_meanings(meanings), SceneTable.from_records(scenes))
    expected = np.array([[_brute_force_fits(m, s) for s in scenes] for m in meanings])
    assert np.array_equal(fit, expected)


def test_meaning_semantics_on_a_hand_made_scene():
    def obj(i, shape, colour, size="small"):
        return {"id": i, "shape": shape, "colour": colour, "size": size, "pattern": "plain"}

    scene = {"objects": [obj(0, "circle", "red"), obj(1, "circle", "red"), obj(2, "square", "blue")],
             "relations": {"left_of": [[0, 2]], "right_of": [[2, 0]], "above": [], "below": [], "next_to": []}}

    def mention(shape, colour=None, count=None):
        return {"shape": shape, "colour": colour, "size": None, "pattern": None, "count": count}

    def fits(mentions, relation=None):
        return bool(fit_matrix(MeaningTable.from_meanings([{"mentions": mentions, "relation": relation}]),
                               SceneTable.from_records([scene]))[0, 0])

    assert fits([mention("circle", "red", 2)])
    assert not fits([mention("circle", "red", 3)])
    assert fits([mention("circle", "red"), mention("circle")])  # two distinct circles exist
    assert not fits([mention("circle", "red", 2), mention("circle")])  # a third circle does not
    assert fits([mention("circle", "red"), mention("square")], {"type": "left_of", "subject": 0, "object": 1})
    assert not fits([mention("circle", "red"), mention("square")], {"type": "above", "subject": 0, "object": 1})
    assert not fits([mention("square", "red")])


def test_caption_ambiguity_ceiling(tiny):
    out = sc.caption_ambiguity_ceiling(tiny, "test")
    assert out["n_images"] == TINY.n_test and out["n_captions"] == 5 * TINY.n_test
    assert 0 < out["t2i_r1"] <= out["t2i_r5"] <= out["t2i_r10"] <= 100
    scenes = _jsonl(tiny / "test_scenes.jsonl")
    meanings = [r["meaning"] for r in _jsonl(tiny / "test_alignments.jsonl")]
    n_fit = np.array([sum(_brute_force_fits(m, s) for s in scenes) for m in meanings])
    assert out["t2i_r1"] == pytest.approx(100 * np.mean(1 / n_fit))
    assert out["fits_max"] == n_fit.max()


# ---------------------------------------------------------------------------- configuration and CLI
def test_unknown_or_invalid_override_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="valid names: .*n_train"):
        sc.generate("tiny", out=tmp_path, n_trian=5)
    with pytest.raises(ConfigError, match="n_regions"):
        sc.generate("tiny", out=tmp_path, n_regions=3)
    with pytest.raises(ConfigError, match="preset"):
        sc.generate("huge", out=tmp_path)
    with pytest.raises(ConfigError):
        parse_overrides(["n_train"])
    assert parse_overrides(["n_train=7", "small_size=0.1,0.12"]) == {"n_train": 7, "small_size": (0.1, 0.12)}
    assert list(tmp_path.iterdir()) == []


def test_override_changes_hash_and_folder(tmp_path):
    a = sc.dataset_dir(tmp_path, "tiny", make_config("tiny"), 0)
    b = sc.dataset_dir(tmp_path, "tiny", make_config("tiny", n_train=41), 0)
    c = sc.dataset_dir(tmp_path, "tiny", make_config("tiny", striped_prob=0), 0)
    d = sc.dataset_dir(tmp_path, "tiny", make_config("tiny", striped_prob=0.0), 0)
    assert a.name == "tiny" and b.name.startswith("tiny-") and b != a and c == d


def test_cli_reports_what_it_wrote(tiny, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--out", str(tiny.parent), "--quiet"])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert str(tiny) in out and "reused" in out
    assert f"R={TINY.n_regions}" in out and f"D={TINY.feature_dim}" in out
    assert f"{5 * TINY.n_train}" in out


def test_module_entry_point_reports_config_errors(tmp_path, capsys):
    runner = importlib.import_module("thsrn_lib.data.scenes.__main__")
    assert runner._run(["--preset", "tiny", "--out", str(tmp_path), "--set", "bogus=1", "--quiet"]) == 2
    assert "unknown Scenes parameter 'bogus'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
