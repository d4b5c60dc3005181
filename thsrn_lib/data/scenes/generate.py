"""Generate a Scenes data set: orchestration, caching by parameter hash, atomic placement.

Where it goes: ``generate(preset, out)`` writes ``<out>/<preset>`` when the parameters are
the preset's own and the seed is 0 (``generate("demo", "data/scenes")`` ->
``data/scenes/demo``); any other seed or override goes to ``<out>/<preset>-<hash10>``
(the first 10 hex digits of the parameter hash), so variants never overwrite each other.

Caching: a folder whose ``meta.json`` carries the same parameter hash is reused as is.
``meta.json`` is written last, and the whole data set is built in a hidden temporary
sibling folder (``.<name>.tmp-...``) that is renamed into place only when complete, so a
crash never leaves a half data set under the final name. A stale folder with another hash
(or any folder with ``force=True``) is replaced.

Pipeline, split by split (train first: its raw features fix the standardisation): scenes +
captions -> region boxes -> render -> {raw features, PNG files} on two background threads,
while the main thread writes the split's text files and goes on with the next split; then
``vocab.json``, standardisation + projection of every split, and ``meta.json`` last. Feature
extraction runs with one torch thread (see :func:`_torch_threads`). Everything is seeded:
the same seed and parameters give byte-identical files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from thsrn_lib.data.scenes.captions import Caption, binding_captions, scene_captions
from thsrn_lib.data.scenes.config import (
    GENERATOR_VERSION,
    PRESETS,
    SPLITS,
    ScenesConfig,
    make_config,
    params_hash,
)
from thsrn_lib.data.scenes.features import FeatureSpec, RegionFeaturizer, RunningStats
from thsrn_lib.data.scenes.png import encode_png
from thsrn_lib.data.scenes.regions import box_iou, sample_regions
from thsrn_lib.data.scenes.render import Renderer
from thsrn_lib.data.scenes.shapes import ShapeBank
from thsrn_lib.data.scenes.world import Scene, sample_scene
from thsrn_lib.data.tokenizer import tokenize
from thsrn_lib.data.vocab import Vocab
from thsrn_lib.errors import ConfigError
from thsrn_lib.utils.io import atomic_save_npy, atomic_write, atomic_write_json, fsync_dir

__all__ = ["GenerationReport", "generate", "generate_with_report", "dataset_dir", "is_complete", "CAPTIONS_PER_IMAGE"]

log = logging.getLogger(__name__)

CAPTIONS_PER_IMAGE = 5
_IMAGES_PER_CHUNK = 128  # render/featurise this many images at a time (bounded memory for any preset)
_MAX_SCENE_RESAMPLES = 50


@dataclass
class GenerationReport:
    """What :func:`generate_with_report` did."""

    path: Path
    reused: bool
    seconds: dict[str, float] = field(default_factory=dict)  # wall clock per stage, plus "total"
    meta: dict[str, Any] = field(default_factory=dict)
    # CPU seconds per stage, of the thread that ran it ("(worker)" stages run on background
    # threads beside the main thread, so wall-clock stage times overlap and do not add up)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- locations and cache
def dataset_dir(out: str | os.PathLike, preset: str, cfg: ScenesConfig, seed: int) -> Path:
    """Folder of the data set for these parameters (see the module docstring)."""
    if preset in PRESETS and cfg == PRESETS[preset] and seed == 0:
        return Path(out) / preset
    return Path(out) / f"{preset}-{params_hash(cfg, seed)[:10]}"


def _required_files(cfg: ScenesConfig) -> list[str]:
    files = ["vocab.json", "binding_swapped_caps.txt", "binding_swaps.jsonl"]
    for split in SPLITS:
        files += [f"{split}_{s}" for s in ("ims.npy", "caps.txt", "ids.txt", "boxes.npy", "scenes.jsonl",
                                          "alignments.jsonl")]
    return files


def is_complete(path: str | os.PathLike, expected_hash: str | None = None) -> bool:
    """True if ``path`` holds a finished data set (``meta.json`` present, hash matching, files there)."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if expected_hash is not None and meta.get("hash") != expected_hash:
        return False
    return all((path / f).is_file() for f in meta.get("files", [])) and bool(meta.get("files"))


