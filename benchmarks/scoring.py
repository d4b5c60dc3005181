"""Scoring throughput at the papers' sizes: vectorised fast paths vs. per-caption baselines.

Baselines (both exact, both one caption at a time against blocks of 100 images, see
:mod:`benchmarks.baselines`):

* official-style: the official SGRAF evaluation's operation sequence (caption copied per image,
  four-pass norms, contiguous transposes, unfolded graph steps, visual self-attention once per
  100-caption shard). Issue 8's targets are ratios against this one.
* lean per-caption (``thsrn_lib.models.sgraf.reference_similarity``): the same loop with fused
  operations, a stricter baseline.

All paths get the same encoded embeddings, so only the scoring (the cost centre of
cross-attention models) is timed. The variants are timed round-robin (fast, official-style,
lean, fast, ...) so that a change in the machine's speed during the run hits all of them alike;
each keeps its best round. Scores are checked equal (atol 1e-5) in the same run.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch

from thsrn_lib.models import create, select
from thsrn_lib.models.sgraf import reference_similarity
from thsrn_lib.utils.argtypes import non_negative_int, positive_int

from .baselines import official_style_similarity
from .common import format_table, matmul_peak_gflops, peak_tensor_mb, random_captions, save_results, time_round_robin
from .flops import FLOPS

PAPER = dict(img_dim=2048, embed_size=1024, sim_dim=256, num_regions=36, word_dim=300, vocab_size=1000)


def make_inputs(n_images: int, n_captions: int, min_len: int = 8, max_len: int = 23, seed: int = 0):
    """Random region features (B, 36, 2048) and captions with lengths in [min_len, max_len]."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_images, PAPER["num_regions"], PAPER["img_dim"], generator=g).abs()
    ids, lengths = random_captions(n_captions, PAPER["vocab_size"], g, min_len, max_len)
    return feats, ids, lengths


