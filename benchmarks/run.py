"""Run every benchmark and print its table (``python -m benchmarks.run`` or ``make bench``).

Order: scoring throughput at the papers' sizes (vs. the per-caption reference, GFLOP/s vs. the
measured matmul peak), training-step throughput, evaluation peak memory on a COCO-5K-shaped
problem for two shard sizes, two-stage retrieval on the Scenes demo test split (needs the demo
checkpoints from ``make demo``), and Scenes generation time. Each part also writes
``benchmarks/results/<part>.json``. ``--only`` picks parts.
"""
from __future__ import annotations

import argparse
import importlib
import time

PARTS = {
    "scoring": ("benchmarks.scoring", []),
    "training": ("benchmarks.training", []),
    "eval_memory": ("benchmarks.eval_memory", []),
    "two_stage": ("benchmarks.two_stage", []),
    "scenes": ("benchmarks.scenes_generation", []),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    args = p.parse_args(argv)
    for name in args.only:
        module, part_args = PARTS[name]
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        importlib.import_module(module).main(part_args)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
