"""Int8 dynamic quantization of a model's linear layers, for CPU serving.

Why this way: weights are quantized once, per output channel, symmetric int8; activations are
quantized on the fly per batch by torch's ``quantized::linear_dynamic`` kernels (fbgemm/onednn),
which is what makes batch-1 CPU decoding faster. We build ``torch.ao.nn.quantized.dynamic.Linear``
modules directly instead of calling ``torch.ao.quantization.quantize_dynamic``: that entry point
is deprecated in torch 2.13 (the kernels and modules are not), and torchao's replacement
(``Int8DynamicActivationInt8WeightConfig``, torchao 0.18) ran ~2x *slower* than fp32 in eager
mode on this CPU. torch 2.13 also warns that quantized tensor dtypes (qint8) will go in a future
release; when they do, only ``lmcore.model.int8._dynamic_linear`` needs a new backend.

On disk a quantized model folder is an ordinary model folder whose ``config.json`` carries
``"quantization": "int8-dynamic"``; ``model.safetensors`` holds each linear weight as an int8
tensor plus a float32 ``<name>_scale`` per output row, the rest in fp32. No pickle anywhere:
:func:`lmcore.model.checkpoint.load_model` sees the key and calls :func:`load_quantized`. The format itself
(writing, reading, rebuilding the model) is :mod:`lmcore.model.int8`; this module quantizes
folders, measures what int8 buys and costs, and registers variants.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lmcore.errors import LmopsError
from lmcore.machine import cpu_profile
from lmcore.model.checkpoint import CONFIG, TOKENIZER, WEIGHTS, atomic_dir, commit_dir, load_model
from lmcore.model.decode import int8_matvec_speedup, use_int8_kernels
from lmcore.model.generate import SamplingParams, generate_tokens
from lmcore.model.int8 import (  # noqa: F401 - the format's names, re-exported: callers import them from here
    QUANTIZATION,
    SCALE_SUFFIX,
    _linear_names,
    load_quantized,
    quantize_weight,
    quantized_state,
)
from lmcore.model.transformer import Transformer
from lmcore.model.weights import unwrap
from lmcore.optimize.export import resolve_source
from lmcore.registry.models import log_model, register_version
from lmcore.registry.tracking import LINEAGE_KEYS, RunTracker, get_client
from lmcore.settings import get_settings
from lmcore.training.evaluate import bits_per_byte  # the one bits-per-byte measure (evaluate and the gate use it too)


def quantize_model(model: Transformer) -> Transformer:
    """An int8-dynamic copy of a float model (exactly what a quantized folder loads back as)."""
    model = unwrap(model)
    return load_quantized(model.cfg, quantized_state(model.cpu()))


def save_quantized(src_dir: str | Path, out_dir: str | Path, extra_meta: dict[str, Any] | None = None) -> Path:
    """Quantize the model folder ``src_dir`` into a new model folder ``out_dir`` (atomic)."""
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


def weight_only_model(int8: Transformer) -> Transformer:
    """A float model whose linear weights are exactly ``q * scale``: the numerics of compiled int8 decoding.

    ``lmcore.model.decode`` runs an int8 model weight-only (activations stay fp32), while the eager
    path quantizes activations too; this copy lets bits per byte be measured for the former.
    """
    model = Transformer(replace(int8.cfg, tie_embeddings=False))  # lm_head is the int8 copy of the embedding
    state = {k: v for k, v in int8.state_dict().items() if isinstance(v, torch.Tensor) and not v.is_quantized}
    for name in _linear_names(model):
        mod = int8.get_submodule(name)
        state[f"{name}.weight"] = mod.int8_weight.float() * mod.int8_scale[:, None]
    missing = model.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise LmopsError(f"not an int8 model of this shape: {missing[0]} is missing")
    return model.eval()


ACT_LEVELS = 127  # activation steps of the coarsest int8 kernel (reduce_range: 7-bit activations)


def logit_error_bound(model: Transformer, idx: torch.Tensor, sigmas: float = 6.0, act_levels: int = ACT_LEVELS,
                      chunk: int = 512) -> torch.Tensor:
    """Per-logit tolerance for int8-dynamic vs fp32 logits of a CPU ``model`` on ``idx`` (1, T): (1, T, V).

    The defence, in one line: ``sigmas`` x the std of the logit error when every int8 rounding error
    is independent and uniform in +-step/2 (weights: step max|W_i|/127 per output row; activations:
    range(x and 0)/``act_levels`` per tensor), propagated to first order through the fp32 model.

    Why not a fixed tolerance: int8 kernels round activations differently per CPU and engine (to 7
    bits with ``reduce_range``, as fbgemm and oneDNN do on an AVX2 EPYC; to 8 where it is ignored,
    as qnnpack does), so one machine's error is another's failure: ``act_levels=127`` is the
    coarser grid, so the bound holds on either. On the 2-layer test model the
    7-bit error's rms is 0.94 sigma and its worst of 6425 logits 3.4 sigma, while one layer's
    scales doubled reach 34 sigma. Computed from the fp32 weights, never through
    :func:`quantize_weight`, so a broken quantizer cannot widen its own bound. Cost: one batched
    backward per ``chunk`` rows of the final hidden state's Jacobian (T x d_model rows, not
    T x vocab: the logits are linear in it); ~1 s for that model on one thread.
    """
    model = unwrap(model).eval()
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"idx must be (1, T) token ids, got {tuple(idx.shape)}")
    head = model.lm_head
    upstream = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    xs: dict[str, torch.Tensor] = {}  # linear -> its fp32 input (T, in)

    def capture(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
        xs[name] = inputs[0].detach().float()[0]

    def act_var(x: torch.Tensor) -> torch.Tensor:  # variance of one activation's rounding error
        return ((x.max().clamp(min=0) - x.min().clamp(max=0)) / act_levels) ** 2 / 12

    def weight_var(w: torch.Tensor) -> torch.Tensor:  # (out,) variance of each row's weight rounding error
        return (w.detach().float().abs().amax(dim=1) / 127.0) ** 2 / 12

    named = [*upstream, ("lm_head", head)]
    handles = [m.register_forward_pre_hook(lambda _m, i, n=n: capture(n, i)) for n, m in named]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for hook in handles:
            hook.remove()
    T, C = xs["lm_head"].shape
    cov = torch.zeros(T, C, C)  # cov[t]: covariance of the final hidden state's error at position t
    gx: dict[str, torch.Tensor] = {}  # zero perturbations of each linear's input and output
    gy: dict[str, torch.Tensor] = {}
    hidden: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, i, n=n: (i[0] + gx[n],)) for n, m in upstream]
    handles += [m.register_forward_hook(lambda _m, _i, o, n=n: o + gy[n]) for n, m in upstream]
    handles.append(head.register_forward_pre_hook(lambda _m, i: hidden.append(i[0])))
    per = max(1, chunk // C)  # positions per batched backward; each position is C rows
    try:
        with torch.enable_grad():
            for t0 in range(0, T, per):
                ts = torch.arange(t0, min(t0 + per, T))
                P, N = len(ts), len(ts) * C
                for n, m in upstream:
                    gx[n] = torch.zeros(N, T, m.in_features, requires_grad=True)
                    gy[n] = torch.zeros(N, T, m.out_features, requires_grad=True)
                hidden.clear()
                model(idx.expand(N, T))
                rows = torch.arange(N)
                h = hidden[0][rows, ts.repeat_interleave(C), torch.arange(C).repeat(P)].sum()  # row r: h[t, c]
                grads = torch.autograd.grad(h, [*gx.values(), *gy.values()])
                for k, (n, m) in enumerate(upstream):
                    dx = grads[k].view(P, C, -1)  # d h[t, c] / d input of layer n, flattened over (T, in)
                    dy = grads[len(upstream) + k].view(P, C, T, -1)  # d h[t, c] / d output (T, out)
                    cov[ts] += act_var(xs[n]) * (dx @ dx.transpose(1, 2))
                    # d h / d W = dy^T x, so sum over W of products of two rows is sum_o var_o dy_o^T (x x^T) dy_o
                    kdy = (xs[n] @ xs[n].T) @ dy * weight_var(m.weight)  # (P, C, T, out)
                    cov[ts] += kdy.flatten(2) @ dy.flatten(2).transpose(1, 2)
    finally:
        for hook in handles:
            hook.remove()
        gx.clear()
        gy.clear()
    w = head.weight.detach().float()  # (V, C)
    var = torch.einsum("vc,tcd,vd->tv", w, cov, w)  # upstream errors through the head
    var += act_var(xs["lm_head"]) * w.square().sum(dim=1)[None, :]  # rounding of the head's input
    var += xs["lm_head"].square().sum(dim=1)[:, None] * weight_var(w)[None, :]  # rounding of the head's rows
    return (sigmas * var.clamp(min=0).sqrt())[None]


@torch.inference_mode()
def decode_tokens_per_s(model: Transformer, prompt_ids: list[int], new_tokens: int = 128, repeats: int = 3,
                        compiled: bool = False) -> float:
    """Best-of-``repeats`` batch-1 greedy decoding speed, with the KV cache (tokens per second)."""
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

    ``compiled`` times both with ``lmcore.model.decode``'s compiled step (how lmops decodes long outputs);
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
        if compiled:  # 0: this CPU's int8 kernel lost to fp32 (lmcore.probe), so int8 decodes from float weights
            out["int8_kernels"] = float(use_int8_kernels(int8))
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
                 min_speedup: float = 1.0, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize a registry version (default: champion) or a folder, measure it, register it as a variant.

    The int8 folder goes to ``out_dir`` (default ``<home>/models/<name>/v<V>-int8``). A registry
    source becomes a new version (alias ``challenger``) tagged ``lmops.quantized_from=<V>`` and
    ``lmops.quantization=int8-dynamic``, with ``speedup`` and ``bpb_change`` as tags and as
    metrics of the registering run, so the gate judges it like any other challenger.

    Unless int8 decodes at least ``min_speedup`` x fp32 on this CPU: then nothing is registered
    (``registered: False``, ``declined``: the measured reason in one line) and the folder stays on
    disk. Why: int8 only pays where the CPU has fast int8 kernels (VNNI/AMX); on an AVX2-only CPU
    it measured 0.92x fp32, and a slower variant in the registry invites the gate to serve it.
    The CPU it was measured on (``lmcore.machine.cpu_profile``) goes into the result and the tags.
    """
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
    cpu = cpu_profile()
    result: dict[str, Any] = {"out_dir": str(out), "source": str(src), "source_version": src_version,
                              "quantization": QUANTIZATION, "version": None, "registered": False,
                              "declined": None, "cpu": cpu, "metrics": metrics}
    if not (register and src_version):
        return result
    if metrics["speedup"] < min_speedup or (metrics.get("int8_kernels") == 0.0 and min_speedup > 0):
        result["declined"] = decline_reason(metrics, cpu, min_speedup, out)  # the caller shows it
        return result

    src_tags = dict(get_client().get_model_version(info["name"], src_version).tags or {})
    lineage = {k: v for k, v in src_tags.items() if k in LINEAGE_KEYS}
    variant = {"lmops.quantized_from": src_version, "lmops.quantization": QUANTIZATION,
               "lmops.speedup": f"{metrics['speedup']:.3f}", "lmops.cpu": cpu_label(cpu)}
    if "bpb_change" in metrics:
        variant["lmops.bpb_change"] = f"{metrics['bpb_change']:.5f}"
    tracker = RunTracker.start(experiment, f"quantize-{info['name']}-v{src_version}",
                               params={"quantization": QUANTIZATION, "source_version": src_version},
                               tags={**lineage, **variant, "lmops.kind": "quantize",
                                     "lmops.cpu_profile": json.dumps(cpu, sort_keys=True)}, system_metrics=False)
    try:
        tracker.log_summary(metrics)
        uri = log_model(tracker, out)
        new_version = register_version(uri, info["name"], {**lineage, **variant}, tracker.run_id)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    result.update(version=new_version, run_id=tracker.run_id, registered=True)
    return result


