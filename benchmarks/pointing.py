"""Pointing-accuracy benchmark: every trained demo model on the Scenes demo test split.

Trains nothing: it reads checkpoints (default ``runs/scenes_demo_*/checkpoint_best.pt``, written
by ``make demo``) and prints, per model, method and stream, the share of aligned words whose
top-ranked region is one of their ground-truth regions, per word type, beside chance
(see :mod:`thsrn_lib.pointing`). When both an ``sgr`` and an ``saf`` checkpoint are given, their
score-level ensemble (SGRAF) is scored too.

    python -m benchmarks.pointing                                   # all defaults
    python -m benchmarks.pointing --methods attention --json runs/pointing.json
    python benchmarks/pointing.py --checkpoints runs/my_run --data data/scenes/demo --split test
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python benchmarks/pointing.py` from anywhere
    sys.path.insert(0, str(REPO))

from thsrn_lib.errors import ThsrnError  # noqa: E402

DEFAULT_CHECKPOINTS = "runs/scenes_demo_*/checkpoint_best.pt"


def _expand(patterns: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if not p.is_absolute() and not p.exists():
            p = REPO / pat
        hits = sorted(glob.glob(str(p))) if any(c in str(p) for c in "*?[") else ([str(p)] if p.exists() else [])
        out += [Path(h) for h in hits if Path(h) not in out]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pointing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", nargs="+", default=[DEFAULT_CHECKPOINTS],
                    help=f"checkpoint files, run folders or globs (default {DEFAULT_CHECKPOINTS})")
    ap.add_argument("--data", default="data/scenes/demo", help="Scenes data folder (default data/scenes/demo)")
    ap.add_argument("--split", default="test", help="split with alignments (default test)")
    ap.add_argument("--methods", default="attention,occlusion,integrated_gradients",
                    help="comma-separated subset of attention, occlusion, integrated_gradients")
    ap.add_argument("--max-captions", type=int, default=None, help="score only the first N captions (all methods)")
    ap.add_argument("--attr-max-captions", type=int, default=500,
                    help="captions for the gradient/occlusion methods (they cost a pass per word; default 500)")
    ap.add_argument("--n-steps", type=int, default=16, help="integrated-gradients steps (default 16)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:K")
    ap.add_argument("--no-ensemble", action="store_true", help="do not add SGRAF = sgr + saf")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from thsrn_lib.data import PrecompDataset, Vocab, find_vocab
    from thsrn_lib.explorer import load_models
    from thsrn_lib.notebook_utils import to_jsonable
    from thsrn_lib.pointing import METHODS, format_pointing_table, pointing_accuracy
    from thsrn_lib.utils.io import atomic_write_json

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"error: unknown method(s) {bad}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    data = Path(args.data) if Path(args.data).is_absolute() or Path(args.data).exists() else REPO / args.data
    ckpts = _expand(args.checkpoints)
    if not ckpts:
        print(f"error: no checkpoints match {args.checkpoints}; train the demo models first (`make demo`, or "
              "`thsrn train --config configs/scenes_demo_<model>.yaml`)", file=sys.stderr)
        return 2
    try:
        vocab = Vocab.load(find_vocab(data))
        ds = PrecompDataset(data, args.split, vocab=vocab)
        models, _ = load_models(ckpts, device=args.device, vocab=vocab, add_sgraf=not args.no_ensemble)
    except ThsrnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print(f"Pointing accuracy on {data} ({args.split}: {ds.n_images} images, {ds.n_captions} captions, "
          f"R = {ds.num_regions} regions); checkpoints: {', '.join(str(p) for p in ckpts)}\n")
    results, timings = [], {}
    for name, model in models.items():
        for method in methods:
            cap = args.max_captions if method == "attention" else min(
                args.attr_max_captions, args.max_captions or args.attr_max_captions)
            t0 = time.perf_counter()
            res = pointing_accuracy(model, ds, method, max_captions=cap, n_steps=args.n_steps, model_name=name)
            timings[f"{name}/{method}"] = time.perf_counter() - t0
            results.append(res)
    print(format_pointing_table(results))
    print("\nAccuracy and chance in %: a word scores when its top-ranked region is one of its ground-truth regions "
          "(IoU >= 0.5 with the object it names); chance = mean |GT regions| / R. attention: the model's maps "
          "(t2i: word over regions; i2t: regions ranked by their weight on the word; HJE: local-space cosine); "
          "occlusion / integrated_gradients: word-specific region attributions of the final score (stream 'pair').")
    for r in results:
        if "abs_delta_mean" in r.info:
            print(f"  {r.model} integrated gradients: mean |convergence delta| {r.info['abs_delta_mean']:.2e} "
                  f"(max {r.info['abs_delta_max']:.2e}) with {args.n_steps} steps")
        if r.skipped:
            print(f"  {r.model} {r.method}: skipped tokens {r.skipped}")
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if args.json:
        atomic_write_json(args.json, to_jsonable({
            "data": str(data), "split": args.split, "checkpoints": [str(p) for p in ckpts],
            "n_steps": args.n_steps, "results": [r.to_dict() for r in results], "seconds": timings}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
