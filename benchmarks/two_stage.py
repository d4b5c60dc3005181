"""Two-stage retrieval on the Scenes demo test split: pairs scored and recall lost per shortlist size.

Stage 1 shortlists with an embedding model's fixed vectors (HJE by default; ``--first-stage
none`` uses the re-ranking model's own global vectors), stage 2 re-ranks the shortlist with a
cross-attention model; full scoring of every pair is run in the same call for the recall loss.
Needs the demo checkpoints and data of ``make demo`` (``runs/scenes_demo_*``, ``data/scenes/demo``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from thsrn_lib.checkpoint import load_model
from thsrn_lib.data import PrecompDataset
from thsrn_lib.errors import ConfigError
from thsrn_lib.evaluation.two_stage import two_stage_retrieval
from thsrn_lib.utils.argtypes import non_negative_int, positive_int

from .common import save_results

ROOT = Path(__file__).resolve().parent.parent


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{what} {path} not found: run `make demo` first (it trains the demo models), "
                          "or pass its location explicitly (see --help)")
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT / "data" / "scenes" / "demo"), help="Scenes (or SCAN) data folder")
    p.add_argument("--split", default="test")
    p.add_argument("--rerank", default=str(ROOT / "runs" / "scenes_demo_sgr"), help="re-ranking checkpoint or run")
    p.add_argument("--first-stage", default=str(ROOT / "runs" / "scenes_demo_hje"),
                   help="embedding-model checkpoint or run for the shortlist; 'none': the re-ranker's global vectors")
    p.add_argument("--ks", type=positive_int, nargs="+", default=[10, 20, 40, 50])
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rerank = load_model(_require(Path(args.rerank), "re-ranking checkpoint"))
    first = None
    if args.first_stage.lower() != "none":
        first = load_model(_require(Path(args.first_stage), "first-stage checkpoint")).model
    if rerank.vocab is None:
        raise ConfigError(f"{args.rerank} holds no vocabulary; re-train it with this library version")
    dataset = PrecompDataset(_require(Path(args.data), "data folder"), args.split, rerank.vocab)
    result = two_stage_retrieval(rerank.model, dataset, first, args.ks, compare_full=True)
    print(f"re-rank: {rerank.model_name} ({args.rerank}); first stage: {result.first_stage}; "
          f"{result.n_images} images x {result.n_captions} captions, {torch.get_num_threads()} threads")
    print(result.table())
    data = {"config": vars(args), "result": result.to_dict()}
    save_results("two_stage", data)
    return data


if __name__ == "__main__":
    main()
