"""``argparse`` value types that reject bad numbers at parse time, with the value in the message."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["bounded", "positive_int", "non_negative_int", "positive_float", "non_negative_float"]


def bounded(cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses with ``cast`` and accepts values where ``ok(value)``."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


positive_int = bounded(int, lambda v: v >= 1, "a positive integer")
non_negative_int = bounded(int, lambda v: v >= 0, "an integer >= 0")
positive_float = bounded(float, lambda v: 0 < v < float("inf"), "a positive finite number")  # NaN fails too
non_negative_float = bounded(float, lambda v: 0 <= v < float("inf"), "a non-negative finite number")
