"""The one incremental-decoding step: B sequences, one new token each, eager or compiled.

:func:`step` appends one token to each of the slots 0..B-1 of a :class:`lmcore.model.transformer.KVCache`
(each slot at its own length) and returns next-token logits. :class:`Decoder` drives it over a
cache: :meth:`Decoder.prefill` puts a prompt into a slot with the model's ordinary forward,
:meth:`Decoder.step` decodes the leading B slots together. ``lmcore.model.generate`` uses one slot, the
server's engine (``lmcore.serve.engine``) one slot per concurrent request; both run the same step,
eagerly or compiled, over the same cache, so switching from one to the other mid-sequence is free.

Why compile: an eager decode step is a few hundred tiny ops, and on a CPU each costs 3-30 us of
dispatch, so a small model spends most of a token in overhead. Inductor fuses the element-wise
work (RMSNorm, RoPE, residuals, SwiGLU, the attention softmax) into C++ loops around the matrix
products. On a CPU the step is compiled ahead of time (``torch.export`` + AOTInductor) into a
library that is called with a ready list of tensors: ``torch.compile`` would add Dynamo's guards
and Python wrappers to every token (for the 6 x 6 x 384 model 0.17 ms of an fp32 token and
0.26 ms of an int8 one: 11 % and 24 %). On GPUs it is ``torch.compile`` with Inductor's defaults.
Four choices keep the step fast and compiled once (twice for batches) per model shape and cache length:

- every layer's keys and values live in their own preallocated tensors, written in place
  (a slice of one shared cache tensor makes the compiler copy the whole cache);
- the batch is dynamic: the step gets the leading B slots of the cache (views, no copy); one
  compiled step serves B = 1 (export fixes a dimension it sees at 1), another any B >= 2;
- the attended length is a dynamic dimension, carried by the shape of a slice of a scratch
  tensor, so the step reads the filled slots only (up to the longest row; each row masks the
  slots past its own length) and one graph serves every position;
- the weights are inputs, not captured module attributes, so another model of the same shape
  (a reloaded version, a fresh decoder) reuses the compiled code.

Int8 models (``lmcore.optimize.quantize``) stay int8 when compiled: each matrix-vector product reads
int8 weights, widens them in registers and applies the per-row scale afterwards (weight-only int8;
activations stay fp32), so a token reads a quarter of the weight bytes. The eager step runs such a
model's own modules instead (torch's dynamic quantization, which also rounds activations); both are
measured.

Prompts are prefilled by the model's ordinary forward (for an int8 model the eager, dynamically
quantized one), straight into their slot of the cache. Compiling takes 20-30 s on 2 CPU cores the
first time a shape is seen (in a child process, so a server keeps decoding meanwhile); the library
is kept under the lmops home (``cache/decode``), so a later process loads it in ~4 s (mostly
importing Inductor) and later decoders get it at once.

Shapes: B rows, H heads, Hkv kv-heads, G = H / Hkv, D head dim, L cache positions, n attended
positions, C = d_model, V vocab.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten, treespec_dumps, treespec_loads

from lmcore.machine import (
    PROBE_VERSION,
    cache_dir,
    cache_key,
    interleaved_ms,
    machine_identity,
    read_memo,
    write_cached,
)
from lmcore.model.transformer import KVCache, Transformer, apply_rope
from lmcore.model.weights import unwrap
from lmcore.settings import get_settings

# A weight is a float matrix (out, in), or int8 values (out, in) with float32 scales (out,).
Weight = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
# What the step reads of a model: embedding, per block (attn norm, qkv, proj, mlp norm, gate_up, down), norm, head
Weights = tuple[torch.Tensor, tuple[tuple, ...], torch.Tensor, Weight | nn.Module]

CPU_INDUCTOR_OPTIONS = {
    # materialise each element-wise result once: left to itself Inductor inlines the RMSNorm or
    # SwiGLU math into the int8 matrix-vector loops and recomputes it for every output row (1.5x slower)
    "realize_opcount_threshold": 1,
    "size_asserts": False,  # per-input checks cost as much as a small model's arithmetic
    "alignment_asserts": False,
    "scalar_asserts": False,
    "memory_planning": True,  # one buffer pool per call (under torch.compile: wrapper time 488 -> 261 us)
    # a batch-1 matrix-vector product (M = 1; K, N <= 2048) becomes Inductor's own multiply-and-sum loop
    # instead of MKL's sgemv, which runs on one core at ~10 GB/s when the weights come from DRAM: the
    # loop spreads the rows over the cores (6L x 384: 3.1 MB gate|up in 84 us on 2 threads, MKL 308 us)
    "post_grad_fusion_options": {"decompose_mm_pass": {}},
}
# int8 steps only: share the small loops (norms, softmax) between the threads as well; the
# int8 step gets 4-5% faster, while the fp32 one, whose time is in MKL's matrix products, gets slower
CPU_INT8_OPTIONS = {"cpp.min_chunk_size": 8}


def compiled_cache_dir() -> None:
    """Inductor's on-disk cache under the lmops home, not /tmp (``apply_environment`` sets it for the CLI)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(get_settings().inductor_cache)


