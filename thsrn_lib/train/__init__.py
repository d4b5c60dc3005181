"""Training: YAML recipes, the trainer, checkpoints and multi-GPU runs.

>>> from thsrn_lib.train import TrainConfig, train            # doctest: +SKIP
>>> cfg = TrainConfig.from_yaml("configs/scenes_demo_tshsr.yaml", ["optim.epochs=2"])  # doctest: +SKIP
>>> result = train(cfg)                                        # doctest: +SKIP
>>> result.best_checkpoint, result.best_rsum                   # doctest: +SKIP

Command line: ``thsrn train --config configs/....yaml [--resume] [key=value ...]``;
multi-GPU: ``torchrun --nproc_per_node=N -m thsrn_lib.train --config ...``.
Names are imported on first use, so ``thsrn --help`` does not load torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "TrainConfig",
    "DataConfig",
    "OptimConfig",
    "RunConfig",
    "Trainer",
    "TrainResult",
    "TrainingError",
    "train",
    "EpochBatchSampler",
]

_WHERE = {
    "TrainConfig": "config",
    "DataConfig": "config",
    "OptimConfig": "config",
    "RunConfig": "config",
    "Trainer": "trainer",
    "TrainResult": "trainer",
    "TrainingError": "trainer",
    "train": "trainer",
    "EpochBatchSampler": "distributed",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
