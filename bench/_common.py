"""Shared helpers for lmops benchmarks: arguments, timing, the machine's matmul peak, output.

Conventions: each benchmark measures lmops and its reference side by side in one run,
interleaving repeats so that noise from other processes hits both alike, and reports
medians and the ratio lmops / reference. With ``--json`` the last printed line is one JSON
object (human-readable lines may come before it). Every benchmark's first line names the CPU
and its final JSON carries it as ``"cpu"`` (:func:`cpu_header`, :func:`with_cpu`): the same code
runs bf16 30-100x slower on an AVX2-only EPYC than on an AMX Xeon, so a figure without its CPU
cannot be compared with another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared/data/tinyshakespeare.txt"

# The lmops home as the benchmark starts, before some point LMOPS_HOME at a temporary one: the CPU
# profile is cached there, so a benchmark pays its ~1-2 s measurement once per machine, not per run.
_PROFILE_HOME = Path(os.environ.get("LMOPS_HOME") or ROOT / ".lmops")
_cpu: dict | None = None


def cpu_profile() -> dict:
    """This machine's ``lmcore.machine.cpu_profile()`` (CPU, class, effective ISA, ISA caps, threads, torch,
    fp32/bf16 GFLOP/s), taken once per process at the torch thread count then in force."""
    global _cpu
    if _cpu is None:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from lmcore.machine import cpu_profile as probe_cpu

        _cpu = probe_cpu(home=_PROFILE_HOME)
    return _cpu


def cpu_header() -> dict:
    """Print ``cpu: AMD EPYC (avx2, 2 threads): fp32 80 GFLOP/s, bf16 1.5 GFLOP/s``; call it first thing,
    after setting the benchmark's thread count (the profile is measured at it)."""
    from lmcore.machine import describe_cpu

    profile = cpu_profile()
    print(f"cpu: {describe_cpu(profile)}", flush=True)
    return profile


def with_cpu(result: dict) -> dict:
    """``result`` plus ``"cpu"``: the profile of the machine that measured it (every benchmark's final JSON)."""
    return {**result, "cpu": cpu_profile()}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--sizes", default="small,large", help="comma-separated subset of: small,large")
    p.add_argument("--repeats", type=int, default=0, help="interleaved repeats (0 = the benchmark's default)")
    return p


def setup(args: argparse.Namespace) -> None:
    if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
        sys.path.insert(0, str(ROOT))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def char_corpus() -> tuple[torch.Tensor, int]:
    """tinyshakespeare as char ids (vocab 65) so both sides see real text with the same vocab."""
    if not CORPUS.is_file():
        raise SystemExit(f"corpus not found: {CORPUS}")
    text = CORPUS.read_text(encoding="utf-8")
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return torch.tensor([lookup[c] for c in text], dtype=torch.long), len(chars)


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn, alternating them (ABAB..., order flipped each round)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name]))
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_gflops(n: int = 1536, seconds: float = 1.5, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of n x n @ n x n matmuls in ``dtype`` over ~seconds: the machine's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm up
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        dt = timed(lambda: torch.mm(a, b, out=out))
        best = max(best, 2 * n**3 / dt / 1e9)
    return best


def quiet_transformers() -> None:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()


def emit(result: dict, as_json: bool) -> None:
    """Human lines always; with --json the final line is the whole result as JSON."""
    for name, r in result.get("sizes", {}).items():
        extra = "".join(f"  {k}={v}" for k, v in r.items() if k not in ("lmops_tokens_per_s",
                                                                        "reference_tokens_per_s", "ratio"))
        print(f"{name:>6}: lmops {r['lmops_tokens_per_s']:>10.1f} tok/s   reference "
              f"{r['reference_tokens_per_s']:>10.1f} tok/s   ratio {r['ratio']:.2f}x{extra}")
    others = {k: v for k, v in result.items() if k not in ("sizes", "cpu")}
    print("  ".join(f"{k}={v}" for k, v in others.items()))
    if as_json:
        print(json.dumps(with_cpu(result)))


# The two sizes both benchmarks use: (layers, heads, width, batch, sequence length).
SIZES = {
    "small": {"n_layer": 4, "n_head": 4, "d_model": 128, "batch": 12, "seq": 64},
    "large": {"n_layer": 6, "n_head": 6, "d_model": 384, "batch": 16, "seq": 256},
}


def model_pair(size: dict, vocab: int, block_size: int):
    """An lmcore Transformer and a transformers LlamaForCausalLM with identical weights (tied, fp32)."""
    from transformers import LlamaForCausalLM

    from lmcore.model.hf import hf_config, to_hf_state_dict
    from lmcore.model.transformer import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=vocab, n_layer=size["n_layer"], n_head=size["n_head"], n_kv_head=size["n_head"],
                      d_model=size["d_model"], block_size=block_size, tie_embeddings=True)
    ours = Transformer(cfg)
    ref = LlamaForCausalLM(hf_config(cfg))
    ref.load_state_dict(to_hf_state_dict(ours), strict=False)
    return ours, ref


def flops_per_token(cfg, seq: int) -> float:
    """Training FLOPs per token, PaLM/nanoGPT formula: 6*N_matmul + 12*L*C*T.

    N_matmul counts the weights that take part in matmuls (all Linear layers including the
    output head, not the embedding lookup); 12*L*C*T is the attention score/value matmuls
    (forward + backward), counted in full as in the formula, not halved for causality.
    """
    C, L = cfg.d_model, cfg.n_layer
    per_layer = C * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim + C * C + 3 * C * cfg.hidden
    n_matmul = L * per_layer + C * cfg.vocab_size
    return 6 * n_matmul + 12 * L * C * seq