def _weight(mod: nn.Module, int8_kernels: bool = True) -> Weight:
    """What the step reads for a linear layer: its float weight, or for an int8 layer its int8
    values and scales, or (``int8_kernels`` off) their float32 product, made once per module."""
    q = getattr(mod, "int8_weight", None)
    if q is None:
        return mod.weight
    if int8_kernels:
        return q, mod.int8_scale
    if getattr(mod, "int8_as_float", None) is None:
        mod.int8_as_float = q.float() * mod.int8_scale[:, None]  # = weight_only_model's weights
    return mod.int8_as_float


def use_int8_kernels(model: nn.Module) -> bool:
    """Whether compiled decoding of ``model`` reads int8 weights: not on CPUs where the probe found
    the weight-only int8 kernel slower than float32 (``LMOPS_INT8_KERNELS=0/1`` decides instead)."""
    if not any(getattr(m, "int8_weight", None) is not None for m in model.modules()):
        return False
    env = os.environ.get("LMOPS_INT8_KERNELS", "").strip()
    if env:
        return env != "0"
    if model.embed.weight.device.type != "cpu":
        return True

    return int8_matvec_speedup()["speedup"] >= 1.0


# (count, out, in): matrices of a large decode step's size, 50 MB of float32 in all, more than a
# server CPU's last-level cache, so each call streams its weights from memory as decoding a large
# model does. (At a cache-resident size a decode step reads weights at cache speed and int8's
# quarter of the bytes hardly matters: 0.92-0.97x on an AVX-512 EPYC, against 1.9x while decoding.)
INT8_PROBE_SHAPE = (4, 2048, 1536)


