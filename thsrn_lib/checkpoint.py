"""Checkpoint files: the one place where they are written and read.

A checkpoint is a ``torch.save`` file holding only plain data (dicts, lists, strings, numbers,
tensors), so it loads with ``torch.load(weights_only=True)``: opening a file from elsewhere
cannot run code. Two forms share the same model keys:

``"thsrn-model"`` (everything needed to rebuild the model, e.g. a converted official checkpoint)::

    {"format": "thsrn-model", "format_version": 1, "model_name": "sgr",
     "config": {...model config...}, "state_dict": {...}, "vocab": {...SCAN vocab dict...} | None}

``"thsrn-checkpoint"`` (a training checkpoint) adds what exact resumption needs::

    "optimizer", "scheduler", "scaler"   state dicts
    "rng"                                list (one entry per training process) of RNG states
    "epoch", "batch_in_epoch", "step"    where training stands (batches of ``epoch`` already done)
    "best_rsum", "best_epoch", "metrics" model selection so far and the latest validation
    "train_config", "world_size", "library_version", "created"

Writes are atomic (temporary file, fsync, rename, fsync of the folder): a run killed at any
moment leaves either the previous checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import CheckpointError, ConfigError
from .utils.io import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FORMAT",
    "FORMAT_VERSION",
    "LoadedModel",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "model_payload",
    "resolve_checkpoint",
]

CHECKPOINT_FORMAT = "thsrn-checkpoint"
MODEL_FORMAT = "thsrn-model"
FORMAT_VERSION = 1
_FORMATS = (CHECKPOINT_FORMAT, MODEL_FORMAT)
_MODEL_KEYS = ("model_name", "config", "state_dict")
_SAFE_SCALARS = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)

_CONVERT_HINT = (
    "if it is an official SGRAF checkpoint (model_best.pth.tar, which pickles an argparse.Namespace), "
    "convert it once with thsrn_lib.models.sgraf.convert_official_checkpoint(path, out_path) and load the "
    "converted file"
)


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, ready for inference.

    Attributes:
        model: the :class:`~thsrn_lib.models.MatchingModel`, in eval mode, on the requested device.
        vocab: the :class:`~thsrn_lib.data.Vocab` it was trained with, or None if the file has none.
        model_name: registry name (``"tshsr"``, ``"sgr"``, ...).
        config: the model config as plain data (``create(model_name, **config)`` rebuilds it).
        info: everything else worth showing: path, format, epoch, step, best_rsum, train_config ...
    """

    model: nn.Module
    vocab: Any
    model_name: str
    config: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ write
def _check_plain(obj: Any, where: str = "payload") -> None:
    """Refuse objects that ``torch.load(weights_only=True)`` would reject, before writing the file."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _SAFE_SCALARS):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not plain data")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold only plain data "
        "(dict/list/str/number/tensor) so that they load with weights_only=True"
    )


def model_payload(model: nn.Module, vocab: Any = None) -> dict[str, Any]:
    """The ``"thsrn-model"`` dict of ``model`` (a registered single model) and its vocab."""
    name = getattr(model, "name", "")
    config = getattr(model, "config", None)
    if not name or config is None or not hasattr(config, "to_dict"):
        raise CheckpointError(
            f"cannot checkpoint a {type(model).__name__}: only registered single models (with .name and a "
            "dataclass .config) can be saved; save ensemble members one by one"
        )
    vocab_dict = vocab.to_dict() if hasattr(vocab, "to_dict") else vocab
    return {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model_name": name,
        "config": config.to_dict(),
        "state_dict": model.state_dict(),
        "vocab": vocab_dict,
    }


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path`` and return the path.

    ``format`` defaults to ``"thsrn-checkpoint"``; ``format_version`` and ``library_version`` are
    filled in. Raises :class:`CheckpointError` if model keys are missing or a value is not plain
    data (it would not load with ``weights_only=True``).
    """
    path = Path(path)
    data = dict(payload)
    data.setdefault("format", CHECKPOINT_FORMAT)
    data.setdefault("format_version", FORMAT_VERSION)
    data.setdefault("library_version", __version__)
    if data["format"] not in _FORMATS:
        raise CheckpointError(f"cannot write {path}: unknown checkpoint format {data['format']!r} (use one of {_FORMATS})")
    missing = [k for k in _MODEL_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"cannot write {path}: the payload lacks {missing} (see thsrn_lib.checkpoint.model_payload)")
    try:
        _check_plain(data)
    except TypeError as exc:
        raise CheckpointError(f"cannot write {path}: {exc}") from exc
    with atomic_write(path, "wb") as fh:
        torch.save(data, fh)
    return path


