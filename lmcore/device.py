"""Where tensors live and in which precision: one rule for train, evaluate and serve.

``auto`` means the first CUDA device when there is one, else the CPU; mixed precision
(bf16 autocast) is on by default only on CUDA, where it is fast and numerically safe.
"""

from __future__ import annotations

import torch

from lmcore.errors import LmopsError


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a usable ``torch.device``; one-line error otherwise."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LmopsError(f"device '{name}' requested but CUDA is not available (use 'auto' or 'cpu')")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LmopsError(f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA device(s))")
        return dev
    raise LmopsError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)")


def autocast_dtype(device: torch.device, dtype_param: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``train.dtype`` on ``device``; ``None`` = plain float32."""
    if dtype_param == "float32":
        return None
    if dtype_param == "bfloat16":
        return torch.bfloat16
    if dtype_param == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    raise LmopsError(f"unknown dtype '{dtype_param}' (use auto, float32 or bfloat16)")
