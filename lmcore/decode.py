"""A compiled single-token decode step: batch-1 generation without per-op overhead.

Why: an eager decode step is a few hundred tiny ops, and on a CPU each costs 3-30 us of
dispatch, so a small model spends most of a token in overhead. ``torch.compile`` fuses the
element-wise work (RMSNorm, RoPE, residuals, SwiGLU, the attention softmax) into C++ loops
around the matrix products. Three choices keep the step fast and compiled once per model shape:

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
Compiling takes 10-30 s on 2 CPU cores the first time a shape is seen (Inductor caches the result
on disk), so this is for long generations and servers, not one-offs.

Shapes: H heads, Hkv kv-heads, G = H / Hkv, D head dim, L cache slots, n attended slots, V vocab.
"""

from __future__ import annotations

import os
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmcore.model import Transformer, apply_rope

# A weight is a float matrix (out, in), or int8 values (out, in) with float32 scales (out,).
Weight = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

CPU_INDUCTOR_OPTIONS = {
    # materialise each element-wise result once: left to itself Inductor inlines the RMSNorm or
    # SwiGLU math into the int8 matrix-vector loops and recomputes it for every output row (1.5x slower)
    "realize_opcount_threshold": 1,
    "cpp_wrapper": True,  # the buffer and kernel calls in C++, not Python: ~0.2 ms less per token
    "size_asserts": False,  # per-input Python checks cost as much as a small model's arithmetic
    "alignment_asserts": False,
    "scalar_asserts": False,
    "memory_planning": True,
}


def _cache_dir() -> None:
    """Inductor's on-disk cache under the lmops home, not /tmp (``apply_environment`` sets it for the CLI)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from lmcore.settings import get_settings

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(get_settings().inductor_cache)


def _weight(mod: nn.Module) -> Weight:
    q = getattr(mod, "int8_weight", None)
    if q is not None:
        return q, mod.int8_scale
    return mod.weight


def _linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
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
        qkv = _linear(_rms(x, attn_norm, eps), qkv_w).view(n_head + 2 * Hkv, D)
        qk, v = qkv.split((n_head + Hkv, Hkv), dim=0)
        q, k = apply_rope(qk, cos, sin).split((n_head, Hkv), dim=0)  # (H, D), (Hkv, D)
        kc.index_copy_(2, pos, k.view(1, Hkv, 1, D))  # kc, vc: (1, Hkv, L, D)
        vc.index_copy_(2, pos, v.view(1, Hkv, 1, D))
        att = (q.view(Hkv, G, D) @ kc[0, :, :n].transpose(-1, -2)) * D**-0.5  # (Hkv, G, n)
        y = att.softmax(dim=-1) @ vc[0, :, :n]  # (Hkv, G, D)
        x = x + _linear(y.reshape(1, 1, n_head * D), proj_w)
        gate, up = _linear(_rms(x, mlp_norm, eps), gate_up_w).chunk(2, dim=-1)
        x = x + _linear(F.silu(gate) * up, down_w)
    return _linear(_rms(x, norm, eps), head)[0]  # (1, V)


_compiled_steps: dict[str, object] = {}
_compile_lock = threading.Lock()


def _compiled(device_type: str):
    """The compiled step for a device type (on GPUs Inductor's defaults: Triton kernels, Python wrapper)."""
    with _compile_lock:
        if device_type not in _compiled_steps:
            _cache_dir()
            options = CPU_INDUCTOR_OPTIONS if device_type == "cpu" else {}
            _compiled_steps[device_type] = torch.compile(_step, fullgraph=True, dynamic=False, options=options)
        return _compiled_steps[device_type]


class CompiledDecoder:
    """Decode one sequence at a time with a compiled step over a static KV cache of ``max_len`` slots.

    :meth:`prefill` takes the prompt, :meth:`step` each new token; both return next-token
    logits (1, V). One sequence at a time (prefill starts the next); decoders of the same model
    shape and ``max_len`` share one compiled graph, so a decoder per sequence costs only its cache.
    """

    def __init__(self, model: Transformer, max_len: int):
        model = getattr(model, "_orig_mod", model)
        cfg = model.cfg
        self.model, self.cfg, self.max_len = model, cfg, max_len
        device = model.embed.weight.device
        shape = (1, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device) for _ in range(cfg.n_layer)]
        self.weights = (
            model.embed.weight,
            tuple((b.attn_norm.weight, _weight(b.attn.qkv), _weight(b.attn.proj), b.mlp_norm.weight,
                   _weight(b.mlp.gate_up), _weight(b.mlp.down)) for b in model.blocks),
            model.norm.weight,
            _weight(model.lm_head),
        )
        model._rope(0, max_len)  # grow the RoPE table now, not inside the compiled step
        self._slots = torch.empty(max_len + 1, device=device)  # its slices carry the attended length
        self.pos = 0
        self._fn = _compiled(device.type)  # before anything imports torch._dynamo, which fixes Inductor's cache folder

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
        # sizes 0 and 1 that the compiler specialises (a second graph); the first step has pos >= 1
        slots = self._slots[: self.pos + 2]
        torch._dynamo.maybe_mark_dynamic(slots, 0)
        pos = torch.tensor([self.pos], device=token.device)
        logits = self._fn(token, pos, slots, self.weights, self.k, self.v, self.model.rope_cos,
                           self.model.rope_sin, self.cfg.n_head, self.cfg.norm_eps)
        self.pos += 1
        return logits
