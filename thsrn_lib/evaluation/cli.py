"""``thsrn eval``: evaluate one checkpoint (or an ensemble of several) under a retrieval protocol.

Examples::

    thsrn eval --checkpoint runs/tshsr --data data/f30k_precomp --protocol f30k --out results/tshsr_f30k
    thsrn eval --checkpoint sgr.pt --checkpoint saf.pt --data data/coco_precomp --protocol coco1k
    thsrn eval --checkpoint runs/sgr --data data/scenes --protocol scenes --two-stage 10 20 50
    torchrun --nproc_per_node=4 -m thsrn_lib eval --checkpoint sgr.pt --data data/coco_precomp --protocol coco5k

Errors in the arguments or the data end with one message and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..utils.argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from .protocols import PROTOCOLS

__all__ = ["add_arguments", "main"]




def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``thsrn eval`` (every one documented in ``--help``)."""
    protocols = "\n".join(f"  {p.name:<8} {p.description} (split {p.default_split!r})" for p in PROTOCOLS.values())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "protocols:\n" + protocols + "\n\n"
        "metrics: R@1/5/10, medr, meanr for image->text and text->image, and rsum (the sum of the six\n"
        "recalls); ties are broken by ascending candidate index.\n\n"
        "scale-out: torchrun --nproc_per_node=N -m thsrn_lib eval ... splits the image rows across ranks.\n"
        "exit status: 0 done, 2 bad arguments, data or checkpoint (one-line message)."
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="CKPT",
        help="checkpoint file or run folder (its best checkpoint); repeat to evaluate the average of several "
        "models' scores (an ensemble, e.g. SGR + SAF = SGRAF)",
    )
    parser.add_argument(
        "--data", required=True, metavar="ROOT", help="folder with {split}_ims.npy and {split}_caps.txt"
    )
    parser.add_argument(
        "--split",
        default=None,
        help="split to evaluate (default: the protocol's split: test, testall or dev)",
    )
    parser.add_argument(
        "--protocol",
        default="generic",
        choices=list(PROTOCOLS),
        help="retrieval protocol (default: generic); f30k and coco1k/coco5k check the exact matrix size",
    )
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="write sims.npy and metrics.json (and two_stage.json) here"
    )
    parser.add_argument(
        "--vocab",
        default=None,
        metavar="JSON",
        help="vocab JSON to tokenize with (default: the one stored in the checkpoint, else found beside the data)",
    )
    parser.add_argument(
        "--weights",
        type=non_negative_float,
        nargs="+",
        default=None,
        metavar="W",
        help="ensemble weights, one per --checkpoint (default: equal)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=128, help="images/captions per encoding batch (default 128)"
    )
    parser.add_argument(
        "--shard-images",
        type=positive_int,
        default=None,
        metavar="N",
        help="images per scoring block (default: chosen from --memory-budget-mb)",
    )
    parser.add_argument(
        "--shard-captions",
        type=positive_int,
        default=None,
        metavar="N",
        help="captions per scoring block (default: chosen from --memory-budget-mb)",
    )
    parser.add_argument(
        "--memory-budget-mb",
        type=positive_float,
        default=1024.0,
        metavar="MB",
        help="extra memory one scoring block may use, in MiB (default 1024); the per-pair cost is estimated "
        "from the model's embeddings",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N (default auto)",
    )
    parser.add_argument(
        "--num-workers", type=non_negative_int, default=0, help="DataLoader workers for image features (default 0)"
    )
    parser.add_argument(
        "--memmap",
        action="store_true",
        help="build the similarity matrix directly in --out/sims.npy through a memory map "
        "(for matrices larger than RAM)",
    )
    parser.add_argument(
        "--two-stage",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="K",
        help="also run two-stage retrieval with these shortlist sizes (e.g. 10 20 50) and report recall and time "
        "against full scoring",
    )
    parser.add_argument(
        "--first-stage",
        default=None,
        metavar="CKPT",
        help="embedding-model checkpoint (e.g. HJE) that shortlists for --two-stage (default: the global vectors "
        "of the evaluated model)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _resolve_device(text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise ConfigError(f"--device {text!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def _init_distributed(device):
    """Join the torchrun process group when launched by torchrun; returns (device, started_here)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, True


def _load_models(paths: list[str], device) -> list[Any]:
    from ..checkpoint import load_model

    return [load_model(p, device) for p in paths]


def _choose_vocab(loaded: list[Any], vocab_arg: str | None, data: Path):
    from ..data import Vocab, find_vocab

    if vocab_arg is not None:
        return Vocab.load(vocab_arg)
    stored = [lm.vocab for lm in loaded if lm.vocab is not None]
    for lm in loaded[1:]:
        if lm.vocab is not None and stored and lm.vocab != stored[0]:
            raise ConfigError(
                f"the checkpoints were trained with different vocabularies ({loaded[0].info.get('path')} vs "
                f"{lm.info.get('path')}); an ensemble needs models that read the same token ids"
            )
    if stored:
        return stored[0]
    return Vocab.load(find_vocab(data))


def main(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..data import PrecompDataset
    from .engine import evaluate
    from .metrics import format_metrics_table
    from .protocols import get_protocol
    from .two_stage import two_stage_retrieval

    protocol = get_protocol(args.protocol)
    split = args.split or protocol.default_split
    if args.weights is not None and len(args.weights) != len(args.checkpoint):
        raise ConfigError(
            f"--weights got {len(args.weights)} value(s) for {len(args.checkpoint)} --checkpoint(s); "
            "give one per checkpoint"
        )
    if args.first_stage is not None and not args.two_stage:
        raise ConfigError("--first-stage only applies with --two-stage K [K ...]")
    if args.two_stage and protocol.folds > 1:
        raise ConfigError(
            f"--two-stage scores one matrix; protocol {protocol.name} averages {protocol.folds} folds. "
            "Use --protocol coco5k (or generic) for two-stage retrieval"
        )
    if args.memmap and args.out is None:
        raise ConfigError("--memmap writes the matrix into --out/sims.npy: give --out DIR")
    data = Path(args.data)
    device = _resolve_device(args.device)
    device, started = _init_distributed(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        loaded = _load_models(args.checkpoint, device)
        vocab = _choose_vocab(loaded, args.vocab, data)
        dataset = PrecompDataset(data, split, vocab)
        models = [lm.model for lm in loaded]
        metadata = {
            "checkpoints": [lm.info.get("path") for lm in loaded],
            "checkpoint_info": [
                {
                    k: lm.info.get(k)
                    for k in ("model_name", "epoch", "step", "best_rsum", "library_version")
                    if k in lm.info
                }
                for lm in loaded
            ],
        }
        result = evaluate(
            models if len(models) > 1 else models[0],
            dataset,
            protocol,
            batch_size=args.batch_size,
            image_shard=args.shard_images,
            caption_shard=args.shard_captions,
            memory_budget_mb=args.memory_budget_mb,
            device=device,
            progress=not args.no_progress and rank == 0,
            out_dir=args.out,
            memmap=args.memmap,
            num_workers=args.num_workers,
            ensemble_weights=args.weights,
            metadata=metadata,
        )
        if rank == 0:
            _print_result(result, dataset, split, format_metrics_table)
        if args.two_stage and rank == 0:  # two-stage retrieval is a single-process analysis
            first = _load_models([args.first_stage], device)[0].model if args.first_stage else None
            model = result_model(models, args.weights)
            ts = two_stage_retrieval(
                model,
                dataset,
                first,
                args.two_stage,
                batch_size=args.batch_size,
                device=device,
                progress=not args.no_progress,
                full_sims=result.sims,
                memory_budget_mb=args.memory_budget_mb,
            )
            if ts.full is not None and ts.full["seconds"] is None:
                ts.full["seconds"] = result.info["timing"]["score_s"]
            print(
                f"\ntwo-stage retrieval (first stage: {ts.first_stage}; a pair shortlisted in both directions is "
                "scored once; seconds exclude encoding, which both methods share)"
            )
            print(ts.table())
            if args.out is not None:
                from ..utils.io import atomic_write_json

                atomic_write_json(Path(args.out) / "two_stage.json", ts.to_dict())
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def result_model(models: list[Any], weights: list[float] | None):
    """The model that was evaluated: the single model or the ensemble of the list."""
    if len(models) == 1:
        return models[0]
    from .engine import make_ensemble

    return make_ensemble(models, weights)


def _print_result(result: Any, dataset: Any, split: str, fmt) -> None:
    info = result.info
    title = (
        f"{info['model']['name']} | protocol {result.protocol} ({info['protocol_description']}) | "
        f"{dataset.root} split {split!r}: {dataset.n_images:,} images x {dataset.n_captions:,} captions"
    )
    print(fmt(result.metrics, title=title))
    folds = info.get("folds")
    if folds:
        print("per-fold rsum: " + ", ".join(f"{m['rsum']:.2f}" for m in folds) + " (the table shows their means)")
    also = info.get("also", {}).get("coco1k")
    if also:
        print(fmt(also, title="COCO 1K from the same 5K matrix (5 diagonal blocks, averaged)"))
    t = info["timing"]
    pps = f", {t['pairs_per_s']:,.0f} pairs/s" if t.get("pairs_per_s") else ""
    print(
        f"scored {info['pairs_scored']:,} pairs in blocks of {info['shards']['image_shard']} x "
        f"{info['shards']['caption_shard']} on {info['device']}: "
        f"encode {t['encode_images_s'] + t['encode_texts_s']:.2f} s, "
        f"score {t['score_s']:.2f} s{pps}, total {t['total_s']:.2f} s"
    )
    if "files" in info:
        print(f"wrote {info['files']['sims']} and {info['files']['metrics']}")
