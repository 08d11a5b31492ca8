"""Int8 dynamic quantization of a model's linear layers, for CPU serving.

Why this way: weights are quantized once, per output channel, symmetric int8; activations are
quantized on the fly per batch by torch's ``quantized::linear_dynamic`` kernels (fbgemm/onednn),
which is what makes batch-1 CPU decoding faster. We build ``torch.ao.nn.quantized.dynamic.Linear``
modules directly instead of calling ``torch.ao.quantization.quantize_dynamic``: that entry point
is deprecated in torch 2.13 (the kernels and modules are not), and torchao's replacement
(``Int8DynamicActivationInt8WeightConfig``, torchao 0.18) ran ~2x *slower* than fp32 in eager
mode on this CPU. torch 2.13 also warns that quantized tensor dtypes (qint8) will go in a future
release; when they do, only :func:`_dynamic_linear` needs a new backend.

On disk a quantized model folder is an ordinary model folder whose ``config.json`` carries
``"quantization": "int8-dynamic"``; ``model.safetensors`` holds each linear weight as an int8
tensor plus a float32 ``<name>_scale`` per output row, the rest in fp32. No pickle anywhere:
:func:`lmcore.checkpoint.load_model` sees the key and calls :func:`load_quantized`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmcore.errors import LmopsError
from lmcore.model import ModelConfig, Transformer

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
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    out_f, in_f = q.shape
    with warnings.catch_warnings():  # quantized tensor creation warns of a future removal (see module doc)
        warnings.simplefilter("ignore", UserWarning)
        mod = DynamicLinear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
        w = q.float() * scale[:, None]  # exact multiples of scale, so re-quantizing returns q
        qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(out_f, dtype=torch.long), 0, torch.qint8)
        mod.set_weight_bias(qw, bias)
    mod.int8_weight, mod.int8_scale = q, scale  # the same values in plain tensors, for lmcore.decode
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
    if cfg.tie_embeddings:  # the float model ties lm_head to embed; fill the (unused) slot
        float_state["lm_head.weight"] = state.get("embed.weight")
    try:
        model.load_state_dict(float_state, strict=False)
    except RuntimeError as e:
        raise LmopsError(f"quantized weights do not match their config: {str(e).splitlines()[0]}") from None
    missing = set(model.state_dict()) - set(float_state) - {f"{n}.weight" for n in linears}
    if missing:
        raise LmopsError(f"quantized weights lack {sorted(missing)[0]}")
    for name in linears:
        key = f"{name}.weight"
        bias = state.get(f"{name}.bias")
        _set_module(model, name, _dynamic_linear(state[key], state[key + SCALE_SUFFIX], bias))
    return model.eval()


def quantize_model(model: Transformer) -> Transformer:
    """An int8-dynamic copy of a float model (exactly what a quantized folder loads back as)."""
    model = getattr(model, "_orig_mod", model)
    return load_quantized(model.cfg, quantized_state(model.cpu()))


def save_quantized(src_dir: str | Path, out_dir: str | Path, extra_meta: dict[str, Any] | None = None) -> Path:
    """Quantize the model folder ``src_dir`` into a new model folder ``out_dir`` (atomic)."""
    from safetensors.torch import save_file

    from lmcore.checkpoint import CONFIG, TOKENIZER, WEIGHTS, atomic_dir, commit_dir, load_model

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    model, tokenizer, meta = load_model(src_dir, "cpu")
    if meta.get("quantization"):
        raise LmopsError(f"model in {src_dir} is already quantized ({meta['quantization']})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_dir(out_dir)
    try:
        save_file(quantized_state(model), str(tmp / WEIGHTS))
        new_meta = {**meta, "quantization": QUANTIZATION, **(extra_meta or {})}
        (tmp / CONFIG).write_text(json.dumps(new_meta, indent=2, default=str))
        tokenizer.save(tmp / TOKENIZER)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_dir(tmp, out_dir)


# --- measuring what quantization buys and costs -------------------------------------------------


@torch.inference_mode()
def bits_per_byte(model: Transformer, tokenizer, texts: list[str], max_tokens: int = 20_000) -> float:
    """Bits per UTF-8 byte on ``texts`` (non-overlapping block-size windows, first ``max_tokens``)."""
    ids: list[int] = []
    n_bytes = 0
    for t in texts:
        ids.extend([*tokenizer.encode(t), tokenizer.eos_id])
        n_bytes += len(t.encode("utf-8"))
        if len(ids) > max_tokens:
            break
    ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise LmopsError("not enough text to measure bits per byte")
    # bytes actually scored, from the tokenizer's own decoding of the targets
    scored_bytes = len(tokenizer.decode(ids[1:]).encode("utf-8")) or n_bytes
    block = model.cfg.block_size
    total_nll = 0.0
    for s in range(0, len(ids) - 1, block):
        x = torch.tensor([ids[s : s + block]])  # (1, T)
        y = torch.tensor([ids[s + 1 : s + 1 + block]])  # (1, T')
        x = x[:, : y.shape[1]]
        logits, _ = model(x)  # (1, T, V)
        total_nll += float(torch.nn.functional.cross_entropy(logits[0].float(), y[0], reduction="sum"))
    return total_nll / math.log(2) / scored_bytes


def weight_only_model(int8: Transformer) -> Transformer:
    """A float model whose linear weights are exactly ``q * scale``: the numerics of compiled int8 decoding.

    ``lmcore.decode`` runs an int8 model weight-only (activations stay fp32), while the eager
    path quantizes activations too; this copy lets bits per byte be measured for the former.
    """
    from dataclasses import replace

    model = Transformer(replace(int8.cfg, tie_embeddings=False))  # lm_head is the int8 copy of the embedding
    state = {k: v for k, v in int8.state_dict().items() if isinstance(v, torch.Tensor) and not v.is_quantized}
    for name in _linear_names(model):
        mod = int8.get_submodule(name)
        state[f"{name}.weight"] = mod.int8_weight.float() * mod.int8_scale[:, None]
    missing = model.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise LmopsError(f"not an int8 model of this shape: {missing[0]} is missing")
    return model.eval()


@torch.inference_mode()
def decode_tokens_per_s(model: Transformer, prompt_ids: list[int], new_tokens: int = 128, repeats: int = 3,
                        compiled: bool = False) -> float:
    """Best-of-``repeats`` batch-1 greedy decoding speed, with the KV cache (tokens per second)."""
    from lmcore.generate import SamplingParams, generate_tokens

    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(1 for _ in generate_tokens(model, prompt_ids, sp, compiled=compiled))
        best = max(best, n / max(time.perf_counter() - t0, 1e-9))
    return best


def read_eval_texts(path: str | Path, max_chars: int = 200_000) -> list[str]:
    """Validation text for bpb: a prepared folder's ``val_docs.jsonl``, a text file, or a folder of them."""
    path = Path(path)
    if (path / "val_docs.jsonl").is_file():
        texts = [json.loads(line) for line in (path / "val_docs.jsonl").read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    elif path.is_file():
        texts = [path.read_text(encoding="utf-8", errors="replace")]
    elif path.is_dir():
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.rglob("*.txt"))]
    else:
        raise LmopsError(f"evaluation data not found: {path}")
    out, n = [], 0
    for t in texts:
        out.append(t[: max_chars - n])
        n += len(out[-1])
        if n >= max_chars:
            break
    if not any(t.strip() for t in out):
        raise LmopsError(f"no text to evaluate in {path}")
    return out


