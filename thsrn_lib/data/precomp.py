"""The SCAN "precomp" data format: region features + 5 captions per image.

One split of a data set is a folder ``root`` holding

* ``{split}_caps.txt``  one caption per line, UTF-8; lines ``5i .. 5i+4`` describe image ``i``;
* ``{split}_ims.npy``   float ``(rows, R, D)`` region features (36 x 2048 for the real data);

and optionally ``{split}_ids.txt`` (one image id per row), ``{split}_boxes.npy``
(``(images, R, 4)`` pixel boxes), ``{split}_alignments.jsonl`` (one JSON object per caption)
and ``images/{split}/{id}.png``. The same reader serves Flickr30K, MS-COCO and Scenes.

Row <-> caption mapping (``im_div``): the features are stored either once per image
(``rows * 5 == captions``, ``im_div = 5``) or once per caption as 5 identical copies
(``rows == captions``, ``im_div = 1``; Flickr30K dev has 5,070 such rows). Any other pair of
counts is rejected. Caption ``k`` always belongs to logical image ``k // 5``; logical image
``i`` is read from row ``i`` (``im_div = 5``) or row ``5 i`` (``im_div = 1``), so every image
is read and encoded once.

Feature files are memory-mapped (``np.load(mmap_mode='r')``); items copy out one image.
"""
from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from thsrn_lib.data.vocab import Vocab
from thsrn_lib.errors import ConfigError, DataError

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "DEV_CAPTION_CAP",
    "PrecompDataset",
    "Sample",
    "Batch",
    "TextBatch",
    "ImageBatch",
    "collate",
    "collate_texts",
    "collate_images",
    "validate_precomp",
    "find_vocab",
    "read_caption_file",
]

CAPTIONS_PER_IMAGE = 5
# The official loaders force the dev split to its first 5,000 captions (1,000 images).
DEV_CAPTION_CAP = 5000
# Upper bound on the bytes read per step of the NaN/inf scan (keeps memory bounded on 30 GB files).
_FINITE_SCAN_BYTES = 64 * 2**20
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

_FEATURES_HELP = (
    "The SCAN precomp features (Flickr30K, MS-COCO) are not bundled: download the Kaggle data set "
    "kuanghueilee/scan-features (https://www.kaggle.com/datasets/kuanghueilee/scan-features) and unpack "
    "it so that <root>/{split}_ims.npy and <root>/{split}_caps.txt exist; or generate the built-in "
    "benchmark with `thsrn scenes --preset demo --out data/scenes`."
)

# Line ends recognised in text files: the same as bytes.splitlines(). str.splitlines() would also
# split at U+2028, U+0085, form feeds etc., which would silently shift the 5-per-image grouping.
_LINE_END = re.compile(r"\r\n|\r|\n")


