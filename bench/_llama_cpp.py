"""llama.cpp through ``llama-cpp-python`` (``pip install 'lmops[bench]'``) as a reference decoder.

Why a module of its own: the package compiles llama.cpp for minutes, so it is an optional extra,
not part of ``make test``; a benchmark asks :func:`available` first, which says why not where it is
missing, and skips its llama.cpp part.

Two settings, both found on the 2-core AMX Xeon this was written on (llama-cpp-python 0.3.36 built with
``GGML_NATIVE=ON``): its extra buffer types (weight repacking and the AMX int8 path) segfault in the first
decode of any quantized file (the shipped Q4_1 as well as a Q8_0 export), so models load with
``use_extra_bufts=False`` (:data:`EXTRA_BUFTS`); and its OpenMP threads spin at barriers, which on a shared
box where the other core is busy slowed 2 threads 50x (0.5 against 22-25 tok/s with ``PASSIVE``). llama.cpp
shares torch's OpenMP runtime in one process (both load ``libgomp.so.1``; torch's copy comes first), which
reads ``OMP_WAIT_POLICY`` when torch is imported: ``bench/generate.py --model`` restarts itself with
``OMP_WAIT_POLICY=PASSIVE`` unless it is set, so both sides run under the same policy.
"""

from __future__ import annotations

import os
from pathlib import Path

EXTRA_BUFTS = False


def available() -> tuple[bool, str]:
    """(importable, why not / the library's build line)."""
    try:
        import llama_cpp
    except ImportError as e:
        return False, (f"llama.cpp reference skipped: llama_cpp is not importable ({e}); "
                       "pip install 'lmops[bench]' (compiles llama.cpp, several minutes)")
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    return True, (f"llama-cpp-python {llama_cpp.__version__} (OMP_WAIT_POLICY={policy}, "
                  f"extra buffer types {'on' if EXTRA_BUFTS else 'off'}): {info}")


def load(path: Path, threads: int, n_ctx: int = 1024):
    """A llama.cpp model and context on ``threads`` threads, quiet (no logging to stderr)."""
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    defaults = lib.llama_model_default_params
    if not getattr(defaults, "_lmops_bench", False):  # Llama() takes no such argument: set it in its defaults

        def params():
            p = defaults()
            p.use_extra_bufts = EXTRA_BUFTS
            return p

        params._lmops_bench = True
        lib.llama_model_default_params = params
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                 verbose=False, seed=0)


def greedy(llm, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` (no EOS stop, no repeat penalty: lmops' greedy decoding).

    The context is reset first, so every call pays its prompt's evaluation like lmops' ``prefill``."""
    llm.reset()
    out: list[int] = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out
