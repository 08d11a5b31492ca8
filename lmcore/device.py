"""Where tensors live and in which precision: one rule for train, evaluate and serve.

``auto`` means the first CUDA device when there is one, else the CPU. Mixed precision (bf16
autocast) is on by default where it pays: on CUDA, and on CPUs with AMX-BF16 matrix units
(Intel Sapphire Rapids and later) for models at least ``AMX_MIN_WIDTH`` wide. Measured on a
2-core Sapphire Rapids VM, training steps bf16 vs fp32 (4 layers, batch 12 x 64): at width
128, 1.3x faster eager and 1.4x compiled; at width 64, even eager (0.95x) and 1.2x compiled,
so narrower models stay fp32. This needs ``lmcore.model``'s plain-matmul attention for CPU
bf16 training: with SDPA's fused CPU kernel the bf16 backward alone took half the step.
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


AMX_MIN_WIDTH = 128


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX tiles and AVX512-BF16 (oneDNN then runs bf16 matmuls on them)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):  # private probes: absent on other torch builds
        return False


def autocast_dtype(device: torch.device, dtype_param: str = "auto", d_model: int = 0,
                   amx: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for ``train.dtype`` on ``device`` for a model ``d_model`` wide; ``None`` = float32.

    ``amx`` overrides the CPU probe (tests).
    """
    if dtype_param == "float32":
        return None
    if dtype_param == "bfloat16":
        return torch.bfloat16
    if dtype_param == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        if device.type == "cpu" and d_model >= AMX_MIN_WIDTH and (cpu_has_amx_bf16() if amx is None else amx):
            return torch.bfloat16
        return None
    raise LmopsError(f"unknown dtype '{dtype_param}' (use auto, float32 or bfloat16)")