def compare(fp32: Transformer, int8: Transformer, tokenizer, texts: list[str] | None,
            new_tokens: int = 128, repeats: int = 3, max_tokens: int = 20_000,
            threads: int | None = None, log: Callable[[str], None] | None = None,
            compiled: bool = True) -> dict[str, float]:
    """Side-by-side batch-1 decode speed and (with ``texts``) bits per byte of fp32 vs int8.

    ``compiled`` times both with ``lmcore.decode``'s compiled step (how lmops decodes long outputs);
    then ``int8_wo_bpb`` / ``bpb_change_wo`` are measured too: the weight-only numerics that step runs.
    """
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        prompt = tokenizer.encode(texts[0][:200]) if texts else [tokenizer.eos_id]
        decode_tokens_per_s(fp32, prompt, 8, 1, compiled)  # warm up (and compile) both
        decode_tokens_per_s(int8, prompt, 8, 1, compiled)
        out: dict[str, float] = {"compiled_decode": float(compiled)}
        out["fp32_tokens_per_s"] = decode_tokens_per_s(fp32, prompt, new_tokens, repeats, compiled)
        out["int8_tokens_per_s"] = decode_tokens_per_s(int8, prompt, new_tokens, repeats, compiled)
        out["speedup"] = out["int8_tokens_per_s"] / out["fp32_tokens_per_s"]
        if log:
            log(f"decode: fp32 {out['fp32_tokens_per_s']:.1f} tok/s, int8 {out['int8_tokens_per_s']:.1f} tok/s")
        if texts:
            out["fp32_bpb"] = bits_per_byte(fp32, tokenizer, texts, max_tokens)
            out["int8_bpb"] = bits_per_byte(int8, tokenizer, texts, max_tokens)
            out["bpb_change"] = (out["int8_bpb"] - out["fp32_bpb"]) / out["fp32_bpb"]
            if compiled:
                out["int8_wo_bpb"] = bits_per_byte(weight_only_model(int8), tokenizer, texts, max_tokens)
                out["bpb_change_wo"] = (out["int8_wo_bpb"] - out["fp32_bpb"]) / out["fp32_bpb"]
        return out
    finally:
        torch.set_num_threads(prev)