# ------------------------------------------------------------------------------------------ read
def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint file from a file path or a run folder.

    For a folder, ``which="best"`` picks ``checkpoint_best.pt`` (falling back to
    ``checkpoint_last.pt`` when no validation has finished yet), ``which="last"`` picks
    ``checkpoint_last.pt``.
    """
    path = Path(path)
    if which not in ("best", "last"):
        raise ConfigError(f"which must be 'best' or 'last', got {which!r}")
    if path.is_dir():
        names = ["checkpoint_best.pt", "checkpoint_last.pt"] if which == "best" else ["checkpoint_last.pt"]
        for name in names:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"run folder {path} holds no {' or '.join(names)}; train there first or pass a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass a checkpoint file or a run folder written by `thsrn train`")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check its format tag.

    Raises :class:`CheckpointError` naming the file and the fix when it is missing, truncated,
    corrupt, not a thsrn checkpoint, from a newer library, or holds non-plain (untrusted) objects.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass checkpoint_best.pt or checkpoint_last.pt inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if found or "Unsupported global" in msg:
            what = found.group(1) if found else "a Python class"
            raise CheckpointError(
                f"checkpoint {path} pickles {what}, which is not plain data, so it was refused without running it "
                f"(weights_only=True). It was not written by thsrn_lib; {_CONVERT_HINT}"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
        reason = detail.group(1).strip() if detail else (msg.strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it is truncated, corrupt or not a torch file ({reason}); "
            "delete it and use another checkpoint"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways on bad bytes (IndexError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it is truncated, corrupt or not a torch file ({first}). "
            "If a run was killed while writing it, the previous complete checkpoint is the one to use "
            "(checkpoints are written atomically, so this file came from elsewhere or the disk is damaged)"
        ) from None
    if not isinstance(data, dict) or data.get("format") not in _FORMATS:
        if isinstance(data, dict) and {"model", "opt"} <= set(data):
            raise CheckpointError(f"checkpoint {path} is in the official SGRAF layout, not a thsrn checkpoint; {_CONVERT_HINT}")
        kind = f"a dict with keys {sorted(map(str, data))[:8]}" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise CheckpointError(
            f"{path} is not a thsrn checkpoint (it holds {kind}, without a 'format' of {' or '.join(_FORMATS)}); "
            "pass a file written by `thsrn train` or thsrn_lib.checkpoint.save_checkpoint"
        )
    version = data.get("format_version", data.get("version", 1))
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}, newer than this library understands "
            f"({FORMAT_VERSION}); upgrade thsrn_lib (it was written by version {data.get('library_version', '?')})"
        )
    missing = [k for k in _MODEL_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {missing}; it cannot rebuild a model")
    return data


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model stored in a checkpoint (either form) on ``device``, in eval mode.

    ``path`` may also be a run folder (its best checkpoint is used, see :func:`resolve_checkpoint`).
    """
    from .data.vocab import Vocab
    from .errors import DataError
    from .models import create  # local imports: the model zoo imports torch modules lazily

    path = resolve_checkpoint(path, "best")
    data = load_checkpoint(path, map_location="cpu")
    name, config = data["model_name"], data["config"]
    if not isinstance(name, str) or not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: model_name must be a string and config a dict")
    try:
        model = create(name, **config)
    except ConfigError as exc:
        raise CheckpointError(
            f"checkpoint {path}: its model config does not build a {name!r} model with this library version "
            f"({__version__}; the file was written by {data.get('library_version', '?')}): {exc}"
        ) from None
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {path}: its weights do not fit the {name!r} model built from its own config "
            f"({'; '.join(d.strip() for d in detail[1:4]) or detail[0]}); the file is damaged or was written "
            "by an incompatible version"
        ) from None
    vocab = None
    if data.get("vocab") is not None:
        try:
            vocab = Vocab.from_dict(data["vocab"], source=f"vocab stored in checkpoint {path}")
        except DataError as exc:
            raise CheckpointError(str(exc)) from None
    model.to(device).eval()
    info = {k: v for k, v in data.items() if k not in ("state_dict", "optimizer", "scheduler", "scaler", "rng", "vocab")}
    info["path"] = str(path)
    return LoadedModel(model=model, vocab=vocab, model_name=name, config=dict(config), info=info)
