"""Scoring throughput at the papers' sizes: vectorised paths vs. the per-caption reference.

The reference is the official algorithm written as the official code runs it: one caption at a
time against a block of images (``thsrn_lib.models.sgraf.reference_similarity``). Both paths get
the same encoded embeddings, so only the scoring (the cost centre of cross-attention models) is
timed. Scores are checked equal (atol 1e-5) in the same run.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from thsrn_lib.models import create, select
from thsrn_lib.models.sgraf import reference_similarity

from .common import format_table, matmul_peak_gflops, random_captions, save_results, time_call
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
    reference: bool,
    repeat: int,
    ref_image_block: int = 100,
    tile: tuple[int, int] | None = None,
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create(name, **PAPER).eval()
    if tile is not None:  # fast-path tile override (images, captions); default: the model's own choice
        model.tile_images, model.tile_captions = tile
    feats, ids, lengths = make_inputs(n_images, n_captions)
    img = model.encode_images(feats)
    txt = model.encode_texts(ids, lengths)
    mean_len = float(lengths.float().mean())
    pref = model.preferred_block() if hasattr(model, "preferred_block") else (n_images, n_captions)
    image_block = image_block or pref[0]
    caption_block = caption_block or pref[1]

    def vectorised() -> torch.Tensor:
        cols = []
        for c0 in range(0, n_captions, caption_block):
            t = select(txt, slice(c0, c0 + caption_block))
            rows = [model.score(select(img, slice(i0, i0 + image_block)), t) for i0 in range(0, n_images, image_block)]
            cols.append(torch.cat(rows, 0))
        return torch.cat(cols, 1)

    fast = vectorised()
    seconds = time_call(vectorised, repeat=repeat, warmup=1)
    pairs = n_images * n_captions
    row: dict[str, Any] = {
        "model": name,
        "pairs": pairs,
        "mean_len": mean_len,
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "flops_per_pair": FLOPS[name](n=mean_len),
        "image_block": image_block,
        "caption_block": caption_block,
        "tile": list(tile) if tile else None,
    }
    row["gflops"] = row["flops_per_pair"] * row["pairs_per_s"] / 1e9
    if reference:
        def ref() -> torch.Tensor:
            # The official evaluation's shard shape: blocks of ref_image_block images, per caption.
            return torch.cat([
                reference_similarity(model, img["regions"][i0 : i0 + ref_image_block], txt["words"], txt["lengths"])
                for i0 in range(0, n_images, ref_image_block)
            ], 0)

        slow = ref()
        ref_seconds = time_call(ref, repeat=max(1, repeat - 1), warmup=0)
        row["ref_pairs_per_s"] = pairs / ref_seconds
        row["speedup"] = row["pairs_per_s"] / row["ref_pairs_per_s"]
        row["max_abs_diff"] = float((fast - slow).abs().max())
        row["ref_flops_per_pair"] = FLOPS[name](n=mean_len, folded=False) if name == "sgr" else row["flops_per_pair"]
    elif hasattr(model, "use_fast_path"):  # no per-caption reference: check against the plain vectorised path
        model.use_fast_path = False
        row["max_abs_diff"] = float((fast - vectorised()).abs().max())
        model.use_fast_path = True
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--captions", type=int, default=64)
    p.add_argument("--image-block", type=int, default=None, help="fast path images per score call (model's preferred_block)")
    p.add_argument("--caption-block", type=int, default=None, help="fast path captions per score call (preferred_block)")
    p.add_argument("--ref-image-block", type=int, default=100, help="per-caption reference: images per call (official shard)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for every timing incl. the peak (1: on a shared, oversubscribed machine "
                        "multi-threaded kernels stall at their barriers; 0 = torch's default)")
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

    peak = matmul_peak_gflops()
    rows = []
    ref_sgr = None
    for name in args.models:
        row = bench_model(
            name, args.images, args.captions, args.image_block, args.caption_block,
            reference=name in ("sgr", "saf"), repeat=args.repeat, ref_image_block=args.ref_image_block, tile=tile,
        )
        if name == "sgr":
            ref_sgr = row["ref_pairs_per_s"]
        row["fraction_of_peak"] = row["gflops"] / peak
        rows.append(row)
    for row in rows:
        if ref_sgr is not None:
            row["vs_ref_sgr"] = row["pairs_per_s"] / ref_sgr
    load = (load_before, os.getloadavg())
    print(f"fp32 matmul peak (2048^3 GEMM, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s; "
          f"load average before {load[0][0]:.1f}, after {load[1][0]:.1f}")
    print(format_table(rows, [
        ("model", "model", "s"),
        ("pairs_per_s", "pairs/s", ".0f"),
        ("ref_pairs_per_s", "per-caption ref pairs/s", ".0f"),
        ("speedup", "speedup", ".2f"),
        ("vs_ref_sgr", "vs per-caption SGR", ".2f"),
        ("flops_per_pair", "FLOP/pair", ".3e"),
        ("gflops", "GFLOP/s", ".1f"),
        ("fraction_of_peak", "of peak", ".1%"),
        ("max_abs_diff", "max |fast-ref|", ".1e"),
    ]))
    result = {"matmul_peak_gflops": peak, "load_average": load, "config": vars(args), "rows": rows}
    save_results("scoring", result)
    return result


if __name__ == "__main__":
    main()