# ---------------------------------------------------------------------------- public entry points
def generate(preset: str = "demo", out: str | os.PathLike = "data/scenes", seed: int = 0, progress: bool = False,
             force: bool = False, **overrides: Any) -> Path:
    """Write (or reuse from cache) a Scenes data set and return its folder.

    Args:
        preset: ``"tiny"`` (tests), ``"demo"`` (quick start) or ``"full"`` (36 x 2048 features).
        out: parent folder; the data set goes to ``out/<preset>`` or ``out/<preset>-<hash10>``.
        seed: data seed (scenes, captions, regions, background textures).
        progress: show a tqdm progress bar.
        force: regenerate even if a matching data set exists.
        **overrides: any :class:`ScenesConfig` field, e.g. ``n_train=500``.

    Raises:
        ConfigError: unknown preset, unknown parameter (the message lists valid names) or bad value.
    """
    return generate_with_report(preset, out, seed, progress, force=force, **overrides).path


def generate_with_report(preset: str = "demo", out: str | os.PathLike = "data/scenes", seed: int = 0,
                         progress: bool = False, force: bool = False, **overrides: Any) -> GenerationReport:
    """Like :func:`generate`, but also returns whether the cache was used and per-stage timings."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    cfg = make_config(preset, **overrides)
    digest = params_hash(cfg, seed)
    final = dataset_dir(out, preset, cfg, seed)
    if not force and is_complete(final, digest):
        log.info("reusing cached Scenes data set at %s (hash %s)", final, digest[:10])
        meta = json.loads((final / "meta.json").read_text(encoding="utf-8"))
        return GenerationReport(final, True, {}, meta)

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    start = time.perf_counter()
    try:
        seconds, cpu, meta = _build(tmp, cfg, seed, preset, digest, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    t0 = time.perf_counter()
    old = None
    if final.exists():
        if not force and is_complete(final, digest):  # another process finished the same data set first
            shutil.rmtree(tmp, ignore_errors=True)
            return GenerationReport(final, True, {}, meta)
        old = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    seconds["place"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    log.info("wrote Scenes data set %s in %.1f s", final, seconds["total"])
    return GenerationReport(final, False, seconds, meta, cpu)


# ---------------------------------------------------------------------------- the build
@dataclass
class _Split:
    name: str
    scenes: list[Scene]
    captions: list[list[Caption]]  # 5 per image
    swaps: list[list[tuple[Caption, dict[str, Any]]]]  # binding split only
    boxes: np.ndarray  # (n, R, 4)
    kinds: list[list[str]]
    sources: list[list[list[int]]]


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch ops with ``n`` intra-op threads, restoring the caller's setting afterwards.

    Feature extraction runs single-threaded on purpose: (1) float results of CPU kernels may
    depend on the thread count, and a cached data set must be the same bytes for the same
    parameter hash on any machine; (2) on a busy 2-core machine, 2 spinning torch threads
    made extraction >10x slower, while 1 thread leaves the other core to PNG encoding.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Timer:
    """Wall-clock and CPU seconds (of the calling thread) per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t, c = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t
            self.cpu[name] += time.thread_time() - c


