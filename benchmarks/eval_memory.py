"""Peak memory of evaluation on a COCO-5K-shaped problem, for two shard sizes.

Problem: 5,000 images x 36 x 2,048 float32 features (a memory-mapped ``testall_ims.npy``,
1.47 GB on disk) and 25,000 captions (the real COCO ``testall`` captions when ``../shared`` is
present, else synthetic ones of the same length profile), an SGR model at the paper's sizes.

Each shard size runs in a fresh subprocess so that its peak RSS is its own. The run does
everything a full evaluation holds in memory at once -- every image embedded once, every caption
embedded once (length-bucketed), the full 5,000 x 25,000 float32 result matrix resident -- and
then scores ``--blocks`` blocks of ``image_shard x caption_shard`` pairs (scoring all 125 M pairs
would take hours on a CPU and adds no memory: each block reuses the same working set). Reported:
the peak RSS, its parts, and the peak increase during scoring, which is what the shard size bounds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import format_table, save_results

REPO = Path(__file__).resolve().parents[1]
SHARED_COCO = REPO.parent / "shared" / "data" / "scan_captions"


def build_problem(root: Path, n_images: int = 5000, seed: int = 0) -> Path:
    """Write ``testall_ims.npy`` (memory-mapped, chunked) + captions + vocab into ``root``."""
    from thsrn_lib.data import Vocab

    root.mkdir(parents=True, exist_ok=True)
    ims = np.lib.format.open_memmap(root / "testall_ims.npy", mode="w+", dtype=np.float32, shape=(n_images, 36, 2048))
    rng = np.random.default_rng(seed)
    for i0 in range(0, n_images, 250):
        ims[i0 : i0 + 250] = rng.random((min(250, n_images - i0), 36, 2048), dtype=np.float32)
    ims.flush()
    del ims
    real = SHARED_COCO / "coco_precomp" / "testall_caps.txt"
    if real.is_file() and n_images == 5000:
        captions = real.read_text(encoding="utf-8").splitlines()
        vocab = Vocab.load(SHARED_COCO / "vocab" / "coco_precomp_vocab.json")
        source = str(real)
    else:
        words = [f"w{k}" for k in range(2000)]
        lengths = rng.integers(8, 22, size=5 * n_images)
        captions = [" ".join(rng.choice(words, size=int(n))) + " ." for n in lengths]
        vocab = Vocab.build(captions, min_count=1)
        source = "synthetic"
    (root / "testall_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    vocab.save(root / "vocab.json")
    (root / "source.txt").write_text(source)
    return root


def child(root: str, image_shard: int, caption_shard: int, blocks: int) -> dict[str, Any]:
    """Runs in a fresh process: the measurement for one shard size."""
    import torch

    from thsrn_lib.data import PrecompDataset, Vocab
    from thsrn_lib.evaluation.engine import encode_images, encode_texts, score_matrix
    from thsrn_lib.models import create

    from .common import peak_rss_mb

    torch.manual_seed(0)
    vocab = Vocab.load(Path(root) / "vocab.json")
    ds = PrecompDataset(root, "testall", vocab, check_finite="none")
    model = create("sgr", vocab_size=len(vocab), img_dim=2048, num_regions=36).eval()
    mem = {"start_mb": peak_rss_mb()}
    t0 = time.perf_counter()
    img = encode_images(model, ds, batch_size=250)
    mem["after_images_mb"] = peak_rss_mb()
    shards = encode_texts(model, ds, batch_size=500, shard_size=caption_shard)
    mem["after_captions_mb"] = peak_rss_mb()
    encode_s = time.perf_counter() - t0
    out = np.zeros((ds.n_images, ds.n_captions), dtype=np.float32)
    out.fill(0.0)  # make the whole result matrix resident, as a full evaluation does
    mem["after_matrix_mb"] = peak_rss_mb()
    # Score `blocks` blocks: the first image shard against the first caption shards.
    rows = slice(0, image_shard)
    from thsrn_lib.models import select

    n_cols, chosen = 0, []
    for s in shards:
        chosen.append(s)
        n_cols += len(s)
        if n_cols >= blocks * caption_shard:
            break
    # The chosen shards' captions sit anywhere in the 25,000 columns: score them as columns 0..n-1
    # of a block, then write the block into their columns of the resident matrix.
    from dataclasses import replace

    starts = np.cumsum([0] + [len(s) for s in chosen])
    local = [replace(s, position=torch.arange(a, a + len(s))) for s, a in zip(chosen, starts)]
    t1 = time.perf_counter()
    block = score_matrix(model, select(img, rows), local, image_shard, caption_shard)
    out[rows, np.concatenate([s.position.numpy() for s in chosen])] = block
    score_s = time.perf_counter() - t1
    mem["peak_mb"] = peak_rss_mb()
    pairs = image_shard * min(n_cols, blocks * caption_shard)
    return {
        "image_shard": image_shard,
        "caption_shard": caption_shard,
        **mem,
        "scoring_increase_mb": mem["peak_mb"] - mem["after_matrix_mb"],
        "encode_seconds": encode_s,
        "scored_pairs": pairs,
        "scoring_pairs_per_s": pairs / score_s,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", type=Path, default=None, help="reuse a problem folder (default: a temp dir)")
    p.add_argument("--shards", nargs="+", default=["32x128", "128x512"], help="IMAGESxCAPTIONS block sizes")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--child", nargs=4, metavar=("ROOT", "IMG", "CAP", "BLOCKS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        root, i, c, b = args.child
        print(json.dumps(child(root, int(i), int(c), int(b))))
        return {}
    tmp = None
    if args.root is None:
        tmp = tempfile.TemporaryDirectory(prefix="thsrn-coco5k-")
        args.root = Path(tmp.name)
    if not (args.root / "testall_ims.npy").is_file():
        print(f"writing a COCO-5K-shaped problem to {args.root} ...", flush=True)
        build_problem(args.root)
    rows = []
    for spec in args.shards:
        i, c = (int(x) for x in spec.lower().split("x"))
        cmd = [sys.executable, "-m", "benchmarks.eval_memory", "--child", str(args.root), str(i), str(c), str(args.blocks)]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"eval_memory child failed for {spec}:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(format_table(rows, [
        ("image_shard", "img shard", "d"),
        ("caption_shard", "cap shard", "d"),
        ("after_images_mb", "RSS imgs MiB", ".0f"),
        ("after_captions_mb", "+caps MiB", ".0f"),
        ("after_matrix_mb", "+matrix MiB", ".0f"),
        ("peak_mb", "peak MiB", ".0f"),
        ("scoring_increase_mb", "scoring +MiB", ".0f"),
        ("scoring_pairs_per_s", "pairs/s", ".0f"),
    ]))
    result = {"source": (args.root / "source.txt").read_text(), "rows": rows}
    save_results("eval_memory", result)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