def int8_matvec_speedup(refresh: bool = False, home: Path | None = None) -> dict:
    """Speed of lmcore.model.decode's compiled weight-only int8 matrix-vector products over the fp32 ones.

    Measured once per machine (~10-20 s: two small Inductor compiles), at 1 thread and at all,
    best of each side. It decides whether compiled decoding of an int8 model reads int8 weights
    (a quarter of the bytes, but each widened in registers: 1.6x faster on an AMX Xeon) or their
    float32 values (0.35-0.38x of fp32's speed on an AVX2-only EPYC, which lacks int8 dot products).
    """
    ident = machine_identity()
    path = _int8_probe_path(ident, home)
    if not refresh and (hit := read_memo(path)):
        return hit["int8"]

    compiled_cache_dir()
    torch.manual_seed(0)
    count, out_f, in_f = INT8_PROBE_SHAPE
    ws = [torch.randn(out_f, in_f) for _ in range(count)]
    x, norm = torch.randn(1, 1, in_f), torch.ones(in_f)
    qs = []
    for w in ws:
        scale = w.abs().amax(dim=1) / 127.0
        qs.append((torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale))

    def step(x, weights, norm):  # what a decode step does around its products: a norm, then matvecs
        h = torch.rms_norm(x, (in_f,), norm, 1e-5)
        return [linear(h, w) for w in weights]

    fp32 = torch.compile(step, options=CPU_INDUCTOR_OPTIONS, dynamic=False)
    int8 = torch.compile(step, options={**CPU_INDUCTOR_OPTIONS, **CPU_INT8_OPTIONS}, dynamic=False)
    saved, best = torch.get_num_threads(), {"fp32": math.inf, "int8": math.inf}
    # memory_planning's pool views (Inductor's own ``_alloc_from_pool``) fail torch's first-call
    # custom-op aliasing check, an error wherever CI is set; decoding itself runs AOT and is not checked
    no_alias_check = torch._functorch.config.patch(check_custom_op_aliasing=False)
    try:
        with torch.inference_mode(), no_alias_check:
            for threads in sorted({1, saved}):
                torch.set_num_threads(threads)
                times = interleaved_ms({"fp32": (lambda: fp32(x, ws, norm), 1.0),
                                         "int8": (lambda: int8(x, qs, norm), 1.0)}, rounds=50)
                best = {k: min(best[k], times[k]) for k in best}
    finally:
        torch.set_num_threads(saved)
    result = {"fp32_us": round(best["fp32"] * 1e3, 1), "int8_us": round(best["int8"] * 1e3, 1),
              "speedup": round(best["fp32"] / best["int8"], 3), "shape": list(INT8_PROBE_SHAPE)}
    write_cached(path, {"version": PROBE_VERSION, "machine": ident, "int8": result})
    return result


def _int8_probe_path(ident: dict, home: Path | None) -> Path:
    return cache_dir(home) / f"int8-{cache_key(ident)}.json"


def cached_int8_matvec_speedup(home: Path | None = None) -> dict | None:
    """:func:`int8_matvec_speedup`'s result where this machine measured it already (for ``lmops info``)."""
    hit = read_memo(_int8_probe_path(machine_identity(), home))
    return hit["int8"] if hit else None


def linear(x: torch.Tensor, w: Weight | nn.Module) -> torch.Tensor:
    """x (..., in) -> (..., out); an int8 weight becomes one fused widen-multiply-sum over its rows
    (compiled only: eagerly it would materialise (..., out, in)); a module (eager int8) is called."""
    if isinstance(w, tuple):
        q, scale = w
        return (x.unsqueeze(-2) * q).sum(-1) * scale  # (..., out, in) is never materialised when compiled
    if isinstance(w, nn.Module):
        return w(x)
    return F.linear(x, w)



