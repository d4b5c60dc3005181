"""Time a fresh (uncached) generation of a Scenes preset, per stage.

    python -m benchmarks.scenes_generation [--preset demo] [--seed 0] [--keep DIR]

Generates into a temporary folder (so nothing is reused from a cache), prints the seconds
spent in each stage, the total, the size on disk and the t2i R@1 ceiling of the test split.
Stages on the main thread: scenes+captions (sampling scenes and 5 captions each), regions
(boxes), render (rasterising), text (captions, ids, scenes, alignments, boxes), vocab,
wait_worker (waiting for the background threads), project (standardise + project to D),
place (renaming into place). On two background threads, overlapping those: features (crop +
conv bank + pooling, one torch thread) and png. Wall-clock and CPU seconds are both shown:
on a busy machine wall-clock times stretch, CPU times much less.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from thsrn_lib.data.scenes import caption_ambiguity_ceiling, generate_with_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="generate into this folder instead of a temporary one")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="scenes-bench-") as tmp:
        out = args.keep or tmp
        start = time.perf_counter()
        report = generate_with_report(args.preset, out, seed=args.seed, force=True)
        wall = time.perf_counter() - start
        meta = report.meta
        print(f"preset {args.preset} (seed {args.seed}) on {platform.machine()} with {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        print("images: " + ", ".join(f"{k} {v['images']}" for k, v in meta["splits"].items())
              + f"; R={meta['n_regions']}, D={meta['feature_dim']}")
        print(f"  {'stage':<20} {'wall s':>8} {'cpu s':>8}")
        for stage, sec in report.seconds.items():
            if stage != "total":
                print(f"  {stage:<20} {sec:8.2f} {report.cpu_seconds.get(stage, float('nan')):8.2f}")
        main_cpu = sum(v for k, v in report.cpu_seconds.items() if "(worker)" not in k)
        worker_cpu = sum(v for k, v in report.cpu_seconds.items() if "(worker)" in k)
        print(f"  {'total':<20} {report.seconds['total']:8.2f} {main_cpu + worker_cpu:8.2f}"
              f"   (measured around the call: {wall:.2f} s)")
        # With two idle cores the three threads overlap; wall time is then bounded below by the
        # main thread's CPU time and by half of all CPU time.
        print(f"CPU: main thread {main_cpu:.1f} s, worker threads {worker_cpu:.1f} s -> on 2 idle cores about "
              f"{max(main_cpu, (main_cpu + worker_cpu) / 2):.1f} s")
        print(f"size on disk: {report.bytes_on_disk() / 1e6:.1f} MB")
        ceil = caption_ambiguity_ceiling(report.path, "test")
        print(f"test t2i ceiling: R@1 {ceil['t2i_r1']:.1f}, R@5 {ceil['t2i_r5']:.1f}, R@10 {ceil['t2i_r10']:.1f} "
              f"(a caption fits {ceil['fits_mean']:.1f} images on average)")


if __name__ == "__main__":
    main()