def _build(root: Path, cfg: ScenesConfig, seed: int, preset: str, digest: str,
           progress: bool) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Write every file of the data set into ``root``; returns per-stage wall and CPU seconds and the meta dict.

    Two threads share the work: the main thread samples scenes, captions and boxes, renders,
    and writes the text files; a background worker turns each rendered chunk into raw
    features and PNG files (torch and PIL release the GIL there), so both cores are busy.
    """
    timer = _Timer()
    bank = ShapeBank()
    renderer = Renderer(cfg.canvas, seed, bank)
    featurizer = RegionFeaturizer(FeatureSpec.from_config(cfg))
    use_patterns = cfg.striped_prob > 0
    stats = RunningStats(featurizer.spec.raw_dim)
    total = sum(cfg.n_images(s) for s in SPLITS)
    bar = tqdm(total=total, desc=f"scenes[{preset}]", unit="img", disable=not progress)
    splits: dict[str, _Split] = {}
    worker = _Worker(featurizer, bar)
    raws: list[np.memmap] = []
    token_check = _TokenCheck()
    try:
        with _torch_threads(1):
            for si, name in enumerate(SPLITS):
                bar.set_postfix_str(f"{name}: scenes+captions")
                with timer.stage("scenes+captions"):
                    split = _sample_split(name, cfg, seed, si, bank, use_patterns)
                with timer.stage("regions"):
                    _sample_split_regions(split, cfg, seed, si)
                bar.set_postfix_str(f"{name}: render")
                raws.append(_render_split(root, split, cfg, renderer, worker, stats if name == "train" else None,
                                          timer))
                with timer.stage("text"):
                    _write_split_text(root, split, token_check)
                splits[name] = split
            bar.set_postfix_str("vocab")
            with timer.stage("vocab"):
                vocab_info = _write_vocab(root, splits, cfg.vocab_min_count)
            bar.set_postfix_str("features")
            with timer.stage("wait_worker"):
                worker.wait()
                for raw in raws:
                    raw.flush()
                raws.clear()
            bar.set_postfix_str("project")
            with timer.stage("project"):
                mean, std = stats.mean_std()
                for name in SPLITS:
                    _project_split(root, name, featurizer, mean, std)
    finally:
        worker.close()
        bar.close()
    seconds = dict(timer.seconds)
    seconds.update({f"{k} (worker)": v for k, v in worker.timer.seconds.items()})
    cpu = dict(timer.cpu)
    cpu.update({f"{k} (worker)": v for k, v in worker.timer.cpu.items()})
    meta = {
        "generator": "thsrn_lib.data.scenes",
        "generator_version": GENERATOR_VERSION,
        "preset": preset,
        "seed": seed,
        "params": cfg.to_dict(),
        "hash": digest,
        "n_regions": cfg.n_regions,
        "feature_dim": cfg.feature_dim,
        "raw_feature_dim": featurizer.spec.raw_dim,
        "splits": {n: {"images": len(s.scenes), "captions": CAPTIONS_PER_IMAGE * len(s.scenes)}
                   for n, s in splits.items()},
        "vocab": vocab_info,
        "conventions": {
            "caption_to_image": "caption line k of {split}_caps.txt describes image k // 5",
            "boxes": "pixel x1, y1, x2, y2 with x2, y2 exclusive (a box covers pixels x1 <= x < x2)",
            "alignment_token": "'token' p indexes tokenize(caption); in model ids (which start with <start>) "
                               "the position is p + 1",
            "alignment_regions": "indices of the regions whose box has IoU >= 0.5 with the object's box",
            "binding": "binding_swapped_caps.txt line k is caption k of binding_caps.txt with one attribute "
                       "swapped between two objects; it is false for image k // 5",
        },
        "files": _required_files(cfg),
    }
    if hasattr(os, "sync"):
        os.sync()  # everything above reaches the disk before the completeness marker does
    atomic_write_json(root / "meta.json", meta)  # last: its presence marks the data set complete
    return seconds, cpu, meta


def _sample_split(name: str, cfg: ScenesConfig, seed: int, si: int, bank: ShapeBank, use_patterns: bool) -> _Split:
    scene_rng = np.random.default_rng([seed, si, 0])
    cap_rng = np.random.default_rng([seed, si, 1])
    scenes: list[Scene] = []
    captions: list[list[Caption]] = []
    swaps: list[list[tuple[Caption, dict[str, Any]]]] = []
    for i in range(cfg.n_images(name)):
        for _ in range(_MAX_SCENE_RESAMPLES):
            scene = sample_scene(scene_rng, cfg, bank)
            if name == "binding":
                res = binding_captions(cap_rng, scene, CAPTIONS_PER_IMAGE, use_patterns)
                if res is not None:
                    captions.append([c for c, _, _ in res])
                    swaps.append([(s, info) for _, s, info in res])
                    break
            else:
                caps = scene_captions(cap_rng, scene, CAPTIONS_PER_IMAGE, use_patterns)
                if caps is not None:
                    captions.append(caps)
                    break
        else:
            raise RuntimeError(
                f"{name} image {i}: no scene with {CAPTIONS_PER_IMAGE} distinct captions in {_MAX_SCENE_RESAMPLES} "
                "samples; allow more objects (max_objects) or patterns (striped_prob)"
            )
        scenes.append(scene)
    return _Split(name, scenes, captions, swaps, np.zeros((0, cfg.n_regions, 4), np.float32), [], [])


def _sample_split_regions(split: _Split, cfg: ScenesConfig, seed: int, si: int) -> None:
    rng = np.random.default_rng([seed, si, 2])
    boxes = np.empty((len(split.scenes), cfg.n_regions, 4), dtype=np.float32)
    for i, scene in enumerate(split.scenes):
        boxes[i], kinds, sources = sample_regions(rng, scene.boxes(), cfg.canvas, cfg.n_regions, cfg.region_jitter,
                                                  cfg.part_fraction, cfg.pair_fraction)
        split.kinds.append(kinds)
        split.sources.append(sources)
    split.boxes = boxes


def _image_id(split: str, i: int) -> str:
    return f"{split}_{i:06d}"


class _Worker:
    """Two background threads: one turns rendered chunks into raw features, one writes PNGs.

    torch and PIL release the GIL in their kernels, so these run beside the main thread's
    Python work (scene sampling, captions, rendering, text files) and the OS spreads the three
    over the cores. Features are computed in submission order by a single thread, so the
    train statistics accumulate in a fixed order (deterministic). At most two chunks wait,
    which bounds memory. ``timer`` holds the workers' own busy times.
    """

    def __init__(self, featurizer: RegionFeaturizer, bar: tqdm) -> None:
        self.featurizer = featurizer
        self.bar = bar
        self.timer = _Timer()  # each stage name is only ever timed by its own worker thread
        self._features = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scenes-features")
        self._png = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scenes-png")
        self._pending: deque[tuple[Future, Future, int]] = deque()

    def submit(self, raw: np.ndarray, start: int, images: np.ndarray, boxes: np.ndarray,
               stats: RunningStats | None, paths: list[Path]) -> None:
        while len(self._pending) >= 2:
            self._wait_one()
        self._pending.append((self._features.submit(self._featurise, raw, start, images, boxes, stats),
                              self._png.submit(self._write_pngs, paths, images), len(images)))

    def _featurise(self, raw: np.ndarray, start: int, images: np.ndarray, boxes: np.ndarray,
                   stats: RunningStats | None) -> None:
        with self.timer.stage("features"):
            feats = self.featurizer.raw(images, boxes)
            raw[start:start + len(images)] = feats
            if stats is not None:
                stats.update(feats.reshape(-1, feats.shape[-1]))

    def _write_pngs(self, paths: list[Path], images: np.ndarray) -> None:
        with self.timer.stage("png"):
            for path, img in zip(paths, images):
                _save_png(path, img)

    def _wait_one(self) -> None:
        features, png, n_images = self._pending.popleft()
        features.result()  # re-raises a worker error here
        png.result()
        self.bar.update(n_images)

    def wait(self) -> None:
        while self._pending:
            self._wait_one()

    def close(self) -> None:
        self._features.shutdown(wait=True, cancel_futures=True)
        self._png.shutdown(wait=True, cancel_futures=True)


def _render_split(root: Path, split: _Split, cfg: ScenesConfig, renderer: Renderer, worker: _Worker,
                  stats: RunningStats | None, timer: _Timer) -> np.memmap:
    """Render ``split`` chunk by chunk and hand each chunk to the worker; returns the raw-feature
    memmap the worker fills (flush it once the worker is done)."""
    n = len(split.scenes)
    img_dir = root / "images" / split.name
    img_dir.mkdir(parents=True, exist_ok=True)
    # Raw features go to a scratch .npy inside the temporary folder (deleted after projection),
    # so memory stays bounded even for the full preset.
    raw = np.lib.format.open_memmap(root / f".raw_{split.name}.npy", mode="w+", dtype=np.float32,
                                    shape=(n, cfg.n_regions, worker.featurizer.spec.raw_dim))
    for start in range(0, n, _IMAGES_PER_CHUNK):
        stop = min(n, start + _IMAGES_PER_CHUNK)
        with timer.stage("render"):
            images = renderer.render_batch(split.scenes[start:stop])
        with timer.stage("wait_worker"):
            worker.submit(raw, start, images, split.boxes[start:stop], stats,
                          [img_dir / f"{_image_id(split.name, i)}.png" for i in range(start, stop)])
    return raw


def _save_png(path: Path, image: np.ndarray) -> None:
    # Inside the temporary folder the folder rename is what makes the data set appear, so no
    # per-file temporary name; durability comes from one os.sync() before meta.json (an
    # fsync per image cost 2-8 ms each here, as much as encoding the PNG).
    with open(path, "wb") as fh:
        fh.write(encode_png(image))


def _project_split(root: Path, name: str, featurizer: RegionFeaturizer, mean: np.ndarray, std: np.ndarray) -> None:
    raw_path = root / f".raw_{name}.npy"
    raw = np.load(raw_path, mmap_mode="r")
    out_path = root / f"{name}_ims.npy"
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32,
                                    shape=(*raw.shape[:2], featurizer.spec.feature_dim))
    step = 1024
    for start in range(0, raw.shape[0], step):
        out[start:start + step] = featurizer.project(raw[start:start + step], mean, std)
    out.flush()
    del out, raw
    os.unlink(raw_path)


_WORD = re.compile(r"[a-z]+")
_FULL_CHECK_IMAGES = 5  # captions of the first images of each split are also tokenized in full


class _TokenCheck:
    """Checks that ``tokenize(caption)`` equals the grammar's own tokens (alignment positions rely on it).

    Tokenizing every caption with NLTK was the slowest part of writing the text files, so the
    check is done by argument plus spot checks: a caption is lower-case ASCII words joined by
    single spaces, with "," glued to a word before a space and "." glued to the last word. On
    such a string the Treebank tokenizer only splits off the commas and the final period, and
    its word-level rules (contractions such as "cannot") depend on the word alone. So the check
    verifies that structure for every caption, runs the real tokenizer once on every distinct
    word in those contexts, and tokenizes the first captions of every split in full.
    """

    def __init__(self) -> None:
        self.words: set[str] = set()

    def __call__(self, cap: Caption, full: bool = False) -> list[str]:
        toks = [t.text for t in cap.tokens]
        words = [t for t in toks if t not in (",", ".")]
        ok = (len(toks) >= 2 and toks[-1] == "." and "." not in toks[:-1] and toks[0] != ","
              and all(a != "," or (b != "," and b != ".") for a, b in zip(toks, toks[1:]))
              and all(_WORD.fullmatch(w) for w in words))
        if ok:
            for w in set(words) - self.words:
                ok = ok and tokenize(f"{w} {w}, {w}.") == [w, w, ",", w, "."]
                self.words.add(w)
        if ok and full:
            ok = tokenize(cap.text) == toks
        if not ok:
            raise RuntimeError(f"caption {cap.text!r} does not tokenize to its grammar tokens {toks} "
                               f"(tokenize gives {tokenize(cap.text)}); the caption grammar has a bug")
        return toks


def _alignment_record(k: int, i: int, cap: Caption, tokens: list[str], match: np.ndarray) -> dict[str, Any]:
    """One line of ``{split}_alignments.jsonl``; ``match`` is bool ``(R, n_objects)`` (IoU >= 0.5)."""
    align = []
    for p, tok in enumerate(cap.tokens):
        if tok.type is None:
            continue
        for obj in tok.objects:
            align.append({"token": p, "word": tok.text, "type": tok.type, "object": int(obj),
                          "regions": [int(r) for r in np.nonzero(match[:, obj])[0]],
                          "in_relation": tok.in_relation})
    return {"caption": k, "image": i, "text": cap.text, "tokens": tokens, "align": align,
            "relations": cap.relations, "meaning": cap.meaning}


def _write_lines(path: Path, lines: list[str]) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("".join(line + "\n" for line in lines))


def _write_split_text(root: Path, split: _Split, check: _TokenCheck) -> None:
    name = split.name
    ids = [_image_id(name, i) for i in range(len(split.scenes))]
    caps: list[str] = []
    aligns: list[str] = []
    scenes: list[str] = []
    for i, (scene, caption_list) in enumerate(zip(split.scenes, split.captions)):
        match = box_iou(split.boxes[i], scene.boxes()) >= 0.5  # (R, n_objects)
        rec = {"image": i, "id": ids[i], **scene.to_record(),
               "regions": {"kinds": split.kinds[i], "sources": split.sources[i]}}
        scenes.append(json.dumps(rec))
        for j, cap in enumerate(caption_list):
            k = CAPTIONS_PER_IMAGE * i + j
            caps.append(cap.text)
            tokens = check(cap, full=i < _FULL_CHECK_IMAGES)
            aligns.append(json.dumps(_alignment_record(k, i, cap, tokens, match)))
    _write_lines(root / f"{name}_caps.txt", caps)
    _write_lines(root / f"{name}_ids.txt", ids)
    _write_lines(root / f"{name}_scenes.jsonl", scenes)
    _write_lines(root / f"{name}_alignments.jsonl", aligns)
    atomic_save_npy(root / f"{name}_boxes.npy", split.boxes.astype(np.float32))
    if name == "binding":
        swapped, infos = [], []
        for i, triples in enumerate(split.swaps):
            for j, (cap, info) in enumerate(triples):
                k = CAPTIONS_PER_IMAGE * i + j
                check(cap, full=i < _FULL_CHECK_IMAGES)
                swapped.append(cap.text)
                infos.append(json.dumps({"caption": k, "image": i, "original": split.captions[i][j].text,
                                         "swapped": cap.text, **info}))
        _write_lines(root / "binding_swapped_caps.txt", swapped)
        _write_lines(root / "binding_swaps.jsonl", infos)


def _write_vocab(root: Path, splits: dict[str, _Split], min_count: int) -> dict[str, Any]:
    texts = [c.text for name in ("train", "dev") for caps in splits[name].captions for c in caps]
    vocab = Vocab.build(texts, min_count=min_count)
    vocab.save(root / "vocab.json")
    train_unk = sum(tok.text not in vocab for caps in splits["train"].captions for c in caps for tok in c.tokens)
    return {"size": len(vocab), "min_count": min_count, "train_unk_tokens": int(train_unk)}