def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def step(tokens, pos, span, weights: Weights, ks, vs, rope_cos, rope_sin, n_head: int, eps: float) -> torch.Tensor:
    """One new token for each of B rows: tokens, pos (B,) -> next-token logits (B, V).

    Row b's key and value go to position pos[b] of ks[i][b], vs[i][b] ((B, Hkv, L, D) per layer) and it
    attends positions 0..pos[b]. ``span`` (n + 1,) carries the attended length in its shape only:
    n = max(pos) + 1 (see :meth:`Decoder.step`). Computes what ``Transformer.forward`` with a cache does.
    """
    embed, blocks, norm, head = weights
    B, n = tokens.shape[0], span.shape[0] - 1
    Hkv, D = ks[0].shape[1], ks[0].shape[3]
    G = n_head // Hkv
    one = B == 1  # a single row (fixed when compiled): it attends all n positions, nothing to mask
    cos, sin = rope_cos[pos][:, None], rope_sin[pos][:, None]  # (B, 1, D), sin's first half negated (transformer.py)
    if not one:
        # where each row's new key and value go: (rows (B, 1), heads (1, Hkv), pos (B, 1)), broadcast to (B, Hkv);
        # compiled, index_put_ writes the cache in place (scatter_ with a dynamic B made Inductor copy it twice)
        at = (torch.arange(B, device=pos.device)[:, None], torch.arange(Hkv, device=pos.device)[None, :],
              pos[:, None])
        past = torch.arange(n, device=tokens.device)[None, :] > pos[:, None]  # (B, n): past a shorter row's end
        bias = torch.zeros(B, n, dtype=embed.dtype, device=embed.device).masked_fill(past, float("-inf"))
        bias = bias.view(B, 1, 1, n)
    x = F.embedding(tokens, embed)  # (B, C)
    for (attn_norm, qkv_w, proj_w, mlp_norm, gate_up_w, down_w), kc, vc in zip(blocks, ks, vs, strict=True):
        qkv = linear(_rms(x, attn_norm, eps), qkv_w).view(B, n_head + 2 * Hkv, D)
        qk, v = qkv.split((n_head + Hkv, Hkv), dim=1)
        q, k = apply_rope(qk, cos, sin).split((n_head, Hkv), dim=1)  # (B, H, D), (B, Hkv, D)
        if one:  # kc, vc: (B, Hkv, L, D), written in place
            kc.index_copy_(2, pos, k.view(1, Hkv, 1, D))
            vc.index_copy_(2, pos, v.view(1, Hkv, 1, D))
        else:  # kc[b, h, pos[b]] = k[b, h]
            kc.index_put_(at, k)
            vc.index_put_(at, v)
        # 3-d products over B * Hkv (views of the cache): Inductor then fuses the softmax into C++ loops,
        # where the 4-d form is matched to its SDPA kernel, ~10 us a call (1.3x slower at batch 1)
        keys, vals = kc[:, :, :n].reshape(B * Hkv, n, D), vc[:, :, :n].reshape(B * Hkv, n, D)
        att = (q.reshape(B * Hkv, G, D) @ keys.transpose(1, 2)) * D**-0.5  # (B * Hkv, G, n)
        if not one:
            att = (att.view(B, Hkv, G, n) + bias).view(B * Hkv, G, n)
        y = att.softmax(dim=-1) @ vals  # (B * Hkv, G, D)
        x = x + linear(y.reshape(B, n_head * D), proj_w)
        gate, up = linear(_rms(x, mlp_norm, eps), gate_up_w).chunk(2, dim=-1)
        x = x + linear(F.silu(gate) * up, down_w)
    return linear(_rms(x, norm, eps), head)  # (B, V)


class _Step(nn.Module):
    """``step`` as a module: what ``torch.export`` traces (the int arguments become constants)."""

    def __init__(self, n_head: int, eps: float):
        super().__init__()
        self.n_head, self.eps = n_head, eps

    def forward(self, tokens, pos, span, weights, ks, vs, rope_cos, rope_sin) -> torch.Tensor:
        return step(tokens, pos, span, weights, ks, vs, rope_cos, rope_sin, self.n_head, self.eps)


def step_weights(model: Transformer, compiled: bool) -> Weights:
    """What :func:`step` reads of ``model``. Eager: float weights, or an int8 model's own (dynamically
    quantized) modules; compiled: float weights or int8 values and scales (see :func:`use_int8_kernels`)."""
    if compiled:
        k = use_int8_kernels(model)

        def w(mod: nn.Module):
            return _weight(mod, k)
    else:

        def w(mod: nn.Module):
            weight = getattr(mod, "weight", None)  # a quantized module's ``weight`` is a method
            return weight if isinstance(weight, torch.Tensor) else mod

    return (
        model.embed.weight,
        tuple((b.attn_norm.weight, w(b.attn.qkv), w(b.attn.proj), b.mlp_norm.weight, w(b.mlp.gate_up),
               w(b.mlp.down)) for b in model.blocks),
        model.norm.weight,
        w(model.lm_head),
    )


# (tokens (B,), pos (B,), span (n+1,), ks, vs: per layer (B, Hkv, L, D)) -> logits (B, V)
Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]], torch.Tensor]
DECODER_SLOTS = 256  # compiled caches come in multiples of this, so one compiled step serves many lengths
_libraries: dict[str, Callable[[list[torch.Tensor]], list[torch.Tensor]]] = {}  # AOT-compiled steps by key
_compile_lock = threading.Lock()


