"""``thsrn train``: train a model from a YAML recipe (see ``configs/`` and ``docs/training.md``)."""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from ..errors import ConfigError
from .config import AMP_CHOICES, option_help

__all__ = ["add_arguments", "main"]

_EXAMPLES = """\
examples:
  thsrn train --config configs/scenes_demo_tshsr.yaml
  thsrn train --config configs/scenes_demo_sgr.yaml optim.epochs=3 run.seed=1
  thsrn train --config configs/f30k_tshsr.yaml --resume          # continue after a crash or kill
  torchrun --nproc_per_node=4 -m thsrn_lib.train --config configs/coco_sgr.yaml   # multi-GPU (DDP)

outputs in run.output_dir: checkpoint_last.pt, checkpoint_best.pt, metrics.jsonl, config.yaml
exit status: 0 done, 2 bad arguments/data/checkpoint (one-line message), 130 interrupted (checkpoint saved)
"""


def _epilog() -> str:
    lines = [
        "recipe keys (set in the YAML file or as KEY=VALUE overrides; values are YAML):",
        "  model",
        "      registry name: tshsr, sgr, saf, shan or hje",
        "  model_config.<option>",
        "      any option of the model's config dataclass; vocab_size, img_dim and",
        "      num_regions are filled from the data unless set (then they must agree)",
    ]
    for key, help_text, default in option_help():
        if default is None:
            shown = "null"
        elif isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, str):
            shown = repr(default)
        else:
            shown = str(default)
        lines.append(f"  {key} (default: {shown})")
        lines += [f"      {w}" for w in textwrap.wrap(help_text, 72)]
    return "\n".join(lines) + "\n\n" + _EXAMPLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``thsrn train`` (every one is also a recipe key; see the epilog)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = textwrap.fill(
        "Train an image-text matching model from a YAML recipe. Validation on the dev split after every "
        "epoch selects checkpoint_best.pt by rsum; checkpoint_last.pt allows exact resumption."
    )
    parser.epilog = _epilog()
    parser.add_argument("--config", required=True, metavar="PATH", help="YAML recipe, e.g. configs/scenes_demo_tshsr.yaml")
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from OUTPUT_DIR/checkpoint_last.pt (weights, optimizer, schedule, RNG, data position)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start from scratch even if OUTPUT_DIR already holds a run (deletes its checkpoints and metrics)",
    )
    parser.add_argument("--output-dir", metavar="DIR", help="= run.output_dir (default: runs/<recipe name>)")
    parser.add_argument("--device", metavar="DEV", help="= run.device: auto, cpu, cuda or cuda:K")
    parser.add_argument("--amp", choices=AMP_CHOICES, help="= run.amp: mixed precision (auto = bf16/fp16 on CUDA, off on CPU)")
    parser.add_argument("--seed", type=int, metavar="N", help="= run.seed")
    parser.add_argument("--max-steps", type=int, metavar="N", help="= run.max_steps: stop after N optimiser steps in total")
    parser.add_argument("--no-progress", action="store_true", help="= run.progress=false: no progress bar (print log lines)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="recipe overrides, e.g. optim.lr=1e-3 model_config.sim_dim=64 data.root=data/scenes/demo",
    )


def main(args: argparse.Namespace) -> int:
    from .config import TrainConfig

    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    # Flags are applied as typed values, not re-parsed YAML, so any path works as --output-dir.
    if args.output_dir is not None:
        cfg.run.output_dir = str(Path(args.output_dir))
    for attr in ("device", "amp", "seed", "max_steps"):
        value = getattr(args, attr)
        if value is not None:
            setattr(cfg.run, attr, value)
    if args.no_progress:
        cfg.run.progress = False
    cfg.validate()
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0

    import torch

    from .trainer import TrainingError, train

    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(
            f"out of GPU memory with optim.batch_size={cfg.optim.batch_size}; lower it, use --amp bf16/fp16, or "
            f"shrink the model (model_config); resume from {Path(cfg.run.output_dir) / 'checkpoint_last.pt'} "
            "if one was written"
        ) from None
    if result.is_main:
        if result.best_rsum is not None:
            print(f"best dev rsum {result.best_rsum:.2f} at epoch {result.best_epoch}: {result.best_checkpoint}")
        print(f"last checkpoint (step {result.step}): {result.last_checkpoint}")
    return 130 if result.interrupted else 0
