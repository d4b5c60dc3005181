"""``thsrn scenes``: generate (or reuse) a Scenes data set from the command line.

    thsrn scenes --preset demo --out data/scenes [--seed N] [--set key=value ...] [--force]
    python -m thsrn_lib.data.scenes --preset tiny --out /tmp/scenes
"""
from __future__ import annotations

import argparse
from typing import Any

from thsrn_lib.data.scenes.config import PRESETS, SPLITS, coerce_override, param_names
from thsrn_lib.data.scenes.generate import generate_with_report
from thsrn_lib.errors import ConfigError

__all__ = ["add_arguments", "main", "parse_overrides"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``scenes`` subcommand's options to ``parser``."""
    parser.add_argument("--preset", choices=list(PRESETS), default="demo",
                        help="tiny (tests), demo (quick start, default) or full (36 x 2048 features)")
    parser.add_argument("--out", default="data/scenes",
                        help="parent folder; the data set goes to OUT/PRESET, or OUT/PRESET-HASH for other "
                             "seeds/overrides (default: data/scenes)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a generator parameter, repeatable (e.g. --set n_train=500); "
                             f"names: {', '.join(param_names())}")
    parser.add_argument("--force", action="store_true", help="regenerate even if a matching data set exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["n_train=500", "small_size=0.1,0.15"]`` -> typed overrides; bad items raise ConfigError."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = coerce_override(key, value.strip())
    return out


def _size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1000
    return f"{n_bytes:.1f} GB"


def main(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the process exit status."""
    overrides = parse_overrides(args.overrides)
    report = generate_with_report(args.preset, args.out, args.seed, progress=not args.quiet, force=args.force,
                                  **overrides)
    meta = report.meta
    state = "reused (cached, same parameter hash)" if report.reused else "written"
    print(f"Scenes data set {meta['preset']!r} (seed {meta['seed']}, hash {meta['hash'][:10]}) {state}: {report.path}")
    print(f"  {'split':<8} {'images':>7} {'captions':>9}")
    for split in SPLITS:
        s = meta["splits"][split]
        print(f"  {split:<8} {s['images']:>7} {s['captions']:>9}")
    print(f"  regions per image R={meta['n_regions']}, feature dim D={meta['feature_dim']}, "
          f"vocab {meta['vocab']['size']} words (min_count {meta['vocab']['min_count']})")
    line = f"  size on disk {_size(report.bytes_on_disk())}"
    if not report.reused:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items() if k != "total")
        line += f"; time {report.seconds['total']:.1f} s ({stages})"
    print(line)
    return 0