def _sample_inputs(cache: KVCache, rows: int) -> tuple:
    """tokens, pos, span, ks, vs of ``rows`` rows shaped like ``cache``'s: what export traces."""
    k0 = cache.k[0]
    shape, kw = (rows, *k0.shape[1:]), {"device": k0.device, "dtype": k0.dtype}
    tokens = torch.zeros(rows, dtype=torch.long, device=k0.device)
    pos = torch.ones(rows, dtype=torch.long, device=k0.device)
    # empty, not zeros: only their shapes matter, and a check run touches 3 positions of each, so
    # zeros would make hundreds of MB of a long cache resident (kept by malloc) for nothing
    ks = [torch.empty(shape, **kw) for _ in cache.k]
    vs = [torch.empty(shape, **kw) for _ in cache.v]
    return tokens, pos, torch.empty(3, device=k0.device), ks, vs


def _cpu_runner(weights: Weights, rope: tuple, cache: KVCache, n_head: int, eps: float, rows: int) -> Runner:
    """The step AOT-compiled (AOTInductor) for this model and cache shape: once per process, cached on disk.

    Why AOT rather than ``torch.compile``: a compiled function pays Dynamo's guards and Python
    wrappers on every call, about 0.2 ms of a 0.8-1.2 ms token here; the AOT-compiled library is
    called with a ready list of tensors. The attended length (``span``) stays dynamic, and so does B
    for ``rows`` = 2 (a library for any B >= 2); ``rows`` = 1 is a library for single sequences, since
    export fixes a dimension sampled at 1 and assumes a dynamic one is never 1 (matmul branches on it).
    """
    tokens, pos, span, ks, vs = _sample_inputs(cache, rows)
    args = (tokens, pos, span, weights, ks, vs, *rope)
    leaves = tree_flatten(args)[0]
    int8 = any(t.dtype == torch.int8 for t in leaves)
    options = {**CPU_INDUCTOR_OPTIONS, **(CPU_INT8_OPTIONS if int8 else {})}
    # the library is built for this CPU's vector ISA (a home shared with another machine gets its own)
    sig = ["step-v5", torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), n_head,
           eps, sorted(options.items())]
    sig += [(tuple(t.shape), str(t.dtype)) for t in leaves]  # n is dynamic, sampled at 3; B = 1, or B >= 2
    # which inputs are one tensor (a tied embedding and head): export folds aliased inputs into one,
    # so a library built for a tied model would read the embedding as the head of an untied one
    sig.append([next(j for j, u in enumerate(leaves) if u is t) for t in leaves])
    key = hashlib.sha256(repr(sig).encode()).hexdigest()[:24]
    with _compile_lock:
        if key not in _libraries:
            path = get_settings().decode_cache / f"step-{key}.pt2"
            if not path.is_file():
                _compile_in_child(args, leaves, n_head, eps, rows, options, path)
            _libraries[key] = torch._inductor.aoti_load_package(str(path)).loader.run
        library = _libraries[key]
    middle = leaves[3 : len(leaves) - 2 - 2 * len(ks)]  # the weights' leaves
    cos, sin = rope

    def run(tokens, pos, span, ks, vs) -> torch.Tensor:
        return library([tokens, pos, span, *middle, *ks, *vs, cos, sin])[0]

    return run


def _compile_in_child(args: tuple, leaves: list[torch.Tensor], n_head: int, eps: float, rows: int, options: dict,
                      path: Path) -> None:
    """Export and AOT-compile the step in a child process, from zero tensors shaped like ``args``.

    Why a child: export and Inductor hold the GIL for most of 20-30 s, which would stall a server's
    decode loop, and export edits process-global tracing state (``torch.fx.traceback``) that other
    threads' torch calls read; niced, so that the server's requests keep their time to first token
    meanwhile. The weights are inputs, so their values do not matter.
    """
    payload = {
        "treespec": treespec_dumps(tree_flatten(args)[1]),
        "leaves": [(list(t.shape), str(t.dtype).removeprefix("torch.")) for t in leaves],
        "alias": [next(j for j, u in enumerate(leaves) if u is t) for t in leaves],  # tied tensors stay one
        "n_head": n_head, "eps": eps, "rows": rows, "options": options, "path": str(path),
        "threads": torch.get_num_threads(),
    }
    # at a lower priority: where it shares the cores with a server, the requests decoding meanwhile come first
    code = ("import json, os, sys; os.nice(10); from lmcore.model.decode import _compile_main; "
            "_compile_main(json.load(sys.stdin))")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(payload), capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"compiling the decode step failed: {' / '.join(tail) or done.returncode}")