def model_bytes(folder: str | Path) -> int:
    from lmcore.checkpoint import WEIGHTS

    return (Path(folder) / WEIGHTS).stat().st_size


# --- the `lmops optimize quantize` job: source -> int8 folder -> measured -> registered ----------


def _eval_texts_for(meta: dict[str, Any], data: str | Path | None) -> list[str] | None:
    """Text to measure bpb on: ``--data``, else the prepared folder the model was trained on, else none."""
    if data is not None:
        return read_eval_texts(data)
    trained_on = meta.get("data_dir")
    if trained_on and (Path(trained_on) / "val_docs.jsonl").is_file():
        return read_eval_texts(trained_on)
    return None


def quantize_job(*, name: str, version: str | None = None, model_dir: str | Path | None = None,
                 out_dir: str | Path | None = None, data: str | Path | None = None, register: bool = True,
                 experiment: str = "lmops", new_tokens: int = 64, repeats: int = 3, compiled: bool = True,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize a registry version (default: champion) or a folder, measure it, register it as a variant.

    The int8 folder goes to ``out_dir`` (default ``<home>/models/<name>/v<V>-int8``). A registry
    source becomes a new version (alias ``challenger``) tagged ``lmops.quantized_from=<V>`` and
    ``lmops.quantization=int8-dynamic``, with ``speedup`` and ``bpb_change`` as tags and as
    metrics of the registering run, so the gate judges it like any other challenger.
    """
    from lmcore.checkpoint import load_model
    from lmcore.optimize.export import resolve_source
    from lmcore.settings import get_settings

    src, info = resolve_source(name, version, model_dir)
    src_version = info.get("version")
    if out_dir is None:
        label = f"v{src_version}" if src_version else f"{Path(src).resolve().name}"
        out_dir = get_settings().home / "models" / (info.get("name") or name) / f"{label}-int8"
    extra = {"quantized_from": src_version or str(Path(src).resolve())}
    out = save_quantized(src, out_dir, extra)
    fp32, tokenizer, meta = load_model(src, "cpu")
    int8, _, _ = load_model(out, "cpu")
    texts = _eval_texts_for(meta, data)
    metrics = compare(fp32, int8, tokenizer, texts, new_tokens=new_tokens, repeats=repeats, log=log,
                      compiled=compiled)
    metrics["fp32_bytes"] = float(model_bytes(src))
    metrics["int8_bytes"] = float(model_bytes(out))
    result: dict[str, Any] = {"out_dir": str(out), "source": str(src), "source_version": src_version,
                              "quantization": QUANTIZATION, "version": None, "metrics": metrics}
    if not (register and src_version):
        return result

    from lmcore.registry import log_model, register_version
    from lmcore.tracking import LINEAGE_KEYS, RunTracker, get_client

    src_tags = dict(get_client().get_model_version(info["name"], src_version).tags or {})
    lineage = {k: v for k, v in src_tags.items() if k in LINEAGE_KEYS}
    variant = {"lmops.quantized_from": src_version, "lmops.quantization": QUANTIZATION,
               "lmops.speedup": f"{metrics['speedup']:.3f}"}
    if "bpb_change" in metrics:
        variant["lmops.bpb_change"] = f"{metrics['bpb_change']:.5f}"
    tracker = RunTracker.start(experiment, f"quantize-{info['name']}-v{src_version}",
                               params={"quantization": QUANTIZATION, "source_version": src_version},
                               tags={**lineage, **variant, "lmops.kind": "quantize"}, system_metrics=False)
    try:
        tracker.log_summary(metrics)
        uri = log_model(tracker, out)
        new_version = register_version(uri, info["name"], {**lineage, **variant}, tracker.run_id)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    result.update(version=new_version, run_id=tracker.run_id)
    return result
