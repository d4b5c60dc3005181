"""Model registry: names -> (model class, dataclass config).

``create("tshsr", vocab_size=..., hsr_levels=2)`` builds a model from keyword overrides of its
config defaults; an unknown keyword is a :class:`~thsrn_lib.errors.ConfigError` that lists the
valid ones. Built-in models register themselves when their module is imported; the registry
imports them on first use so that ``import thsrn_lib`` stays fast.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import ConfigError
from .base import MatchingModel, ModelConfig

__all__ = ["register_model", "available", "create", "get_model_class", "build_config", "from_config"]

_BUILTIN_MODULES = ("sgraf", "tshsr", "shan", "hje", "ensemble")
_MODELS: dict[str, type[MatchingModel]] = {}
_BUILDERS: dict[str, Callable[..., MatchingModel]] = {}

M = TypeVar("M", bound=type)


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator registering a :class:`MatchingModel` subclass under ``name``."""

    def deco(cls: M) -> M:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ConfigError(f"model name {name!r} is already registered by {_MODELS[name].__qualname__}")
        _MODELS[name] = cls
        return cls

    return deco


def register_builder(name: str, builder: Callable[..., MatchingModel]) -> None:
    """Register a factory function (for composite models such as the SGRAF ensemble)."""
    _BUILDERS[name] = builder


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def available() -> list[str]:
    """Sorted names accepted by :func:`create`."""
    _load_builtins()
    return sorted(set(_MODELS) | set(_BUILDERS))


def get_model_class(name: str) -> type[MatchingModel]:
    _load_builtins()
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available models: {', '.join(available())}")
    return _MODELS[name]


def _checked_config(cls: type[ModelConfig], values: dict[str, Any]) -> ModelConfig:
    valid = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; valid options: {', '.join(sorted(valid))}"
        )
    # YAML/JSON give lists where a config wants tuples; convert so that configs compare equal.
    for key, value in list(values.items()):
        default = valid[key].default
        if isinstance(value, list) and (
            isinstance(default, tuple) or (valid[key].default_factory is not dataclasses.MISSING)  # type: ignore[misc]
        ):
            values[key] = tuple(value)
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {cls.__name__}: {exc}") from exc
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def build_config(name: str, **overrides: Any) -> ModelConfig:
    """The config dataclass of model ``name`` with ``overrides`` applied (validated)."""
    return _checked_config(get_model_class(name).config_class, overrides)


def create(name: str, **config: Any) -> MatchingModel:
    """Build model ``name`` with its default config updated by ``config``."""
    _load_builtins()
    if name in _BUILDERS:
        return _BUILDERS[name](**config)
    return get_model_class(name)(build_config(name, **config))


def from_config(name: str, config: dict[str, Any]) -> MatchingModel:
    """Rebuild a model from the plain-data config stored in a checkpoint."""
    return create(name, **config)