def _compile_main(p: dict) -> None:
    """The child's side of :func:`_compile_in_child`: export, compile, and move the library into place."""
    torch.set_num_threads(p["threads"])  # the library runs on the thread count it is built for
    leaves: list[torch.Tensor] = []
    for i, ((shape, dtype), first) in enumerate(zip(p["leaves"], p["alias"], strict=True)):
        # empty: values do not matter to export and compile, and untouched pages are not resident
        leaves.append(leaves[first] if first != i else torch.empty(shape, dtype=getattr(torch, dtype)))
    args = tree_unflatten(leaves, treespec_loads(p["treespec"]))
    weights, ks, path = args[3], args[4], Path(p["path"])
    batch = torch.export.Dim("batch", min=2) if p["rows"] > 1 else None  # rows >= 2: any slot count
    # the attended length + 1 (>= 3: clear of the sizes 0 and 1 the compiler specialises) <= L
    span = torch.export.Dim("span", min=3, max=ks[0].shape[2])
    by_row = {0: batch} if batch is not None else None
    per_layer = [by_row] * len(ks)
    shapes = (by_row, by_row, {0: span}, tree_map(lambda _: None, weights), per_layer, per_layer, None, None)
    with torch.inference_mode():
        program = torch.export.export(_Step(p["n_head"], p["eps"]), args, dynamic_shapes=shapes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=p["options"])
    tmp.replace(path)


_gpu_step = None


def _gpu_runner(weights: Weights, rope: tuple, cache: KVCache, n_head: int, eps: float, rows: int) -> Runner:
    """On GPUs ``torch.compile`` with Inductor's defaults (Triton kernels); B (>= 2) and the attended length
    dynamic, B = 1 a graph of its own (``rows`` only says which one the caller wants first)."""
    global _gpu_step
    with _compile_lock:
        if _gpu_step is None:
            _gpu_step = torch.compile(step, fullgraph=True, dynamic=False)
    cos, sin = rope

    def run(tokens, pos, span, ks, vs) -> torch.Tensor:
        for t in (tokens, pos, span, *ks, *vs):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return _gpu_step(tokens, pos, span, weights, ks, vs, cos, sin, n_head, eps)

    return run


COMMIT_POSITIONS = 256  # a slot's cache is zeroed (its memory committed) this many positions at a time


