"""A compiled single-token decode step: batch-1 generation without per-op overhead.

Why: an eager decode step is a few hundred tiny ops, and on a CPU each costs 3-30 us of
dispatch, so a small model spends most of a token in overhead. Inductor fuses the element-wise
work (RMSNorm, RoPE, residuals, SwiGLU, the attention softmax) into C++ loops around the matrix
products. On a CPU the step is compiled ahead of time (``torch.export`` + AOTInductor) into a
library that is called with a ready list of tensors: ``torch.compile`` would add Dynamo's guards
and Python wrappers to every token (for the 6 x 6 x 384 model 0.17 ms of an fp32 token and
0.26 ms of an int8 one: 11 % and 24 %). On GPUs it is ``torch.compile`` with Inductor's defaults.
Three choices keep the step fast and compiled once per model shape:

- every layer's keys and values live in their own preallocated tensors, written in place with
  ``index_copy_`` (a slice of one shared cache tensor makes the compiler copy the whole cache);
- the attended length is a dynamic dimension, carried by the shape of a slice of a scratch
  tensor, so the step reads the filled slots only and one graph serves every position;
- the weights are inputs, not captured module attributes, so another model of the same shape
  (a reloaded version, a fresh decoder) reuses the compiled code.

Int8 models (``lmcore.optimize.quantize``) stay int8 here: each matrix-vector product reads int8
weights, widens them in registers and applies the per-row scale afterwards (weight-only int8;
activations stay fp32), so a token reads a quarter of the weight bytes. This differs from the
eager int8 path (torch's dynamic quantization, which also rounds activations); both are measured.

The prompt is prefilled by the model's ordinary forward (for an int8 model that is the eager,
dynamically quantized one); its keys and values are then copied into the decoder's cache once.
Compiling takes 20-30 s on 2 CPU cores the first time a shape is seen; the library is kept under
the lmops home (``cache/decode``), so a later process loads it in ~4 s (mostly importing
Inductor) and later decoders get it at once. This is for long generations and servers, not one-offs.

Shapes: H heads, Hkv kv-heads, G = H / Hkv, D head dim, L cache slots, n attended slots, V vocab.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lmcore.model import Transformer, apply_rope

# A weight is a float matrix (out, in), or int8 values (out, in) with float32 scales (out,).
Weight = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

CPU_INDUCTOR_OPTIONS = {
    # materialise each element-wise result once: left to itself Inductor inlines the RMSNorm or
    # SwiGLU math into the int8 matrix-vector loops and recomputes it for every output row (1.5x slower)
    "realize_opcount_threshold": 1,
    "size_asserts": False,  # per-input checks cost as much as a small model's arithmetic
    "alignment_asserts": False,
    "scalar_asserts": False,
    "memory_planning": True,  # one buffer pool per call (under torch.compile: wrapper time 488 -> 261 us)
}
# int8 steps only: share the small loops (norms, softmax) between the threads as well; the
# int8 step gets 4-5% faster, while the fp32 one, whose time is in MKL's matrix products, gets slower
CPU_INT8_OPTIONS = {"cpp.min_chunk_size": 8}


def compiled_cache_dir() -> None:
    """Inductor's on-disk cache under the lmops home, not /tmp (``apply_environment`` sets it for the CLI)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from lmcore.settings import get_settings

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
    from lmcore.probe import int8_matvec_speedup

    return int8_matvec_speedup()["speedup"] >= 1.0


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x (1, 1, in) -> (1, 1, out); an int8 weight becomes one fused widen-multiply-sum over its rows."""
    if isinstance(w, tuple):
        q, scale = w
        return (x.unsqueeze(-2) * q).sum(-1) * scale  # (1, 1, out, in) is never materialised
    return F.linear(x, w)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _step(token, pos, slots, weights, ks, vs, rope_cos, rope_sin, n_head: int, eps: float) -> torch.Tensor:
    """One token through the model: token (1, 1), pos (1,) -> logits (1, V); writes slot ``pos`` of ks/vs."""
    embed, blocks, norm, head = weights
    n = slots.shape[0] - 1  # attended slots: pos + 1
    Hkv, D = ks[0].shape[1], ks[0].shape[3]
    G = n_head // Hkv
    cos, sin = rope_cos[pos], rope_sin[pos]  # (1, D), sin's first half negated as in lmcore.model
    x = F.embedding(token, embed)  # (1, 1, C)
    for (attn_norm, qkv_w, proj_w, mlp_norm, gate_up_w, down_w), kc, vc in zip(blocks, ks, vs, strict=True):
        qkv = linear(_rms(x, attn_norm, eps), qkv_w).view(n_head + 2 * Hkv, D)
        qk, v = qkv.split((n_head + Hkv, Hkv), dim=0)
        q, k = apply_rope(qk, cos, sin).split((n_head, Hkv), dim=0)  # (H, D), (Hkv, D)
        kc.index_copy_(2, pos, k.view(1, Hkv, 1, D))  # kc, vc: (1, Hkv, L, D)
        vc.index_copy_(2, pos, v.view(1, Hkv, 1, D))
        att = (q.view(Hkv, G, D) @ kc[0, :, :n].transpose(-1, -2)) * D**-0.5  # (Hkv, G, n)
        y = att.softmax(dim=-1) @ vc[0, :, :n]  # (Hkv, G, D)
        x = x + linear(y.reshape(1, 1, n_head * D), proj_w)
        gate, up = linear(_rms(x, mlp_norm, eps), gate_up_w).chunk(2, dim=-1)
        x = x + linear(F.silu(gate) * up, down_w)
    return linear(_rms(x, norm, eps), head)[0]  # (1, V)


class _Step(nn.Module):
    """``_step`` as a module: what ``torch.export`` traces (the int arguments become constants)."""

    def __init__(self, n_head: int, eps: float):
        super().__init__()
        self.n_head, self.eps = n_head, eps

    def forward(self, token, pos, slots, weights, ks, vs, rope_cos, rope_sin) -> torch.Tensor:
        return _step(token, pos, slots, weights, ks, vs, rope_cos, rope_sin, self.n_head, self.eps)


Runner = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # flat inputs -> [logits (1, V)]
_runners: dict[str, Runner] = {}
_compile_lock = threading.Lock()


def _cpu_runner(args: tuple, n_head: int, eps: float) -> Runner:
    """The step AOT-compiled (AOTInductor) for these argument shapes: once per process, cached on disk.

    Why AOT rather than ``torch.compile``: a compiled function pays Dynamo's guards and Python
    wrappers on every call, about 0.2 ms of a 0.8-1.2 ms token here; the AOT-compiled library is
    called with a ready list of tensors. The attended length (``slots``) stays dynamic.
    """
    leaves = tree_flatten(args)[0]
    int8 = any(t.dtype == torch.int8 for t in leaves)
    options = {**CPU_INDUCTOR_OPTIONS, **(CPU_INT8_OPTIONS if int8 else {})}
    # the library is built for this CPU's vector ISA (a home shared with another machine gets its own)
    sig = [torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), n_head, eps,
           sorted(options.items())]
    sig += [(tuple(t.shape), str(t.dtype)) for i, t in enumerate(leaves) if i != 2]  # leaf 2: slots, dynamic
    # which inputs are one tensor (a tied embedding and head): export folds aliased inputs into one,
    # so a library built for a tied model would read the embedding as the head of an untied one
    sig.append([next(j for j, u in enumerate(leaves) if u is t) for t in leaves])
    key = hashlib.sha256(repr(sig).encode()).hexdigest()[:24]
    with _compile_lock:
        if key not in _runners:
            from lmcore.settings import get_settings

            path = get_settings().decode_cache / f"step-{key}.pt2"
            if not path.is_file():
                slots = torch.export.Dim("slots", min=3, max=args[4][0].shape[2])  # attended + 1 < cache slots
                static = tree_map(lambda _: None, args)
                shapes = (*static[:2], {0: slots}, *static[3:])
                with torch.inference_mode():
                    program = torch.export.export(_Step(n_head, eps), args, dynamic_shapes=shapes)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=options)
                tmp.replace(path)
            _runners[key] = torch._inductor.aoti_load_package(str(path)).loader.run
        return _runners[key]


_gpu_step = None


def _gpu_runner(args: tuple, n_head: int, eps: float) -> Runner:
    """On GPUs ``torch.compile`` with Inductor's defaults (Triton kernels), behind the same flat-list call."""
    global _gpu_step
    with _compile_lock:
        if _gpu_step is None:
            _gpu_step = torch.compile(_step, fullgraph=True, dynamic=False)
    spec = tree_flatten(args)[1]

    def run(flat: list[torch.Tensor]) -> list[torch.Tensor]:
        torch._dynamo.maybe_mark_dynamic(flat[2], 0)
        return [_gpu_step(*tree_unflatten(flat, spec), n_head, eps)]

    return run


