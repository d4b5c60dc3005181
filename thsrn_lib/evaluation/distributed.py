"""Scale-out scoring under ``torchrun``: each rank scores a slice of the images, then one matrix is gathered.

How the work is split: the images of a protocol part (the whole matrix, or one COCO 1K fold)
are cut into ``world_size`` contiguous row ranges whose boundaries fall on multiples of the
encoding batch size, so each rank encodes the same image batches a single process would. Every
rank encodes all captions (cheap next to cross-attention scoring) and scores its rows against
them, i.e. the (image shard x caption shard) blocks of its row range. The row blocks are then
all-gathered, in column chunks of bounded size, into the full ``(n_images, n_captions)`` matrix
on every rank (``gather_to="all"``) or on rank 0 only (``gather_to=0``).

Works with any process-group backend: gloo gathers CPU tensors, NCCL gathers tensors on the
rank's current CUDA device. Nothing here runs unless ``torch.distributed`` is initialised with
more than one process.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["world_info", "is_distributed", "row_ranges", "gather_rows", "broadcast_object"]

# Bytes of one all-gather round (all ranks' pieces together); bounds the gather's extra memory.
_GATHER_CHUNK_BYTES = 64 * 2**20


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> tuple[int, int]:
    """``(world_size, rank)``; ``(1, 0)`` outside a multi-process group."""
    if not is_distributed():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def row_ranges(n_rows: int, world_size: int, align: int = 1) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` row ranges, one per rank, as equal as possible in units of ``align``.

    Boundaries are multiples of ``align`` (except the final ``n_rows``); ranks beyond the number
    of units get empty ranges.
    """
    if world_size < 1 or align < 1:
        raise ConfigError(f"world_size and align must be >= 1, got {world_size} and {align}")
    units = -(-n_rows // align)
    base, extra = divmod(units, world_size)
    out, start = [], 0
    for r in range(world_size):
        stop = min(n_rows, start + (base + (r < extra)) * align)
        out.append((start, stop))
        start = stop
    return out


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(
    local: np.ndarray,
    ranges: list[tuple[int, int]],
    out: np.ndarray | None = None,
    gather_to: int | Literal["all"] = "all",
) -> np.ndarray | None:
    """Assemble the row blocks of all ranks into one ``(n_rows, n_cols)`` float32 matrix.

    Args:
        local: this rank's rows ``(stop - start, n_cols)`` for its entry of ``ranges``.
        ranges: every rank's ``[start, stop)`` (identical on all ranks, from :func:`row_ranges`).
        out: optional preallocated destination (e.g. a memory map) on the receiving rank(s).
        gather_to: ``"all"`` (every rank gets the matrix) or a rank number (only it does; the
            others return None).

    The transfer runs in column chunks so that at most ~64 MiB of gather buffers exist at a time.
    """
    world, rank = world_info()
    n_rows = ranges[-1][1]
    n_cols = local.shape[1]
    receive = gather_to == "all" or gather_to == rank
    if out is None and receive:
        out = np.empty((n_rows, n_cols), dtype=np.float32)
    if world == 1:
        if receive:
            out[...] = local
        return out if receive else None
    counts = [b - a for a, b in ranges]
    pad_rows = max(1, max(counts))
    device = _comm_device()
    width = max(1, _GATHER_CHUNK_BYTES // (4 * pad_rows * world))
    for c0 in range(0, n_cols, width):
        c1 = min(n_cols, c0 + width)
        piece = torch.zeros(pad_rows, c1 - c0, dtype=torch.float32)
        piece[: counts[rank]] = torch.from_numpy(np.ascontiguousarray(local[:, c0:c1], dtype=np.float32))
        piece = piece.to(device)
        received = [torch.empty_like(piece) for _ in range(world)]
        dist.all_gather(received, piece)
        if receive:
            for r, (a, b) in enumerate(ranges):
                if b > a:
                    out[a:b, c0:c1] = received[r][: b - a].cpu().numpy()
    return out if receive else None


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (identity outside a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]
