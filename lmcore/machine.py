"""What this machine is, how lmops times work on it, and where measurements are kept.

The machine's identity (CPU, effective ISA after caps such as ``as-avx2``, threads, torch build)
keys every cached measurement: the model-shaped probe (:mod:`lmcore.probe`), the decode kernels'
int8 check (:func:`lmcore.model.decode.int8_matvec_speedup`) and the CPU profile below. This module
knows no model, so the model code may ask it without an import cycle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmcore.settings import get_settings

PROBE_VERSION = 3  # 2: Muon timed as lmcore.training.optimizers runs it (stacked, Gram route); busy flag;
# 3: int8 decode kernels timed on 50 MB of weights (streamed, as in decoding), times to 0.1 us
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
ISA_CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


# ----------------------------------------------------------------------------- memory

MALLOC_KEEP_BYTES = 1 << 30  # blocks up to this size stay in the heap, and this much free heap is kept


@functools.cache  # the C library does not change under a running process
def _glibc() -> ctypes.CDLL | None:
    """glibc, whose malloc these tune; None off Linux/glibc (other allocators decide for themselves)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache  # once per process: the setting is process-wide
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    Why: a CPU training step frees and allocates the same activations every step. glibc serves
    blocks above its adaptive mmap threshold with fresh mappings and unmaps them on free, so every
    step page-faults (and the kernel zeroes) its activations again: 750k minor faults in 60 steps of
    a 4 x 256 model, ~20% of its step time (bench/finetune.py, AVX-512 EPYC). Raising the mmap and
    trim thresholds keeps them in the heap (the same blocks reused: peak RSS is unchanged). True
    when set; False off glibc (other allocators decide for themselves).
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, MALLOC_KEEP_BYTES)) and bool(
        libc.mallopt(m_trim_threshold, MALLOC_KEEP_BYTES))


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the kernel (glibc's ``malloc_trim``): at the end of a stage.

    Why: :func:`keep_freed_memory` keeps a step's freed activations in the heap for the next step, so a
    long-running process (the flow, a server) would otherwise stay at its training peak after training.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# ----------------------------------------------------------------------------- the CPU


@functools.cache  # the CPU does not change under a running process
def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    lines = text.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith(("flags", "Features"))), [])
    return model, set(flags)


def _isa_caps() -> dict[str, str]:
    return {k: os.environ[k] for k in ISA_CAP_VARS if os.environ.get(k)}


def effective_isa(flags: set[str], caps: dict[str, str]) -> list[str]:
    """The vector ISA torch may use: the CPU's flags less what the env vars cap away (``as-avx2``)."""
    isa = [f for f in ISA_FLAGS if f in flags]
    cap = " ".join(caps.values()).upper()
    if "AVX2" in cap and "512" not in cap and "AMX" not in cap:
        isa = [f for f in isa if f in ("avx2", "fma", "avx_vnni")]
    return isa


def cpu_class(isa: list[str]) -> str:
    if "amx_bf16" in isa:
        return "amx"
    if "avx512f" in isa:
        return "avx512"
    return "avx2" if "avx2" in isa else "other"