class CompiledDecoder:
    """Decode one sequence at a time with a compiled step over a static KV cache of ``max_len`` slots.

    :meth:`prefill` takes the prompt, :meth:`step` each new token; both return next-token
    logits (1, V). One sequence at a time (prefill starts the next); decoders of the same model
    shape and ``max_len`` share one compiled graph, so a decoder per sequence costs only its cache.
    """

    def __init__(self, model: Transformer, max_len: int):
        compiled_cache_dir()  # before anything imports torch._dynamo, which fixes Inductor's cache folder
        model = getattr(model, "_orig_mod", model)
        cfg = model.cfg
        self.model, self.cfg, self.max_len = model, cfg, max_len
        device = model.embed.weight.device
        # one slot more than can be attended: a slice of all of them would be specialised (a second graph)
        shape = (1, cfg.n_kv_head, max_len + 1, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device) for _ in range(cfg.n_layer)]
        self.int8_kernels = k = use_int8_kernels(model)
        self.weights = weights = (
            model.embed.weight,
            tuple((b.attn_norm.weight, _weight(b.attn.qkv, k), _weight(b.attn.proj, k), b.mlp_norm.weight,
                   _weight(b.mlp.gate_up, k), _weight(b.mlp.down, k)) for b in model.blocks),
            model.norm.weight,
            _weight(model.lm_head, k),
        )
        model._rope(0, max_len)  # grow the RoPE table now, not inside the compiled step
        self._slots = torch.empty(max_len + 1, device=device)  # its slices carry the attended length
        token, pos = torch.zeros(1, 1, dtype=torch.long, device=device), torch.ones(1, dtype=torch.long, device=device)
        rope = model.rope_cos[:max_len], model.rope_sin[:max_len]
        args = (token, pos, self._slots[:3], weights, self.k, self.v, *rope)
        runner = _cpu_runner if device.type == "cpu" else _gpu_runner
        self._run = runner(args, cfg.n_head, cfg.norm_eps)
        self._inputs = tree_flatten(args)[0]  # token, pos and slots change per step; the rest stays
        self.pos = 0

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """The prompt (1 .. max_len-1 tokens) through the model's own forward -> logits (1, V) after it."""
        if not 0 < len(ids) < self.max_len:
            raise ValueError(f"a prompt of {len(ids)} tokens does not fit a decoder of {self.max_len} slots")
        cache = self.model.new_cache(1, len(ids))
        x = torch.tensor([ids], dtype=torch.long, device=self.k[0].device)
        logits, _ = self.model(x, cache=cache, last_only=True)  # (1, 1, V)
        for i in range(self.cfg.n_layer):
            self.k[i][:, :, : len(ids)] = cache.k[i]
            self.v[i][:, :, : len(ids)] = cache.v[i]
        self.pos = len(ids)
        return logits[:, -1, :]

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (1, 1) for slot ``pos`` -> logits (1, V) for the slot after it."""
        if self.pos >= self.max_len:
            raise ValueError(f"decoder cache full: {self.max_len} slots")
        # pos + 2 elements: the attended length pos + 1, plus one to keep the dimension clear of the
        # sizes 0 and 1 that the compiler specialises; the first step has pos >= 1
        inputs = self._inputs
        inputs[0], inputs[1] = token, torch.tensor([self.pos], device=token.device)
        inputs[2] = self._slots[: self.pos + 2]
        logits = self._run(inputs)[0]
        self.pos += 1
        return logits
