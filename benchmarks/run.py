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
import sys
import time

from thsrn_lib.errors import ThsrnError

PARTS = {
    "scoring": ("benchmarks.scoring", []),
    "training": ("benchmarks.training", []),
    "eval_memory": ("benchmarks.eval_memory", []),
    "two_stage": ("benchmarks.two_stage", []),
    "scenes": ("benchmarks.scenes_generation", []),
}


def main(argv: list[str] | None = None) -> int:
    """Run the parts in order; a part that cannot run (e.g. two_stage before ``make demo``) is
    reported and skipped, and the exit status is 1 if any part failed."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    args = p.parse_args(argv)
    failed = []
    for name in args.only:
        module, part_args = PARTS[name]
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(module).main(part_args)
        except ThsrnError as exc:  # a user-facing problem (missing checkpoint or data): the next part still runs
            print(f"{name} did not run: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if failed:
        print(f"\nparts that did not run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