class ReservedCache(KVCache):
    """A :class:`KVCache` whose memory is committed as its slots fill, not when it is made.

    Why: a server's cache holds the longest request (prompt limit + max new tokens) in every slot
    (``serve.max_batch``): 16 slots x 4,353 positions of a 30-layer, 3-kv-head model are 3.2 GB, of which a
    few requests use megabytes. The tensors are allocated empty (a large one is a fresh mapping whose
    pages the kernel provides on first touch), and positions are committed by the writes that fill
    them, or zeroed ``COMMIT_POSITIONS`` at a time by :meth:`commit` just before a batched step first
    reads them: that step reads each row up to the longest row's end, masked, but 0 x NaN is NaN, so
    those positions must hold finite values. ``ready[s]``: positions 0..ready[s]-1 of slot s do.
    Resident memory thus follows the tokens held; :meth:`release` gives it back (an idle server).
    """

    def __init__(self, cfg, slots: int, max_len: int, device=None, dtype=torch.float32):
        self.shape = (slots, cfg.n_kv_head, max_len + 1, cfg.head_dim)
        self.n_layer, self.device, self.dtype = cfg.n_layer, device, dtype
        self.max_len = max_len
        self.lens = [0] * slots
        self._reserve()

    def _reserve(self) -> None:
        kw = {"device": self.device, "dtype": self.dtype}
        # new lists, then one assignment: a compile thread reading the cache's shapes never sees an empty one
        k = [torch.empty(self.shape, **kw) for _ in range(self.n_layer)]
        v = [torch.empty(self.shape, **kw) for _ in range(self.n_layer)]
        self.k, self.v, self.ready = k, v, [0] * len(self.lens)

    @property
    def position_bytes(self) -> int:
        """Bytes of one position of one slot, all layers' keys and values."""
        _, hkv, _, d = self.shape
        return 2 * self.n_layer * hkv * d * self.k[0].element_size()

    def committed_bytes(self) -> int:
        return sum(self.ready) * self.position_bytes

    def written(self, slot: int, n: int) -> None:
        """Positions 0..n-1 of ``slot`` were just written (a prefill, a move)."""
        self.ready[slot] = max(self.ready[slot], n)

    def commit(self, rows: int, n: int) -> None:
        """Make positions 0..n-1 of slots 0..rows-1 finite before a step reads them."""
        ready = self.ready
        if min(ready[:rows]) >= n:
            return
        end = min(-(-n // COMMIT_POSITIONS) * COMMIT_POSITIONS, self.max_len + 1)
        for s in range(rows):
            if ready[s] < n:
                for k, v in zip(self.k, self.v, strict=True):
                    k[s, :, ready[s] : end].zero_()
                    v[s, :, ready[s] : end].zero_()
                ready[s] = end

    def move(self, src: int, dst: int) -> None:
        super().move(src, dst)
        self.written(dst, self.lens[dst])

    def release(self) -> None:
        """Drop every slot's content and give its memory back (fresh, uncommitted tensors replace the old)."""
        self.lens = [0] * len(self.lens)
        self._reserve()


class Decoder:
    """Incremental decoding of up to ``slots`` sequences of ``max_len`` tokens over one :class:`KVCache`.

    :meth:`prefill` puts a prompt into a slot (the model's own forward) and returns its next-token
    logits (1, V); :meth:`step` decodes the slots 0..B-1 together, one token each, and returns (B, V).
    The step is eager, or with ``compiled`` the compiled one (:meth:`compile` switches later, e.g. from a
    background thread, since both read and write the same cache). Compiled decoders of the same model
    shape and ``max_len`` share one compiled step, so a decoder per sequence costs only its cache.
    """

    def __init__(self, model: Transformer, max_len: int, slots: int = 1, compiled: bool = False):
        if compiled:
            compiled_cache_dir()  # before anything imports torch._dynamo, which fixes Inductor's cache folder
        model = unwrap(model)
        self.model, self.cfg, self.max_len = model, model.cfg, max_len
        p = model.embed.weight
        self.cache = ReservedCache(self.cfg, slots, max_len, p.device, p.dtype)
        self.rope = model.rope(0, max_len)  # (max_len, D) x2, grown now, not inside a step
        device = model.embed.weight.device
        self._span = torch.empty(max_len + 1, device=device)  # its slices carry the attended length
        self._views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # B -> slots 0..B-1
        self.weights = weights = step_weights(model, compiled=False)  # what the step in use reads
        H, eps, (cos, sin) = self.cfg.n_head, self.cfg.norm_eps, self.rope

        def eager(tokens, pos, span, ks, vs) -> torch.Tensor:
            return step(tokens, pos, span, weights, ks, vs, cos, sin, H, eps)

        self._run: Runner = eager
        self.compiled = False
        if compiled:
            self.compile()

    def compile(self) -> None:
        """Switch to the compiled step, compiling it (or loading it from the lmops home) first.

        Two compiled steps where the cache has several slots: one for a single row, one for any B >= 2.
        """
        compiled_cache_dir()
        weights = step_weights(self.model, compiled=True)
        runner = _cpu_runner if self.model.embed.weight.device.type == "cpu" else _gpu_runner
        args = (weights, self.rope, self.cache, self.cfg.n_head, self.cfg.norm_eps)
        one = runner(*args, rows=1)
        run = one
        if self.slots > 1:
            many = runner(*args, rows=2)

            def run(tokens, pos, span, ks, vs) -> torch.Tensor:
                return (one if tokens.shape[0] == 1 else many)(tokens, pos, span, ks, vs)

        with torch.inference_mode():
            for rows in (1, 2) if self.slots > 1 else (1,):  # on a GPU this compiles; on a CPU a check
                run(*_sample_inputs(self.cache, rows))
        self._run, self.weights, self.compiled = run, weights, True

    @property
    def slots(self) -> int:
        return self.cache.slots

    @torch.inference_mode()
    def prefill(self, ids: list[int], slot: int = 0) -> torch.Tensor:
        """A prompt (1 .. max_len-1 tokens) into ``slot`` (its previous content is dropped) -> logits (1, V)."""
        if not 0 < len(ids) < self.max_len:
            raise ValueError(f"a prompt of {len(ids)} tokens does not fit a decoder of {self.max_len} slots")
        self.cache.lens[slot] = 0
        x = torch.tensor([ids], dtype=torch.long, device=self.model.embed.weight.device)
        logits, _ = self.model(x, cache=self.cache, last_only=True, slot=slot)  # (1, 1, V)
        self.cache.written(slot, len(ids))
        return logits[:, -1, :]

    @torch.inference_mode()
    def prefill_many(self, prompts: list[list[int]], slot: int) -> torch.Tensor:
        """Prompts into slots slot..slot+n-1 with one forward pass -> logits (n, V).

        Right-padded to the longest: a row's padding is written past its own length, where the
        step's mask hides it from that row until its own tokens overwrite it."""
        if len(prompts) == 1:
            return self.prefill(prompts[0], slot)
        if not all(0 < len(ids) < self.max_len for ids in prompts):
            raise ValueError(f"a prompt does not fit a decoder of {self.max_len} slots")
        T = max(len(ids) for ids in prompts)
        device = self.model.embed.weight.device
        x = torch.tensor([ids + [0] * (T - len(ids)) for ids in prompts], dtype=torch.long, device=device)
        last = torch.tensor([len(ids) - 1 for ids in prompts], device=device)
        self.cache.lens[slot : slot + len(prompts)] = [0] * len(prompts)
        logits, _ = self.model(x, cache=self.cache, slot=slot, last=last)  # (n, 1, V)
        self.cache.lens[slot : slot + len(prompts)] = [len(ids) for ids in prompts]
        for s in range(slot, slot + len(prompts)):
            self.cache.written(s, T)  # padding included
        return logits[:, -1, :]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) or (B, 1), the next token of slots 0..B-1 -> their next-token logits (B, V)."""
        tokens = tokens.reshape(-1)
        B = tokens.shape[0]
        lens = self.cache.lens
        top = max(lens[:B]) if B > 1 else lens[0]
        if top >= self.max_len:
            raise ValueError(f"decoder cache full: {self.max_len} slots")
        if 0 in lens[:B]:
            raise ValueError(f"slot {lens.index(0)} is empty: prefill it first")
        views = self._views.get(B)
        if views is None:
            views = self._views[B] = ([k[:B] for k in self.cache.k], [v[:B] for v in self.cache.v])
        if B > 1:  # a row reads up to the longest row's end (one row reads only what it wrote)
            self.cache.commit(B, top + 1)
        pos = torch.tensor(lens[:B], device=tokens.device)
        # top + 2 elements: the attended length top + 1, plus one to keep the dimension clear of the
        # sizes 0 and 1 that the compiler specialises
        logits = self._run(tokens, pos, self._span[: top + 2], *views)
        for b in range(B):
            lens[b] += 1
        return logits

    def move(self, src: int, dst: int) -> None:
        """Move slot ``src``'s sequence into slot ``dst`` (a batch keeps its rows in the leading slots)."""
        self.cache.move(src, dst)

    def release(self) -> None:
        """Empty every slot and give the cache's memory back (see :class:`ReservedCache`)."""
        self._views = {}
        self.cache.release()