# ---------------------------------------------------------------------------------------- files
def read_caption_file(path: str | os.PathLike, what: str = "caption file") -> list[str]:
    """Read a UTF-8 text file as stripped lines; every line must be non-empty.

    Lines end at ``\\n``, ``\\r\\n`` or ``\\r``; a missing final newline is fine (Flickr30K's
    ``test_caps.txt`` has none). Raises :class:`DataError` naming the file and the 1-based line
    for undecodable bytes or an empty line.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = len(data[: exc.start].splitlines()) or 1
        if data[: exc.start].endswith((b"\n", b"\r")):
            line_no += 1
        raise DataError(
            f"{what} {path}: line {line_no} is not valid UTF-8 (byte offset {exc.start}: {exc.reason}); "
            "re-save the file as UTF-8"
        ) from exc
    lines = _LINE_END.split(text.removeprefix("\ufeff"))  # a byte-order mark is not part of caption 1
    if lines and lines[-1] == "":  # the final line end terminates the last line, it does not open a new one
        lines.pop()
    lines = [line.strip() for line in lines]
    empty = [i for i, line in enumerate(lines) if not line]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataError(
            f"{what} {path}: line {empty[0] + 1} is empty{more}; every line must hold one caption/id "
            "(remove blank lines, keeping 5 consecutive captions per image)"
        )
    if not lines:
        raise DataError(f"{what} {path} is empty")
    return lines


def _split_files(root: Path, split: str) -> tuple[Path, Path]:
    if not isinstance(split, str) or not split or any(c in split for c in "/\\"):
        raise ConfigError(f"split must be a plain name such as 'train', 'dev', 'test' or 'testall', got {split!r}")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist. " + _FEATURES_HELP.format(split=split))
    caps, ims = root / f"{split}_caps.txt", root / f"{split}_ims.npy"
    for path, kind in ((caps, "captions"), (ims, "features")):
        if not path.is_file():
            found = sorted(p.name[: -len("_caps.txt")] for p in root.glob("*_caps.txt"))
            have = f" Splits with captions in {root}: {found}." if found else ""
            raise DataError(f"{kind} file {path} not found.{have} " + _FEATURES_HELP.format(split=split))
    return caps, ims


def _open_features(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"features file {path} cannot be read as a .npy array ({exc}); re-download or regenerate it") from exc
    if not isinstance(arr, np.ndarray):
        raise DataError(f"features file {path} is not a single .npy array (an .npz archive?)")
    if arr.ndim != 3:
        raise DataError(
            f"features file {path} has shape {arr.shape}; expected 3-D (rows, regions, dim), e.g. (N, 36, 2048)"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"features file {path} has dtype {arr.dtype}; expected float32 (or another float type)")
    if 0 in arr.shape:
        raise DataError(f"features file {path} has an empty dimension: shape {arr.shape}")
    return arr


def _im_div(rows: int, n_lines: int, ims: Path, caps: Path) -> int:
    if rows == n_lines:
        return 1
    if rows * CAPTIONS_PER_IMAGE == n_lines:
        return CAPTIONS_PER_IMAGE
    raise DataError(
        f"{ims} has {rows} rows but {caps} has {n_lines} captions; expected rows == captions "
        f"(features stored per caption) or rows * {CAPTIONS_PER_IMAGE} == captions (stored per image). "
        "Check that both files come from the same split and that no caption lines were added or lost."
    )


def _resolve_cap(max_captions: int | str | None, split: str) -> int | None:
    if max_captions == "auto":
        return DEV_CAPTION_CAP if split == "dev" else None
    if max_captions is None:
        return None
    if (
        isinstance(max_captions, bool)
        or not isinstance(max_captions, int)
        or max_captions <= 0
        or max_captions % CAPTIONS_PER_IMAGE
    ):
        raise ConfigError(
            f"max_captions must be 'auto', None or a positive multiple of {CAPTIONS_PER_IMAGE}, got {max_captions!r}"
        )
    return max_captions


def _check_finite(features: np.ndarray, n_images: int, step: int, path: Path) -> None:
    """Raise on the first used row holding NaN/inf, reading at most ~64 MiB at a time."""
    per_image = features.shape[1] * features.shape[2] * features.dtype.itemsize
    chunk = max(1, _FINITE_SCAN_BYTES // per_image)
    for start in range(0, n_images, chunk):
        stop = min(n_images, start + chunk)
        block = features[start * step : stop * step : step]
        # A float64 sum of finite float32 values cannot overflow, so a non-finite sum flags
        # exactly the rows with NaN/inf; the elementwise test runs only to confirm (float64 input).
        sums = block.sum(axis=(1, 2), dtype=np.float64)
        if np.isfinite(sums).all():
            continue
        bad = np.flatnonzero(~np.isfinite(block).all(axis=(1, 2)))
        if bad.size:
            image = start + int(bad[0])
            raise DataError(
                f"features file {path}: row {image * step} (image {image}) contains NaN or inf; "
                "the features are corrupt: re-extract or re-download them "
                "(or pass check_finite='none' to skip this scan at your own risk)"
            )


def _kept_rows(count: int, rows: int, full_images: int, step: int, n_images: int) -> np.ndarray | None:
    """Indices of the entries of a per-row or per-image side file that belong to the kept images."""
    if count == rows:
        return np.arange(n_images) * step
    if count == full_images:
        return np.arange(n_images)
    return None


# ---------------------------------------------------------------------------------------- items
class Sample(NamedTuple):
    """One caption with its image.

    features: ``(R, D)`` float32; ids: ``(n,)`` int64 with ``<start>``/``<end>``.
    """

    features: torch.Tensor
    ids: torch.Tensor
    caption_index: int
    image_index: int


class _TensorFields:
    """``.to()`` / ``.pin_memory()`` over every tensor field of a dataclass."""

    def to(self, device: torch.device | str, non_blocking: bool = False):
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self):
        # Called by DataLoader(pin_memory=True) on custom batch types.
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


@dataclass
class Batch(_TensorFields):
    """A training/validation batch of (caption, image) pairs, sorted by caption length (descending).

    images: ``(b, R, D)`` float32; ids: ``(b, L)`` int64 padded with 0 (``<pad>``);
    lengths: ``(b,)`` int64 counting ``<start>``/``<end>``; mask: ``(b, L)`` bool, True on real
    tokens; caption_index, image_index: ``(b,)`` int64. The same image may appear twice (through
    two of its captions); each copy is then a negative for the other's caption, as in SCAN/SGRAF.
    """

    images: torch.Tensor
    ids: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    caption_index: torch.Tensor
    image_index: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass
class TextBatch(_TensorFields):
    """Captions only, in input order. ids/mask: ``(b, L)``; lengths, caption_index: ``(b,)``."""

    ids: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    caption_index: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass
class ImageBatch(_TensorFields):
    """Images only, in input order. images: ``(b, R, D)`` float32; image_index: ``(b,)`` int64."""

    images: torch.Tensor
    image_index: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def _pad_ids(seqs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in seqs]
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.long)
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=Vocab.PAD)
    mask = torch.arange(ids.shape[1]) < lengths[:, None]
    return ids, lengths, mask


def collate(samples: Sequence[Sample | tuple]) -> Batch:
    """Stack ``(features, ids, caption_index, image_index)`` items into a :class:`Batch`.

    Items are sorted by caption length, longest first (stable for equal lengths), as the official
    loader does for packed GRUs.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    ordered = sorted(samples, key=lambda s: len(s[1]), reverse=True)  # Python's sort stays stable with reverse
    feats, ids, cap_idx, img_idx = zip(*ordered)
    ids_t, lengths, mask = _pad_ids(ids)
    return Batch(
        images=torch.stack([torch.as_tensor(f, dtype=torch.float32) for f in feats]),
        ids=ids_t,
        lengths=lengths,
        mask=mask,
        caption_index=torch.tensor(cap_idx, dtype=torch.long),
        image_index=torch.tensor(img_idx, dtype=torch.long),
    )


