"""The int8-dynamic model format: per-channel int8 linear weights plus scales, and the model they load as.

This is a checkpoint format (:func:`lmcore.model.checkpoint.load_model` reads it), so it sits below
both the checkpoint code and the quantization job (:mod:`lmcore.optimize.quantize`), which
imports it: neither imports the other back. See :mod:`lmcore.optimize.quantize` for why dynamic
int8 and why these modules are built directly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from lmcore.errors import LmopsError
from lmcore.model.transformer import ModelConfig, Transformer
from lmcore.model.weights import tie_head
from lmcore.probe import decode_probe

QUANTIZATION = "int8-dynamic"
SCALE_SUFFIX = "_scale"


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (out, in) int8 values and (out,) float32 scales, w ~= q * scale."""
    w = w.detach().float().cpu()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def _dynamic_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A ``DynamicQuantizedLinear`` holding exactly ``q * scale`` (per-channel qint8)."""
    out_f, in_f = q.shape
    with warnings.catch_warnings():  # quantized tensor creation warns of a future removal (see module doc)
        warnings.simplefilter("ignore", UserWarning)
        mod = DynamicLinear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
        w = q.float() * scale[:, None]  # exact multiples of scale, so re-quantizing returns q
        qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(out_f, dtype=torch.long), 0, torch.qint8)
        mod.set_weight_bias(qw, bias)
    mod.int8_weight, mod.int8_scale = q, scale  # the same values in plain tensors, for lmcore.model.decode
    return mod


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantized_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The safetensors payload: int8 + scales for every linear weight, fp32 for the rest."""
    linears = set(_linear_names(model))
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        mod_name, _, leaf = name.rpartition(".")
        if mod_name in linears and leaf == "weight":
            q, scale = quantize_weight(t)
            state[name] = q.contiguous()
            state[name + SCALE_SUFFIX] = scale.contiguous()
        else:
            state[name] = t.detach().float().cpu().contiguous().clone()  # clone: tied weights share storage
    return state


def load_quantized(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """Rebuild a CPU model from :func:`quantized_state` output: linear layers become int8 dynamic."""
    model = Transformer(cfg)
    linears = _linear_names(model)
    float_state = {k: v for k, v in state.items() if not k.endswith(SCALE_SUFFIX)}
    for name in linears:
        key = f"{name}.weight"
        if key not in state or key + SCALE_SUFFIX not in state:
            raise LmopsError(f"quantized weights lack {key} or its scale")
        float_state.pop(key)
    tie_head(float_state, cfg)  # the float model ties lm_head to embed; fill the (unused) slot
    try:
        model.load_state_dict(float_state, strict=False)
    except RuntimeError as e:
        raise LmopsError(f"quantized weights do not match their config: {str(e).splitlines()[0]}") from None
    missing = set(model.state_dict()) - set(float_state) - {f"{n}.weight" for n in linears}
    if missing:
        raise LmopsError(f"quantized weights lack {sorted(missing)[0]}")
    with _quantized_engine(cfg):  # weights are packed for, and later run by, the engine packing them
        for name in linears:
            key = f"{name}.weight"
            bias = state.get(f"{name}.bias")
            _set_module(model, name, _dynamic_linear(state[key], state[key + SCALE_SUFFIX], bias))
    return model.eval()


@contextmanager
def _quantized_engine(cfg: ModelConfig) -> Iterator[None]:
    """Pack with the quantized engine (x86, fbgemm, onednn) that ran int8 linears fastest at this
    model's shapes on this machine (``lmcore.probe.decode_probe``): they differ by up to 3x by CPU."""
    engine = decode_probe(cfg).int8_engine
    saved = torch.backends.quantized.engine
    if engine and engine != saved:
        torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = saved
