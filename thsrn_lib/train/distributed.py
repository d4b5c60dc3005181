"""Process groups for ``torchrun`` and the deterministic, resumable batch order of every process.

``torchrun --nproc_per_node=N -m thsrn_lib.train ...`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set; :func:`init_distributed` joins them into one group
(NCCL when training on GPUs, gloo on the CPU). A plain ``python -m thsrn_lib.train`` is a
group of one and needs no process group at all.

:class:`EpochBatchSampler` decides the batches: epoch ``e`` shuffles the training items with a
generator seeded from ``(seed, e)`` only, so the order never depends on what happened before
(an interrupted run replays it exactly), and process ``r`` of ``W`` takes every ``W``-th item
of that permutation. Resuming mid-epoch skips the batches already done by index, without
reading their data.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..utils.seed import derive_seed

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "barrier", "all_gather_objects", "EpochBatchSampler"]

# Rank 0 validates while the others wait in a barrier; allow slow validations on big dev sets.
_GROUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the training group (a group of one without ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that validates and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the ``torchrun`` process group if ``WORLD_SIZE > 1``; otherwise return a group of one.

    ``device``: the run's device setting. GPUs (``auto`` with CUDA present, or ``cuda``) use NCCL
    and pin process ``LOCAL_RANK`` to ``cuda:LOCAL_RANK``; the CPU uses gloo.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    spec = device.lower()
    if spec.startswith("cuda:"):
        raise ConfigError(
            f"run.device={device!r} names one GPU, but under torchrun every process takes its own GPU "
            "(cuda:LOCAL_RANK); use run.device=cuda or auto"
        )
    use_cuda = spec != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                "lower --nproc_per_node"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        # Binding the group to this process's GPU lets NCCL barriers know their device.
        extra = {"device_id": torch.device("cuda", local_rank)} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=_GROUP_TIMEOUT, **extra)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def cleanup_distributed(info: DistInfo) -> None:
    """Leave the process group (no-op for a group of one)."""
    if info.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (just ``[obj]`` for a group of one)."""
    if not info.is_distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class EpochBatchSampler:
    """Batches of item indices for one process; a ``batch_sampler`` for ``DataLoader``.

    Args:
        num_items: size of the training set (captions).
        batch_size: items per batch for this process.
        seed: the run seed; epoch ``e``'s permutation comes from ``derive_seed(seed, e)``.
        rank, world_size: this process's shard. Every process gets the same number of batches
            (the permutation is cut to a multiple of ``world_size``), so collective ops stay in step.
        min_batch: a final batch smaller than this is dropped (BatchNorm and in-batch negatives
            need at least 2 items).
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, min_batch: int = 2
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if num_items // world_size < min_batch:
            raise ConfigError(
                f"the training set has {num_items} items, too few for {world_size} process(es) with batches of >= {min_batch}"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.min_batch = rank, world_size, min_batch
        self.epoch, self.start_batch = 0, 0

    def shard(self, epoch: int) -> torch.Tensor:
        """This process's item indices for ``epoch``, in visiting order ``(num_items // world_size,)``."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        perm = torch.randperm(self.num_items, generator=gen)
        per_rank = self.num_items // self.world_size
        return perm[: per_rank * self.world_size][self.rank :: self.world_size]

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` for this process."""
        out = [b.tolist() for b in self.shard(epoch).split(self.batch_size)]
        if out and len(out[-1]) < self.min_batch:
            out.pop()
        return out

    def num_batches(self) -> int:
        """Batches per epoch (the same every epoch and on every process)."""
        per_rank = self.num_items // self.world_size
        full, rest = divmod(per_rank, self.batch_size)
        return full + (1 if rest >= self.min_batch else 0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate ``epoch`` from batch ``start_batch`` on (the batches before it were done already)."""
        if not 0 <= start_batch <= self.num_batches():
            raise ValueError(f"start_batch {start_batch} outside [0, {self.num_batches()}]")
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        return self.num_batches() - self.start_batch