def collate_texts(items: Sequence[tuple[Any, int]]) -> TextBatch:
    """Pad ``(ids, caption_index)`` items into a :class:`TextBatch`, keeping their order."""
    if not items:
        raise ValueError("collate_texts needs at least one item")
    ids, cap_idx = zip(*items)
    ids_t, lengths, mask = _pad_ids(ids)
    return TextBatch(ids=ids_t, lengths=lengths, mask=mask, caption_index=torch.tensor(cap_idx, dtype=torch.long))


def collate_images(items: Sequence[tuple[Any, int]]) -> ImageBatch:
    """Stack ``(features, image_index)`` items into an :class:`ImageBatch`, keeping their order."""
    if not items:
        raise ValueError("collate_images needs at least one item")
    feats, img_idx = zip(*items)
    return ImageBatch(
        images=torch.stack([torch.as_tensor(f, dtype=torch.float32) for f in feats]),
        image_index=torch.tensor(img_idx, dtype=torch.long),
    )


# ---------------------------------------------------------------------------------------- dataset
class PrecompDataset(Dataset):
    """One split of a SCAN-precomp data set; an item is one caption with its image.

    Args:
        root: the folder with ``{split}_caps.txt`` and ``{split}_ims.npy``.
        split: e.g. ``"train"``, ``"dev"``, ``"test"``, ``"testall"``.
        vocab: a :class:`Vocab`, a path to a vocab JSON, or None (captions stay available as
            strings; :meth:`caption_ids` and items then raise). See :func:`find_vocab`.
        max_captions: ``"auto"`` keeps the first 5,000 captions of ``dev`` (the official
            validation cap: F30K dev loses its last 70 captions) and all of other splits; None
            keeps all; an int (a multiple of 5) keeps that prefix. Never more than the file has.
        check_finite: ``"full"`` scans every used feature row for NaN/inf when the dataset is
            built. That reads the used part of the file once (about 0.3 GB for F30K test,
            1.5 GB for COCO testall, 33 GB for COCO train: seconds to minutes, disk-bound) in
            chunks of at most 64 MiB. ``"none"`` skips it (e.g. after :func:`validate_precomp`).
        image_dir: folder with the raw images named ``{id}.png`` (or .jpg/.jpeg); defaults to
            ``root/images/{split}``.

    Attributes:
        captions: the kept captions (stripped strings); n_captions, n_images (= n_captions / 5);
        im_div: 1 (rows stored per caption) or 5 (per image); features: the memory-mapped
        ``(rows, R, D)`` array (all rows of the file); num_regions (R), feature_dim (D);
        boxes: ``(n_images, R, 4)`` float32 or None; image_ids: ``list[str]`` (one per kept
        image) or None.
    """

    captions_per_image = CAPTIONS_PER_IMAGE

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        vocab: Vocab | str | os.PathLike | None,
        max_captions: int | Literal["auto"] | None = "auto",
        check_finite: Literal["full", "none"] = "full",
        image_dir: str | os.PathLike | None = None,
    ) -> None:
        if check_finite not in ("full", "none"):
            raise ConfigError(f"check_finite must be 'full' or 'none', got {check_finite!r}")
        self.root = Path(root)
        self.split = split
        self.caps_path, self.ims_path = _split_files(self.root, split)
        lines = read_caption_file(self.caps_path, "caption file")
        self.features = _open_features(self.ims_path)
        rows = int(self.features.shape[0])
        # As in the official loader, im_div comes from the full files, before the dev cap.
        self.im_div = _im_div(rows, len(lines), self.ims_path, self.caps_path)
        self._row_step = CAPTIONS_PER_IMAGE if self.im_div == 1 else 1

        cap = _resolve_cap(max_captions, split)
        self.max_captions = cap
        n = len(lines) if cap is None else min(cap, len(lines))
        if n % CAPTIONS_PER_IMAGE:
            raise DataError(
                f"caption file {self.caps_path} has {n} captions (after the cap of {cap}), not a multiple of "
                f"{CAPTIONS_PER_IMAGE}; every image needs exactly {CAPTIONS_PER_IMAGE} consecutive captions"
            )
        self.captions: list[str] = lines[:n]
        self.n_captions = n
        self.n_images = n // CAPTIONS_PER_IMAGE
        self.num_regions = int(self.features.shape[1])
        self.feature_dim = int(self.features.shape[2])
        if check_finite == "full":
            _check_finite(self.features, self.n_images, self._row_step, self.ims_path)

        full_images = len(lines) // CAPTIONS_PER_IMAGE
        self.image_ids = self._load_ids(rows, full_images)
        self.boxes = self._load_boxes(rows, full_images)
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / "images" / split
        self.alignments_path = self.root / f"{split}_alignments.jsonl"
        self._alignments: list[dict] | None = None
        self._n_lines = len(lines)

        if vocab is not None and not isinstance(vocab, Vocab):
            vocab = Vocab.load(vocab)
        self.vocab: Vocab | None = vocab
        self._ids_cache: list[np.ndarray | None] = [None] * n

    # ---- optional side files
    def _load_ids(self, rows: int, full_images: int) -> list[str] | None:
        path = self.root / f"{self.split}_ids.txt"
        if not path.is_file():
            return None
        ids = read_caption_file(path, "image-id file")
        keep = _kept_rows(len(ids), rows, full_images, self._row_step, self.n_images)
        if keep is None:
            raise DataError(
                f"image-id file {path} has {len(ids)} lines but {self.ims_path} has {rows} rows "
                f"({full_images} images); it needs one id per row or per image (or delete it: ids are optional)"
            )
        return [ids[i] for i in keep.tolist()]

    def _load_boxes(self, rows: int, full_images: int) -> np.ndarray | None:
        path = self.root / f"{self.split}_boxes.npy"
        if not path.is_file():
            return None
        try:
            boxes = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"box file {path} cannot be read as a .npy array ({exc})") from exc
        expected = f"(images or rows, {self.num_regions}, 4)"
        if (
            not isinstance(boxes, np.ndarray)
            or boxes.ndim != 3
            or boxes.shape[1:] != (self.num_regions, 4)
            or not np.issubdtype(boxes.dtype, np.number)
        ):
            raise DataError(
                f"box file {path} has shape {getattr(boxes, 'shape', None)}; expected {expected} with pixel "
                "x1, y1, x2, y2 per region (or delete it: boxes are optional)"
            )
        keep = _kept_rows(boxes.shape[0], rows, full_images, self._row_step, self.n_images)
        if keep is None:
            raise DataError(
                f"box file {path} has {boxes.shape[0]} entries but {self.ims_path} has {rows} rows "
                f"({full_images} images); expected shape {expected}"
            )
        out = np.asarray(boxes[keep], dtype=np.float32)
        if not np.isfinite(out).all():
            raise DataError(f"box file {path} contains NaN or inf")
        return out

    def alignments(self) -> list[dict] | None:
        """Per-caption word-to-region alignments from ``{split}_alignments.jsonl`` (Scenes), or None.

        One JSON object per caption line of the file; returned for the kept captions, cached.
        """
        if self._alignments is None:
            if not self.alignments_path.is_file():
                return None
            lines = read_caption_file(self.alignments_path, "alignment file")
            if len(lines) != self._n_lines:
                raise DataError(
                    f"alignment file {self.alignments_path} has {len(lines)} lines but {self.caps_path} has "
                    f"{self._n_lines} captions; it needs one JSON object per caption"
                )
            out = []
            for i, line in enumerate(lines[: self.n_captions]):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"alignment file {self.alignments_path}: line {i + 1} is not valid JSON ({exc})") from exc
                if not isinstance(obj, dict):
                    raise DataError(f"alignment file {self.alignments_path}: line {i + 1} is not a JSON object")
                out.append(obj)
            self._alignments = out
        return self._alignments

    # ---- images
    def _check_image(self, i: int) -> int:
        i = operator.index(i)
        if not 0 <= i < self.n_images:
            raise IndexError(f"image index {i} out of range for {self.n_images} images")
        return i

    def image_row(self, i: int) -> int:
        """The row of ``features`` holding logical image ``i`` (``5 i`` when stored per caption)."""
        return self._check_image(i) * self._row_step

    def image_features(self, i: int) -> np.ndarray:
        """``(R, D)`` float32 copy of image ``i``'s region features."""
        return np.array(self.features[self.image_row(i)], dtype=np.float32)

    def image_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(b, R, D)`` float32 tensor with the features of the given logical images."""
        idx = np.asarray(indices.tolist() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_images):
            raise IndexError(f"image indices must lie in [0, {self.n_images}), got min {idx.min()}, max {idx.max()}")
        rows = idx * self._row_step
        return torch.from_numpy(np.array(self.features[rows], dtype=np.float32))

    def image_path(self, i: int) -> Path | None:
        """The raw image file of image ``i`` (``image_dir/{id}.png|.jpg|.jpeg``) if ids are known and it exists."""
        i = self._check_image(i)
        if self.image_ids is None:
            return None
        name = self.image_ids[i]
        candidates = [self.image_dir / name] if Path(name).suffix.lower() in _IMAGE_SUFFIXES else []
        candidates += [self.image_dir / f"{name}{suffix}" for suffix in _IMAGE_SUFFIXES]
        return next((p for p in candidates if p.is_file()), None)

    # ---- captions
    def _check_caption(self, k: int) -> int:
        k = operator.index(k)
        if not 0 <= k < self.n_captions:
            raise IndexError(f"caption index {k} out of range for {self.n_captions} captions")
        return k

    def _ids_array(self, k: int) -> np.ndarray:
        k = self._check_caption(k)
        cached = self._ids_cache[k]
        if cached is None:
            if self.vocab is None:
                raise DataError(
                    f"dataset {self.root} ({self.split}) has no vocab; pass vocab=Vocab.load(find_vocab(root)) "
                    "or a vocab JSON path"
                )
            cached = np.asarray(self.vocab.encode(self.captions[k]), dtype=np.int64)
            self._ids_cache[k] = cached
        return cached

    def caption_ids(self, k: int) -> list[int]:
        """Token ids of caption ``k`` with ``<start>``/``<end>`` (tokenized once, then cached)."""
        return self._ids_array(k).tolist()

    def encode_all(self) -> None:
        """Tokenize every kept caption now (about 0.2 ms each with nltk 3.10).

        Call it before creating a DataLoader with workers: forked workers inherit the filled
        cache, whereas a lazily filled cache lives per worker and is lost when workers restart
        at each epoch (``persistent_workers=False``).
        """
        for k in range(self.n_captions):
            self._ids_array(k)

    # ---- torch Dataset protocol
    def __len__(self) -> int:
        return self.n_captions

    def __getitem__(self, k: int) -> Sample:
        ids = torch.from_numpy(self._ids_array(k).copy())  # a copy: callers may modify it in place
        k = operator.index(k)
        image = k // CAPTIONS_PER_IMAGE
        return Sample(torch.from_numpy(self.image_features(image)), ids, k, image)

    def images(self) -> PrecompImages:
        """A Dataset over logical images, ``(features (R, D), image_index)``: each image once."""
        return PrecompImages(self)

    def texts(self) -> PrecompTexts:
        """A Dataset over captions, ``(ids (n,), caption_index)``, in file order."""
        return PrecompTexts(self)

    # Memory maps do not pickle by reference (they would be copied whole); DataLoader workers
    # started with 'spawn' get the path and reopen the file instead.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["features"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.features = _open_features(self.ims_path)

    def __repr__(self) -> str:
        return (
            f"PrecompDataset(root={str(self.root)!r}, split={self.split!r}, captions={self.n_captions}, "
            f"images={self.n_images}, im_div={self.im_div}, regions={self.num_regions}, dim={self.feature_dim})"
        )


class PrecompImages(Dataset):
    """Logical images of a :class:`PrecompDataset`; item ``i`` is ``(features (R, D), i)``."""

    def __init__(self, dataset: PrecompDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.n_images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.dataset.image_features(i)), operator.index(i)


class PrecompTexts(Dataset):
    """Captions of a :class:`PrecompDataset`; item ``k`` is ``(ids (n,) int64, k)``."""

    def __init__(self, dataset: PrecompDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.n_captions

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.dataset._ids_array(k).copy()), operator.index(k)


# ---------------------------------------------------------------------------------------- helpers
def find_vocab(root: str | os.PathLike, data_name: str | None = None) -> Path:
    """Locate the vocab JSON for a data folder.

    Tries, in order: ``root/vocab.json`` (Scenes), ``root/{data_name}_vocab.json`` and
    ``root/../vocab/{data_name}_vocab.json`` (the SCAN/SGRAF layout). ``data_name`` defaults to
    the folder name of ``root`` (e.g. ``f30k_precomp``).
    """
    root = Path(root)
    name = data_name or root.resolve().name
    candidates = [root / "vocab.json", root / f"{name}_vocab.json", root.parent / "vocab" / f"{name}_vocab.json"]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise DataError(
        f"no vocab JSON found for {root} (tried {tried}); copy the official <data_name>_vocab.json from the "
        "SCAN/SGRAF repository's vocab/ folder there, or build one with Vocab.build(...).save(path)"
    )


def validate_precomp(
    root: str | os.PathLike,
    split: str,
    max_captions: int | Literal["auto"] | None = "auto",
    check_finite: Literal["full", "none"] = "full",
) -> dict[str, Any]:
    """Check one split (files, counts, im_div, NaN/inf, optional side files, vocab) and summarise it.

    Raises :class:`DataError` naming the file and the fix on the first problem. The vocab is
    optional here: when :func:`find_vocab` finds one it is loaded (so a malformed one fails).
    """
    ds = PrecompDataset(root, split, vocab=None, max_captions=max_captions, check_finite=check_finite)
    alignments = ds.alignments()
    try:
        vocab_path: Path | None = find_vocab(ds.root)
    except DataError:
        vocab_path = None
    vocab = Vocab.load(vocab_path) if vocab_path is not None else None
    return {
        "root": str(ds.root),
        "split": split,
        "caption_lines": ds._n_lines,
        "rows": int(ds.features.shape[0]),
        "im_div": ds.im_div,
        "max_captions": ds.max_captions,
        "n_captions": ds.n_captions,
        "n_images": ds.n_images,
        "dropped_captions": ds._n_lines - ds.n_captions,
        "num_regions": ds.num_regions,
        "feature_dim": ds.feature_dim,
        "dtype": str(ds.features.dtype),
        "checked_finite": check_finite == "full",
        "has_ids": ds.image_ids is not None,
        "has_boxes": ds.boxes is not None,
        "has_alignments": alignments is not None,
        "vocab": str(vocab_path) if vocab_path is not None else None,
        "vocab_size": len(vocab) if vocab is not None else None,
    }
