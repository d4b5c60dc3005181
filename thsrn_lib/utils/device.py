"""Device and mixed-precision selection from the strings a config or the command line gives."""
from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["resolve_device", "resolve_amp_dtype", "describe_device", "AMP_MODES", "DEVICE_CHOICES"]

AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:K"`` -> a torch device.

    Under ``torchrun`` pass ``local_rank``: a bare ``"cuda"``/``"auto"`` then means this
    process's own GPU, ``cuda:{local_rank}``.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"device must be a string ('auto', 'cpu', 'cuda' or 'cuda:K'), got {spec!r}")
    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {spec!r} was requested but this PyTorch build sees no CUDA GPU "
                f"(torch {torch.__version__}); use --device cpu (or run.device=cpu), or install a CUDA build"
            )
        if spec == "cuda":
            return torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
        try:
            index = int(spec.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"device {spec!r} is not of the form 'cuda:K' with an integer K") from None
        if not 0 <= index < torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise ConfigError(f"unknown device {spec!r}; use one of 'auto', 'cpu', 'cuda' or 'cuda:K'")


def resolve_amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device``, or None for full float32.

    ``"auto"``: bfloat16 on CUDA GPUs that support it, else float16 (which then needs a gradient
    scaler); float32 on the CPU, where autocast rarely pays off for these small recurrent models.
    """
    if mode not in AMP_MODES:
        raise ConfigError(f"unknown amp mode {mode!r}; use one of {', '.join(AMP_MODES)}")
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if mode == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"amp 'bf16' is not supported on {torch.cuda.get_device_name(device)}; use 'fp16' or 'auto'")
        return torch.bfloat16 if mode == "bf16" else torch.float16
    if mode == "auto":
        return None
    if mode == "bf16":
        return torch.bfloat16
    raise ConfigError(f"amp {mode!r} needs a CUDA device (device is {device}); use 'bf16', 'auto' or 'off' on the CPU")


def describe_device(device: torch.device) -> str:
    """A short human-readable name, e.g. ``"cuda:0 (NVIDIA H100)"`` or ``"cpu (2 threads)"``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"
