"""Generator parameters: one dataclass, three presets, overrides, and the parameter hash.

Every number that changes the generated files lives in :class:`ScenesConfig`; the hash of
those numbers (plus the seed and :data:`GENERATOR_VERSION`) keys the on-disk cache, so a
data set is regenerated exactly when something that matters changed.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import typing
from dataclasses import dataclass, fields
from typing import Any

from thsrn_lib.errors import ConfigError

__all__ = [
    "GENERATOR_VERSION",
    "SPLITS",
    "ScenesConfig",
    "PRESETS",
    "make_config",
    "param_names",
    "params_hash",
    "coerce_override",
]

# Bump whenever a change to the code changes the generated files for the same parameters,
# so that stale caches are not reused.
GENERATOR_VERSION = "1.0"

# Order matters: train is generated first because its features fix the standardisation.
SPLITS: tuple[str, ...] = ("train", "dev", "test", "binding")


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ScenesConfig)


def _field_type(name: str) -> Any:
    return _field_types()[name]


def _check_type(name: str, value: Any, typ: Any) -> None:
    ok: bool
    if typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif typing.get_origin(typ) is tuple:
        ok = (isinstance(value, tuple) and len(value) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    else:
        ok = isinstance(value, typ)
    if not ok:
        raise ConfigError(f"scenes parameter {name} must be of type {getattr(typ, '__name__', typ)}, got {value!r}")


@dataclass(frozen=True)
class ScenesConfig:
    """All parameters of one Scenes data set (sizes in pixels unless said otherwise)."""

    # -- data set size
    n_train: int = 3000
    n_dev: int = 500
    n_test: int = 500
    n_binding: int = 200
    # -- world
    canvas: int = 128  # square images, canvas x canvas
    min_objects: int = 2
    max_objects: int = 6
    small_size: tuple[float, float] = (0.13, 0.17)  # side of a small object, fraction of canvas
    large_size: tuple[float, float] = (0.24, 0.30)
    striped_prob: float = 0.25  # 0 turns patterns off (every object plain)
    attribute_reuse_prob: float = 0.35  # chance to copy an earlier object's shape / colour
    next_to_gap: float = 0.12  # "next to": box gap <= this fraction of canvas
    # -- regions
    n_regions: int = 16  # R
    region_jitter: float = 0.08  # std of box-corner noise, fraction of the box side
    part_fraction: float = 0.3  # of the non-object regions
    pair_fraction: float = 0.3  # of the non-object regions; the rest are background boxes
    # -- features
    feature_dim: int = 256  # D
    crop_size: int = 24
    # samples per output pixel per axis (anti-aliasing of the crop); 2 cost ~25% more feature
    # time at 128 x 128 for no gain in linear-probe accuracy of colour/shape/size
    crop_supersample: int = 1
    n_filters: int = 48
    filter_size: int = 5
    pool_grid: int = 2  # average pooling over a pool_grid x pool_grid grid, plus a global max
    native_size: int = 20  # side of the centre window kept at native resolution (the scale cue)
    feature_seed: int = 1234  # the extractor is a fixed "network", shared across data seeds
    # -- text
    vocab_min_count: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            typ = _field_type(f.name)
            _check_type(f.name, getattr(self, f.name), typ)
            # 0 and 0.0 must hash alike: store floats as floats.
            if typ is float:
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
            elif typing.get_origin(typ) is tuple:
                object.__setattr__(self, f.name, tuple(float(v) for v in getattr(self, f.name)))
        positive = ["canvas", "n_regions", "feature_dim", "crop_size", "crop_supersample", "n_filters",
                    "filter_size", "pool_grid", "native_size", "vocab_min_count", "min_objects", "n_train", "n_dev", "n_test"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"scenes parameter {name} must be >= 1, got {getattr(self, name)}")
        if self.n_binding < 0:
            raise ConfigError(f"scenes parameter n_binding must be >= 0, got {self.n_binding}")
        if self.canvas < 32:
            raise ConfigError(f"scenes parameter canvas must be >= 32 pixels, got {self.canvas}")
        if not 2 <= self.min_objects <= self.max_objects <= 8:
            raise ConfigError(
                f"scenes parameters need 2 <= min_objects <= max_objects <= 8, got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if self.n_regions < self.max_objects + 2:
            raise ConfigError(
                f"scenes parameter n_regions={self.n_regions} is too small: it must be >= max_objects + 2 "
                f"= {self.max_objects + 2} (one box per object plus part/pair/background boxes)"
            )
        for name in ("small_size", "large_size"):
            lo, hi = getattr(self, name)
            if not 0.03 <= lo <= hi <= 0.45:
                raise ConfigError(f"scenes parameter {name} must satisfy 0.03 <= low <= high <= 0.45, got {(lo, hi)}")
        if self.small_size[1] >= self.large_size[0]:
            raise ConfigError(
                f"small_size {self.small_size} and large_size {self.large_size} overlap; every small object "
                "must be smaller than every large one so that 'small'/'large' are unambiguous"
            )
        for name in ("striped_prob", "attribute_reuse_prob", "part_fraction", "pair_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"scenes parameter {name} must be in [0, 1], got {getattr(self, name)}")
        if self.part_fraction + self.pair_fraction > 1.0:
            raise ConfigError(
                f"part_fraction + pair_fraction must be <= 1 (the rest are background boxes), got "
                f"{self.part_fraction} + {self.pair_fraction}"
            )
        if not 0.0 <= self.region_jitter <= 0.3:
            raise ConfigError(f"region_jitter must be in [0, 0.3], got {self.region_jitter}")
        if not 0.0 < self.next_to_gap <= 0.5:
            raise ConfigError(f"next_to_gap must be in (0, 0.5], got {self.next_to_gap}")
        if self.filter_size >= min(self.crop_size, self.native_size):
            raise ConfigError(f"filter_size ({self.filter_size}) must be smaller than crop_size ({self.crop_size}) "
                              f"and native_size ({self.native_size})")
        if self.pool_grid > self.crop_size - self.filter_size + 1:
            raise ConfigError(
                f"pool_grid={self.pool_grid} exceeds the conv output size {self.crop_size - self.filter_size + 1}"
            )

    def n_images(self, split: str) -> int:
        """Number of images in ``split`` (one of :data:`SPLITS`)."""
        if split not in SPLITS:
            raise ConfigError(f"unknown Scenes split {split!r}; valid splits: {', '.join(SPLITS)}")
        return getattr(self, f"n_{split}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able parameters (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, ScenesConfig] = {
    # Unit tests: generates in well under a second.
    "tiny": ScenesConfig(
        n_train=40, n_dev=12, n_test=12, n_binding=10, canvas=64, max_objects=4, n_regions=10,
        feature_dim=64, crop_size=16, n_filters=16, native_size=10, vocab_min_count=1,
    ),
    # Quick start and teaching: a model trains on it on a 2-core CPU in minutes.
    "demo": ScenesConfig(),
    # Same shape as the real precomputed features (36 x 2048); gigabytes on disk, not for tests.
    "full": ScenesConfig(
        n_train=10000, n_dev=1000, n_test=1000, n_binding=500, canvas=256, n_regions=36, feature_dim=2048,
        crop_size=32, crop_supersample=2, n_filters=96, pool_grid=3, native_size=40,
    ),
}


def param_names() -> list[str]:
    """Names accepted as overrides (every :class:`ScenesConfig` field)."""
    return [f.name for f in fields(ScenesConfig)]


def make_config(preset: str = "demo", **overrides: Any) -> ScenesConfig:
    """The preset's parameters with ``overrides`` applied.

    Raises:
        ConfigError: unknown preset, unknown parameter name (the message lists the valid
            ones), or an invalid value.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown Scenes preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(param_names()))
    if unknown:
        raise ConfigError(
            f"unknown Scenes parameter(s) {', '.join(unknown)}; valid names: {', '.join(param_names())}"
        )
    normalised = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(PRESETS[preset], **normalised)


def params_hash(cfg: ScenesConfig, seed: int) -> str:
    """SHA-256 (hex) of the generator version, the seed and every parameter: the cache key."""
    payload = json.dumps(
        {"generator_version": GENERATOR_VERSION, "seed": int(seed), "params": cfg.to_dict()},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def coerce_override(name: str, text: str) -> Any:
    """Parse a command-line ``key=value`` value into the type of parameter ``name``.

    Tuples are written comma-separated (``small_size=0.1,0.15``).
    """
    if name not in param_names():
        raise ConfigError(f"unknown Scenes parameter {name!r}; valid names: {', '.join(param_names())}")
    typ = _field_type(name)
    try:
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typ is bool:
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return low in ("true", "1", "yes")
        if typing.get_origin(typ) is tuple:
            return tuple(float(x) for x in text.split(","))
        return text
    except ValueError:
        raise ConfigError(f"cannot parse {name}={text!r} as {getattr(typ, '__name__', typ)}") from None