def cpu_label(cpu: dict[str, Any]) -> str:
    """``AMD EPYC (avx2)``: the model name and the class that decides whether int8/bf16 pay."""
    return f"{cpu.get('cpu') or 'unknown CPU'} ({cpu.get('cpu_class', 'other')})"


def decline_reason(metrics: dict[str, float], cpu: dict[str, Any], min_speedup: float, out: str | Path) -> str:
    """One line saying why an int8 variant was not registered, with the numbers measured."""
    speed = (f"int8 {metrics['int8_tokens_per_s']:.0f} vs fp32 {metrics['fp32_tokens_per_s']:.0f} tok/s"
             f"{', compiled decode' if metrics.get('compiled_decode') else ''}")
    need = "" if min_speedup == 1.0 else f" (needs {min_speedup:g}x)"
    where = f"{cpu.get('cpu') or 'unknown CPU'}, {cpu.get('cpu_class', 'other')}"
    if metrics.get("int8_kernels") == 0.0:  # the decoder read float weights: the speed is fp32's by design

        need = (f"; this CPU's int8 kernel runs at {int8_matvec_speedup()['speedup']:.2f}x fp32 (lmops info), "
                f"so int8 models decode from float weights here and gain nothing but size")
    return (f"int8 decodes at {metrics['speedup']:.2f}x fp32 on this CPU ({where}): {speed}{need}; "
            f"not registered, int8 folder kept at {out} (use --min-speedup 0 to register anyway)")
