"""Seeding and random-number-generator state that survives a checkpoint round trip.

Exact resumption needs every generator that training consumes (Python ``random``, NumPy's
legacy global generator, torch on the CPU and on every CUDA device) captured and restored.
:func:`get_rng_state` returns them in a form that ``torch.load(weights_only=True)`` accepts:
only tensors, ints, floats, strings, tuples and dicts (no NumPy arrays).
"""
from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "get_rng_state", "set_rng_state", "preserve_rng", "derive_seed"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (e.g. ``(seed, epoch)``), stable across platforms.

    Used for per-epoch data order so that epoch ``e`` has the same permutation whether or not
    the run was interrupted, without consuming any global generator.
    """
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices).

    ``deterministic`` also asks torch for deterministic kernels (``warn_only``: ops without a
    deterministic implementation warn instead of failing) and turns off cuDNN autotuning; on
    CUDA that is slower, on the CPU it changes nothing measurable.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matmuls; must be set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def get_rng_state() -> dict[str, Any]:
    """Every global generator's state as checkpoint-safe plain data."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64).copy()),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only if CUDA is in use here)."""
    py = state["python"]
    # weights_only loading gives lists back where tuples went in; random.setstate needs tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": int(npst["pos"])},
            "has_gauss": int(npst["has_gauss"]),
            "gauss": float(npst["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].cpu(), device=i)


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Run a block (e.g. validation) without it advancing any global generator.

    Validation happens at different points of an interrupted and an uninterrupted run only if
    it consumed random numbers; isolating it keeps dropout masks identical across a resume.
    """
    saved = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)