@torch.inference_mode()
def bench_model(
    name: str,
    n_images: int,
    n_captions: int,
    image_block: int | None,
    caption_block: int | None,
    baselines: bool,
    repeat: int,
    ref_image_block: int = 100,
    tile: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """One model's row: fast-path pairs/s and, for SGR and SAF (``baselines``), both baselines'."""
    torch.manual_seed(0)
    model = create(name, **PAPER).eval()
    if tile is not None:  # fast-path tile override (images, captions); default: the model's own choice
        model.tile_images, model.tile_captions = tile
    feats, ids, lengths = make_inputs(n_images, n_captions)
    img = model.encode_images(feats)
    txt = model.encode_texts(ids, lengths)
    pref = model.preferred_block() if hasattr(model, "preferred_block") else (n_images, n_captions)
    image_block = image_block or pref[0]
    caption_block = caption_block or pref[1]

    def variants(txt: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
        n_cap = txt["words"].shape[0]

        def fast() -> torch.Tensor:
            cols = []
            for c0 in range(0, n_cap, caption_block):
                t = select(txt, slice(c0, c0 + caption_block))
                rows = [model.score(select(img, slice(i0, i0 + image_block)), t) for i0 in range(0, n_images, image_block)]
                cols.append(torch.cat(rows, 0))
            return torch.cat(cols, 1)

        def per_image_block(fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
            # The official evaluation's shard shape: blocks of ref_image_block images, one caption at a time.
            return lambda: torch.cat([
                fn(model, img["regions"][i0 : i0 + ref_image_block], txt["words"], txt["lengths"])
                for i0 in range(0, n_images, ref_image_block)
            ], 0)

        fns: dict[str, Callable[[], torch.Tensor]] = {"fast": fast}
        if baselines:
            fns["official"] = per_image_block(official_style_similarity)
            fns["lean"] = per_image_block(reference_similarity)
        return fns

    fns = variants(txt)
    outputs = {k: fn() for k, fn in fns.items()}  # warm-up round, and the outputs compared below
    seconds = time_round_robin(fns, repeat)
    # Working memory does not grow with the caption count (tiles, or one caption at a time), so it
    # is read on the first 64 captions: profiling every allocation of the full run costs minutes.
    peak_mib = {k: peak_tensor_mb(fn) for k, fn in variants(select(txt, slice(0, 64))).items()}
    pairs = n_images * n_captions
    mean_len = float(lengths.float().mean())
    row: dict[str, Any] = {
        "model": name,
        "pairs": pairs,
        "mean_len": mean_len,
        "seconds": seconds["fast"],
        "pairs_per_s": pairs / seconds["fast"],
        "flops_per_pair": FLOPS[name](n=mean_len),
        "image_block": image_block,
        "caption_block": caption_block,
        "tile": list(tile) if tile else None,
        "peak_mib": peak_mib["fast"],
    }
    row["gflops"] = row["flops_per_pair"] * row["pairs_per_s"] / 1e9
    if baselines:
        # The baselines compute the official algorithm: SGR's graph steps unfolded, on every node.
        row["ref_flops_per_pair"] = FLOPS[name](n=mean_len, folded=False) if name == "sgr" else row["flops_per_pair"]
        for key in ("official", "lean"):
            row[f"{key}_pairs_per_s"] = pairs / seconds[key]
            row[f"{key}_gflops"] = row["ref_flops_per_pair"] * row[f"{key}_pairs_per_s"] / 1e9
            row[f"speedup_vs_{key}"] = row["pairs_per_s"] / row[f"{key}_pairs_per_s"]
            row[f"{key}_peak_mib"] = peak_mib[key]
        row["max_abs_diff"] = max(float((outputs["fast"] - outputs[k]).abs().max()) for k in ("official", "lean"))
    elif hasattr(model, "use_fast_path"):  # no per-caption baseline: check against the plain vectorised path
        model.use_fast_path = False
        row["max_abs_diff"] = float((outputs["fast"] - fns["fast"]()).abs().max())
        model.use_fast_path = True
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=positive_int, default=100)
    p.add_argument("--captions", type=positive_int, default=256,
                   help="captions (256: the fast path's length-sorted tiles are as uniform as in a full evaluation)")
    p.add_argument("--image-block", type=positive_int, default=None, help="fast path images per score call (model's preferred_block)")
    p.add_argument("--caption-block", type=positive_int, default=None, help="fast path captions per score call (preferred_block)")
    p.add_argument("--ref-image-block", type=positive_int, default=100, help="baselines: images per call (official shard)")
    p.add_argument("--repeat", type=positive_int, default=2, help="timed rounds after the warm-up round")
    p.add_argument("--threads", type=non_negative_int, default=1,
                   help="torch threads for every timing incl. the peak (0 = torch's default)")
    p.add_argument("--models", nargs="+", default=["sgr", "saf", "tshsr"])
    p.add_argument("--tile", default=None, metavar="IxC",
                   help="fast-path tile, images x captions (e.g. 16x32; default: each model's own choice)")
    args = p.parse_args(argv)
    tile = None
    if args.tile:
        try:
            tile = tuple(int(x) for x in args.tile.lower().split("x"))
            assert len(tile) == 2 and min(tile) > 0
        except (ValueError, AssertionError):
            p.error(f"--tile expects IMAGESxCAPTIONS such as 16x32, got {args.tile!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    peak_before = matmul_peak_gflops()
    rows = [
        bench_model(
            name, args.images, args.captions, args.image_block, args.caption_block,
            baselines=name in ("sgr", "saf"), repeat=args.repeat, ref_image_block=args.ref_image_block, tile=tile,
        )
        for name in args.models
    ]
    # The peak is measured before and after the models: a shared machine's speed drifts, and the
    # higher of the two keeps the fractions conservative.
    peak_after = matmul_peak_gflops()
    peak = max(peak_before, peak_after)
    sgr = next((r for r in rows if r["model"] == "sgr"), None)
    for row in rows:
        row["fraction_of_peak"] = row["gflops"] / peak
        if "official_gflops" in row:
            row["official_fraction_of_peak"] = row["official_gflops"] / peak
        if sgr is not None:
            row["vs_official_sgr"] = row["pairs_per_s"] / sgr["official_pairs_per_s"]
            row["vs_lean_sgr"] = row["pairs_per_s"] / sgr["lean_pairs_per_s"]
    load = (load_before, os.getloadavg())
    print(f"fp32 matmul peak (2048^3 GEMM, {torch.get_num_threads()} threads): {peak_before:.1f} GFLOP/s before, "
          f"{peak_after:.1f} after; load average before {load[0][0]:.1f}, after {load[1][0]:.1f}; "
          f"{args.images} images x {args.captions} captions")
    print(format_table(rows, [
        ("model", "model", "s"),
        ("pairs_per_s", "pairs/s", ".0f"),
        ("official_pairs_per_s", "official-style pairs/s", ".0f"),
        ("speedup_vs_official", "x official", ".2f"),
        ("lean_pairs_per_s", "lean pairs/s", ".0f"),
        ("speedup_vs_lean", "x lean", ".2f"),
        ("vs_official_sgr", "x official SGR", ".2f"),
        ("vs_lean_sgr", "x lean SGR", ".2f"),
        ("flops_per_pair", "FLOP/pair", ".3e"),
        ("gflops", "GFLOP/s", ".1f"),
        ("fraction_of_peak", "of peak", ".1%"),
        ("official_fraction_of_peak", "official of peak", ".1%"),
        ("peak_mib", "peak MiB", ".1f"),
        ("official_peak_mib", "official peak MiB", ".1f"),
        ("lean_peak_mib", "lean peak MiB", ".1f"),
        ("max_abs_diff", "max |diff|", ".1e"),
    ]))
    result = {"matmul_peak_gflops": peak, "matmul_peak_gflops_before_after": [peak_before, peak_after],
              "load_average": load, "config": vars(args), "rows": rows}
    save_results("scoring", result)
    return result


if __name__ == "__main__":
    main()
