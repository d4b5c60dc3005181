"""Timing, memory and hardware-peak helpers shared by the benchmarks."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], Any], *, repeat: int = 3, warmup: int = 1, min_seconds: float = 0.0) -> float:
    """Best wall time (s) of ``fn()`` over ``repeat`` runs after ``warmup`` runs.

    The best run, not the mean: on a shared machine the minimum is the most stable estimate of
    what the code itself costs.
    """
    for _ in range(warmup):
        fn()
    best = float("inf")
    runs = 0
    start = time.perf_counter()
    while runs < repeat or (time.perf_counter() - start) < min_seconds:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def time_round_robin(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Best wall time (s) of each function over ``rounds`` rounds, the functions interleaved."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def random_captions(n: int, vocab_size: int, generator: torch.Generator, min_len: int = 8,
                    max_len: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids (n, L)``, ``lengths (n,)``: captions of random words, lengths in [min_len, max_len],
    laid out like the data loader's (id 1 = <start>, 2 = <end>, 0 = padding)."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    ids = torch.randint(4, vocab_size, (n, int(lengths.max())), generator=generator)
    ids[:, 0] = 1
    for j, length in enumerate(lengths.tolist()):
        ids[j, length - 1] = 2
        ids[j, length:] = 0
    return ids, lengths


def matmul_peak_gflops(n: int = 2048, repeat: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """This machine's achievable fp32 GEMM rate (GFLOP/s) with torch's current thread count."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    seconds = time_call(lambda: torch.mm(a, b), repeat=repeat, warmup=2)
    return 2.0 * n**3 / seconds / 1e9


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null inside the block: the profiler's native layer logs a
    start and a stop line per use, which would bury the benchmark tables. Python exceptions
    still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_tensor_mb(fn: Callable[[], Any]) -> float:
    """Peak MiB of tensor memory allocated while ``fn()`` runs, above what was live before it.

    Read from the torch profiler's allocation records (every tensor allocation and free, in time
    order), so it measures the code's own working memory independently of what the C allocator
    keeps cached; allocations and frees inside one kernel are not seen separately.
    """
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if platform.system() == "Linux" else rss / 2**20


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def save_results(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (atomic)."""
    from thsrn_lib.utils.io import atomic_write_json

    path = RESULTS_DIR / f"{name}.json"
    atomic_write_json(path, {"machine": machine_info(), **data})
    return path


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` = (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if row.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2)
