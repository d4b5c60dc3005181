"""Training configuration: nested dataclasses, loaded from a YAML recipe plus ``key=value`` overrides.

A recipe has five top-level keys::

    model: tshsr                  # registry name
    model_config: {embed_size: 1024, ...}   # keyword overrides of the model's config dataclass
    data:  {root: data/f30k_precomp, ...}   # DataConfig
    optim: {lr: 2.0e-4, epochs: 40, ...}    # OptimConfig
    run:   {output_dir: runs/f30k_tshsr, seed: 0, ...}   # RunConfig

Overrides address any field with a dotted key, e.g. ``optim.lr=1e-3`` or
``model_config.sim_dim=64``; values are parsed as YAML (``true``, ``[10, 20]``, ``null``).
Unknown keys and values of the wrong type raise :class:`~thsrn_lib.errors.ConfigError`
listing what is valid.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from ..errors import ConfigError
from ..utils.io import atomic_write

__all__ = [
    "DataConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "parse_override",
    "apply_overrides",
    "option_help",
    "valid_keys",
    "DATA_FILLED_FIELDS",
]

#: Model-config fields taken from the data unless the recipe sets them (then they must agree).
DATA_FILLED_FIELDS = ("vocab_size", "img_dim", "num_regions")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")  # kept here (not from utils.device) so --help needs no torch


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and a one-line help text (shown by ``thsrn train --help``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """Where the data is and how it is read."""

    root: str = _opt("", "folder with {split}_caps.txt / {split}_ims.npy (required)")
    train_split: str = _opt("train", "split to train on")
    val_split: Union[str, None] = _opt("dev", "split validated every epoch (model selection by rsum); null = no validation")
    vocab: str = _opt("auto", "vocab JSON path, or \"auto\" (thsrn_lib.data.find_vocab(root))")
    max_val_captions: Union[int, str, None] = _opt("auto", "\"auto\" = official dev cap (5,000 captions), null = all")
    workers: int = _opt(0, "DataLoader worker processes (0 = load in the training process)")
    check_finite: str = _opt("full", "\"full\" scans the features for NaN/inf once; \"none\" skips (huge files)")

    def validate(self) -> None:
        if not self.root:
            raise ConfigError("data.root is required: the folder with {split}_caps.txt and {split}_ims.npy")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        if self.check_finite not in ("full", "none"):
            raise ConfigError(f"data.check_finite must be 'full' or 'none', got {self.check_finite!r}")
        if isinstance(self.max_val_captions, str) and self.max_val_captions != "auto":
            raise ConfigError(f"data.max_val_captions must be 'auto', null or a multiple of 5, got {self.max_val_captions!r}")


@dataclass
class OptimConfig:
    """Optimiser, schedule and loss (defaults: SGRAF's recipe, sgraf.md §7-8)."""

    lr: float = _opt(2e-4, "Adam learning rate")
    lr_update: Union[int, None] = _opt(None, "multiply the lr by lr_decay every lr_update epochs (SGRAF style)")
    lr_steps: Union[list[int], None] = _opt(None, "or: the epochs at which to multiply it (exclusive with lr_update)")
    lr_decay: float = _opt(0.1, "learning-rate factor at each decay")
    epochs: int = _opt(40, "training epochs")
    batch_size: int = _opt(128, "captions per batch and per process (the in-batch negatives)")
    grad_clip: float = _opt(2.0, "max global gradient norm; <= 0 turns clipping off")
    margin: float = _opt(0.2, "hinge margin of the ranking loss")
    max_violation: bool = _opt(True, "hardest in-batch negative (VSE++); false sums all violations")
    warmup_steps: int = _opt(0, "first optimiser steps use summed violations before hardest negatives")
    exclude_same_image_negatives: bool = _opt(False, "ignore other captions of the same image as negatives")

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"optim.batch_size must be >= 2 (in-batch negatives, BatchNorm), got {self.batch_size}")
        if self.lr_update is not None and self.lr_steps is not None:
            raise ConfigError("set either optim.lr_update (every N epochs) or optim.lr_steps (list of epochs), not both")
        if self.lr_update is not None and self.lr_update < 1:
            raise ConfigError(f"optim.lr_update must be >= 1 epoch (or null), got {self.lr_update}")
        if self.lr_steps is not None and (any(s < 1 for s in self.lr_steps) or sorted(self.lr_steps) != self.lr_steps):
            raise ConfigError(f"optim.lr_steps must be increasing epochs >= 1, got {self.lr_steps}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"optim.lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.margin < 0:
            raise ConfigError(f"optim.margin must be >= 0, got {self.margin}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")

    def milestones(self) -> list[int]:
        """Epochs at whose start the learning rate is multiplied by ``lr_decay``."""
        if self.lr_steps is not None:
            return list(self.lr_steps)
        if self.lr_update is not None:
            return list(range(self.lr_update, self.epochs, self.lr_update))
        return []

    def lr_at(self, epoch: int) -> float:
        """The learning rate during ``epoch`` (0-based): ``lr * lr_decay ** (#milestones <= epoch)``."""
        return self.lr * self.lr_decay ** sum(1 for m in self.milestones() if m <= epoch)


@dataclass
class RunConfig:
    """Where outputs go and how the run behaves (device, precision, cadence)."""

    output_dir: str = _opt("", "default: runs/<recipe file name without .yaml>")
    seed: int = _opt(0, "seed of weights, data order and dropout")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:K")
    amp: str = _opt("auto", "auto (bf16/fp16 on CUDA, off on CPU) | bf16 | fp16 | off")
    deterministic: bool = _opt(False, "deterministic kernels (slower on CUDA)")
    threads: Union[int, None] = _opt(None, "CPU threads of torch in this process; null = torch's default (all cores)")
    log_every: int = _opt(10, "optimiser steps between logged training lines")
    val_every_steps: int = _opt(0, "extra validation every N steps (logged only); 0 = epoch ends only")
    val_batch_size: int = _opt(128, "images/captions per encoding batch during validation")
    checkpoint_every_steps: int = _opt(0, "extra checkpoint_last.pt every N steps; 0 = epoch ends only")
    max_steps: Union[int, None] = _opt(None, "stop after this many optimiser steps in total (smoke runs)")
    progress: bool = _opt(True, "tqdm progress bar (only shown on a terminal or in Jupyter)")

    def validate(self) -> None:
        if self.amp not in AMP_CHOICES:
            raise ConfigError(f"run.amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        dev = self.device.lower()
        if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
            raise ConfigError(f"run.device must be auto, cpu, cuda or cuda:K, got {self.device!r}")
        for name in ("log_every", "val_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_every_steps", "checkpoint_every_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"run.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"run.threads must be >= 1 or null, got {self.threads}")
        if self.seed < 0:
            raise ConfigError(f"run.seed must be >= 0, got {self.seed}")


_SECTIONS: dict[str, type] = {"data": DataConfig, "optim": OptimConfig, "run": RunConfig}


@dataclass
class TrainConfig:
    """A complete training run: model, data, optimiser and run settings."""

    model: str = ""
    model_config: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ---------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build and validate from plain data (a parsed recipe)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping with keys {', '.join(_top_keys())}")
        unknown = sorted(set(map(str, raw)) - set(_top_keys()))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid top-level keys: {', '.join(_top_keys())}")
        model = raw.get("model", "")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{source}: 'model' is required, a model name such as tshsr, sgr, saf, shan or hje")
        model_config = raw.get("model_config") or {}
        if not isinstance(model_config, Mapping):
            raise ConfigError(f"{source}: 'model_config' must be a mapping of model options, got {type(model_config).__name__}")
        sections = {name: _build_section(cls_, raw.get(name) or {}, name, source) for name, cls_ in _SECTIONS.items()}
        cfg = cls(model=model, model_config=dict(model_config), **sections)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
        """Read a YAML recipe, apply ``key=value`` overrides, validate.

        ``run.output_dir`` defaults to ``runs/<file stem>``.
        """
        path = Path(path)
        if not path.is_file():
            hint = ""
            folder = path.parent if str(path.parent) else Path(".")
            if folder.is_dir():
                recipes = sorted(p.name for p in folder.glob("*.yaml"))[:40]
                if recipes:
                    hint = f" Recipes in {folder}: {', '.join(recipes)}"
            raise ConfigError(f"config file {path} not found.{hint}")
        try:
            raw = _load_yaml(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_message(exc)}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason})") from None
        if raw is None:
            raise ConfigError(f"config file {path} is empty")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping with keys {', '.join(_top_keys())}")
        raw = apply_overrides(raw, overrides, source=f"override of {path}")
        run = raw.setdefault("run", {}) if isinstance(raw.get("run", {}), dict) else raw.get("run")
        if isinstance(run, dict) and not run.get("output_dir"):
            run["output_dir"] = str(Path("runs") / path.stem)
        return cls.from_dict(raw, source=f"config file {path}")

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Check every section and that the model exists and accepts ``model_config``."""
        from ..models import available, build_config, get_model_class

        for name in _SECTIONS:
            getattr(self, name).validate()
        names = available()
        if self.model not in names:
            raise ConfigError(f"unknown model {self.model!r}; available models: {', '.join(names)}")
        try:
            get_model_class(self.model)
        except ConfigError:
            raise ConfigError(
                f"model {self.model!r} is an ensemble of separately trained models; train each member "
                "(e.g. 'sgr' and 'saf') with its own recipe and combine the checkpoints at evaluation"
            ) from None
        build_config(self.model, **self.model_config)  # unknown/invalid options -> ConfigError listing valid ones

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON/checkpoint friendly)."""
        return {
            "model": self.model,
            "model_config": dict(self.model_config),
            **{name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically)."""
        with atomic_write(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_yaml())


# -------------------------------------------------------------------------------- helpers
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``2e-4`` as a float (YAML 1.1 insists on ``2.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _top_keys() -> list[str]:
    return ["model", "model_config", *_SECTIONS]


def valid_keys() -> list[str]:
    """Every dotted key an override may set (model_config keys depend on the model)."""
    keys = ["model", "model_config.<option>"]
    for name, cls_ in _SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in fields(cls_)]
    return keys


def option_help() -> list[tuple[str, str, Any]]:
    """``(dotted key, help, default)`` for every section option, in declaration order."""
    out = []
    for name, cls_ in _SECTIONS.items():
        for f in fields(cls_):
            out.append((f"{name}.{f.name}", f.metadata.get("help", ""), f.default))
    return out


def _yaml_message(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> ``(["optim", "lr"], 0.001)``; the value is parsed as YAML."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.lr=1e-3 or run.seed=1")
    key, _, value = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {text!r} has an empty key; use dotted names such as optim.lr")
    try:
        parsed = _load_yaml(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_message(exc)})") from None
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str = "override") -> dict[str, Any]:
    """Return a copy of the parsed recipe ``raw`` with dotted ``key=value`` overrides applied."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        parts, value = parse_override(text)
        head = parts[0]
        if head == "model" and len(parts) == 1:
            out["model"] = value
            continue
        if head == "model_config" and len(parts) == 1:
            # A whole mapping replaces the model options (e.g. together with model=<other model>).
            if not isinstance(value, dict):
                raise ConfigError(f"override {text!r}: model_config needs a mapping, e.g. 'model_config={{embed_size: 64}}'")
            out["model_config"] = dict(value)
            continue
        if head in _SECTIONS and len(parts) == 1:
            if not isinstance(value, dict):
                raise ConfigError(f"override {text!r}: {head} needs a mapping, e.g. '{head}={{key: value}}' or {head}.key=value")
            section = out.get(head) or {}
            out[head] = {**(section if isinstance(section, dict) else {}), **value}
            continue
        if head == "model_config" and len(parts) == 2:
            section = out.get("model_config") or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: model_config must be a mapping")
            out["model_config"] = {**section, parts[1]: value}
            continue
        if head in _SECTIONS and len(parts) == 2:
            names = [f.name for f in fields(_SECTIONS[head])]
            if parts[1] not in names:
                raise ConfigError(f"unknown key {'.'.join(parts)!r} in {text!r}; valid {head} keys: {', '.join(names)}")
            section = out.get(head) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: {head} must be a mapping")
            out[head] = {**section, parts[1]: value}
            continue
        raise ConfigError(f"unknown key {'.'.join(parts)!r} in {text!r}; valid keys: {', '.join(valid_keys())}")
    return out


def _build_section(cls_: type, values: Any, name: str, source: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: '{name}' must be a mapping of options, got {type(values).__name__}")
    valid = {f.name for f in fields(cls_)}
    unknown = sorted(set(map(str, values)) - valid)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{name}.{u}' for u in unknown)}; valid {name} keys: {', '.join(sorted(valid))}")
    hints = typing.get_type_hints(cls_)
    kwargs = {key: _coerce(value, hints[key], f"{name}.{key}", source) for key, value in values.items()}
    return cls_(**kwargs)


def _type_name(typ: Any) -> str:
    if typ is type(None):
        return "null"
    origin = typing.get_origin(typ)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(typ))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(typ)[0])}"
    return getattr(typ, "__name__", str(typ))


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``typ`` (ints are accepted where floats are expected)."""
    origin = typing.get_origin(typ)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(typ):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
    elif typ is type(None):
        if value is None:
            return None
    elif origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, inner, key, source) for v in value]
    elif typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is Any:
        return value
    raise ConfigError(f"{source}: {key} must be {_type_name(typ)}, got {value!r} ({type(value).__name__})")