def machine_identity() -> dict:
    """Everything a measurement depends on besides the shape: the cache key's contents."""
    model, flags = _cpuinfo()
    caps = _isa_caps()
    isa = effective_isa(flags, caps)
    return {"cpu": model, "cpu_class": cpu_class(isa), "isa": isa,
            "aten_capability": torch.backends.cpu.get_cpu_capability(), "isa_caps": caps,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([PROBE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- timing


def best_seconds(fn: Callable[[], object], budget_s: float, min_reps: int = 2) -> float:
    """Best wall time of ``fn`` after one warm-up call, repeating for about ``budget_s``."""
    fn()
    best, reps, end = math.inf, 0, time.perf_counter() + budget_s
    while reps < min_reps or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, budget_s: float = 0.2,
                  screen_below: float = 0.0) -> float:
    """GFLOP/s of (m, k) @ (k, n) in ``dtype``.

    With ``screen_below``, one product of at most 256 rows comes first, and if it runs under
    that many GFLOP/s its figure is returned: timing bf16 without bf16 units (1-3 GFLOP/s) at
    full size would only cost seconds to learn the same. The screen is the best of three products
    after a first: that one creates oneDNN's kernels and the next ones still warm up, which read
    as 6-100 GFLOP/s on an AVX512-BF16 EPYC whose warm bf16 runs at 250-400.
    """
    b = torch.randn(k, n).to(dtype)
    if screen_below:
        rows = min(m, 256)
        a = torch.randn(rows, k).to(dtype)
        screen = 2 * rows * k * n / best_seconds(lambda: torch.mm(a, b), 0.0, min_reps=3) / 1e9
        if screen < screen_below:
            return screen
    a = torch.randn(m, k).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    return 2 * m * k * n / best_seconds(lambda: torch.mm(a, b, out=out), budget_s) / 1e9


# ----------------------------------------------------------------------------- machine summary


def cache_dir(home: Path | None) -> Path:
    if home is None:
        home = get_settings().home
    return Path(home) / "cache" / "probe"


_memo: dict[Path, dict] = {}  # decode-time reads, kept per process: a generation asks for every sequence


def read_memo(path: Path) -> dict | None:
    """:func:`read_cached`, remembered in this process (for the lookups on decoding's hot path)."""
    if path not in _memo and (hit := read_cached(path)) is not None:
        _memo[path] = hit
    return _memo.get(path)


def read_cached(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == PROBE_VERSION else None


def write_cached(path: Path, data: dict) -> None:
    _memo.pop(path, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def cpu_profile(refresh: bool = False, home: Path | None = None) -> dict:
    """The machine in one dict: identity plus fp32 and bf16 matmul GFLOP/s at a mid-size shape.

    For reports and benchmark JSON; the training and decoding decisions use :func:`probe` at the
    model's own shapes. Cached like the probe.
    """
    ident = machine_identity()
    path = cache_dir(home) / f"cpu-{cache_key(ident)}.json"
    if not refresh and (hit := read_cached(path)):
        return hit["profile"]
    fp32 = matmul_gflops(1024, 384, 1024, torch.float32)
    bf16 = matmul_gflops(1024, 384, 1024, torch.bfloat16, screen_below=fp32 / 4)
    profile = {**ident, "fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1),
               "bf16_over_fp32": round(bf16 / fp32, 3), "shape": "1024x384x1024"}
    write_cached(path, {"version": PROBE_VERSION, "profile": profile})
    return profile


def describe_cpu(p: dict) -> str:
    """One line: ``AMD EPYC (avx2, 2 threads): fp32 80 GFLOP/s, bf16 1.5 GFLOP/s``."""
    return (f"{p['cpu']} ({p['cpu_class']}, {p['threads']} threads): fp32 {p['fp32_gflops']:.0f} GFLOP/s, "
            f"bf16 {p['bf16_gflops']:.1f} GFLOP/s")


def interleaved_ms(jobs: dict[str, tuple[Callable[[], None], float]], rounds: int = 3,
                   deadline: float | None = None) -> dict[str, float] | None:
    """Best scaled time of each job over ``rounds``, the jobs taking turns: a burst of load from
    another process then hits one round of each, not all rounds of one (ratios are what decide).

    ``deadline`` (a ``time.perf_counter`` time): the warm-up calls must end before it, else None
    (nothing trustworthy was measured in time; one is not started when the longest so far would not
    fit); later rounds run only while one more fits before it.
    """
    took: dict[str, float] = {}
    for name, (fn, _) in jobs.items():
        if deadline is not None and took and time.perf_counter() + max(took.values()) > deadline:
            return None  # the next warm-up would likely end past the deadline: do not start it
        t0 = time.perf_counter()
        fn()  # warm-up: allocations, oneDNN primitive creation
        took[name] = time.perf_counter() - t0
        if deadline is not None and time.perf_counter() > deadline:
            return None
    best = dict.fromkeys(jobs, math.inf)
    for r in range(rounds):
        if r and deadline is not None and time.perf_counter() + sum(min(took[n], best[n]) for n in jobs) > deadline:
            break
        for name, (fn, _) in jobs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    # to 0.1 us: the int8 probe times steps of ~50 us, which 0.01 ms would round to ties
    return {name: round(best[name] * factor * 1e3, 4) for name, (_, factor) in jobs.items()}


def machine_busy() -> bool:
    """Whether other work keeps the cores busy: a 1-minute load above the core count, this process included."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


