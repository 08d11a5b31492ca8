"""``bench/generate.py --model``: a real pretrained model decoded by lmops, llama.cpp and HF, same weights.

Kept apart from generate.py's synthetic sizes because it brings its own references (llama.cpp through
``bench/_llama_cpp.py``, GGUF files written by ``lmcore.model.gguf_writer``) and its own batch-8 case.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _llama_cpp
import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little",
           "The three primary colors are", "Water boils at", "import numpy as np\n", "My favourite book is",
           "The best way to learn a language is"]
BATCH, ROUNDTRIP_PROMPTS, ROUNDTRIP_TOKENS = 8, 3, 32


def _load(spec: str):
    """lmops' model and tokenizer of a GGUF file, HF folder or lmops model folder, plus a short label."""
    from lmcore.errors import LmopsError
    from lmcore.model.base import load_base
    from lmcore.model.checkpoint import load_model, read_meta

    path = Path(spec)
    if path.is_dir():
        try:
            read_meta(path)
            model, tok, _ = load_model(path)
            return model, tok, path.name
        except LmopsError:
            pass
    model, tok, _ = load_base(spec, verify=False)
    return model.eval(), tok, path.name


def _hf_model(model):
    """transformers' ``LlamaForCausalLM`` holding the same fp32 weights."""
    from transformers import LlamaForCausalLM

    from lmcore.model.hf import hf_config, to_hf_state_dict

    hf = LlamaForCausalLM(hf_config(model.cfg)).eval()
    hf.load_state_dict(to_hf_state_dict(model), strict=False)  # a tied head is the embedding
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def _lmops_batch(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """``n`` greedy tokens for each prompt, decoded together through one compiled decoder of len(prompts) slots."""
    from lmcore.model.decode import DECODER_SLOTS, Decoder, use_int8_kernels
    from lmcore.model.generate import decode_threads

    size = -(-(max(map(len, prompts)) + n + 1) // DECODER_SLOTS) * DECODER_SLOTS
    out: list[list[int]] = [[] for _ in prompts]
    with decode_threads("cpu", model.cfg, True, use_int8_kernels(model)):
        dec = Decoder(model, size, slots=len(prompts), compiled=True)
        nxt = dec.prefill_many(prompts, 0).argmax(-1)
        for i in range(n):
            for row, t in zip(out, nxt.tolist(), strict=True):
                row.append(t)
            if i + 1 < n:
                nxt = dec.step(nxt).argmax(-1)
    dec.release()
    return out


def _rounds(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
    """tokens/s of every variant per round (each fn returns the tokens it made); order flips each round."""
    rates: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            made = fns[name]()
            rates[name].append(made / (time.perf_counter() - t0))
    return rates


def _summary(rates: list[float], bits: float) -> dict:
    return {"tokens_per_s": round(statistics.median(rates), 1), "min": round(min(rates), 1),
            "max": round(max(rates), 1), "rounds": [round(x, 1) for x in rates], "bits_per_weight": bits}


def _bits(path: Path, n_weights: int) -> float:
    return round(8 * path.stat().st_size / n_weights, 2)


def measure_real(spec: str, n: int, repeats: int, threads: int, n8: int = 64, n8_int8: int = 16) -> dict:
    """tok/s per variant at batch 1 and 8, ratios, and the llama.cpp round trip of the F32 export."""
    from lmcore.model.generate import SamplingParams, generate_tokens
    from lmcore.model.gguf import is_gguf
    from lmcore.model.gguf_writer import gguf_file_name, write_gguf
    from lmcore.optimize.quantize import quantize_model

    t_start = time.perf_counter()
    model, tok, label = _load(spec)
    int8 = quantize_model(model)
    prompts = [tok.encode(p) for p in PROMPTS]
    n_weights = sum(p.numel() for name, p in model.named_parameters() if name != "lm_head.weight"
                    or not model.cfg.tie_embeddings)
    have_llama, llama_info = _llama_cpp.available()
    print(llama_info, flush=True)
    import os

    result: dict = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                    "model": label, "new_tokens": n, "batch": BATCH, "batch8_new_tokens": n8,
                    "threads": threads, "repeats": repeats,
                    "n_weights": n_weights, "llama_cpp": llama_info if have_llama else None,
                    "lmops_decode": "compiled step (fp32; int8: weight-only int8 where the probe keeps it)",
                    "batch8_lmops": "one Decoder with 8 slots (the server engine's batched step)",
                    "batch8_llama_cpp": "8 sequential requests (llama-cpp-python decodes one sequence)"}
    tmp = Path(tempfile.mkdtemp(prefix="lmops-bench-gguf-"))
    files: dict[str, Path] = {}
    if have_llama:
        for t in ("f32", "q8_0"):
            files[t] = write_gguf(model, tok, tmp / gguf_file_name(t), t, name=label)
        if is_gguf(spec):
            files["original"] = Path(spec)
    hf = _hf_model(model)
    p0 = prompts[0]

    def lmops(m, k: int = n) -> Callable[[], int]:
        sp_k = SamplingParams(max_new_tokens=k, temperature=0.0, stop_at_eos=False)
        return lambda: sum(1 for _ in generate_tokens(m, p0, sp_k, compiled=True))

    def hf_run(k: int = n) -> int:
        with torch.inference_mode():
            x = torch.tensor([p0])
            y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=k,
                            min_new_tokens=k, use_cache=True)
        return y.shape[1] - len(p0)

    llms = {t: _llama_cpp.load(f, threads) for t, f in files.items()}

    def llama(t: str, rows: int = 1, k: int = n) -> Callable[[], int]:
        return lambda: sum(len(_llama_cpp.greedy(llms[t], p, k)) for p in prompts[:rows])

    def lmops_b8(m, k: int) -> Callable[[], int]:
        return lambda: sum(map(len, _lmops_batch(m, prompts, k)))

    b1 = {"lmops_fp32": lmops(model), "lmops_int8": lmops(int8)}
    b1 |= {f"llama_cpp_{t}": llama(t) for t in llms}
    b1["hf_fp32"] = hf_run
    b8 = {"lmops_fp32": lmops_b8(model, n8)}
    b8 |= {f"llama_cpp_{t}": llama(t, BATCH, n8) for t in llms if t != "original"}
    bits = {"lmops_fp32": 32.0, "lmops_int8": 8.0, "hf_fp32": 32.0}
    bits |= {f"llama_cpp_{t}": _bits(f, n_weights) for t, f in files.items()}

    t0 = time.perf_counter()
    warm = {"b1 lmops_fp32": lmops(model, 8), "b1 lmops_int8": lmops(int8, 8), "b1 hf_fp32": lambda: hf_run(8),
            **{f"b1 llama_cpp_{t}": llama(t, 1, 8) for t in llms},
            "b8 lmops_fp32": lmops_b8(model, 4), "b8 lmops_int8": lmops_b8(int8, 4)}
    for name, fn in warm.items():  # compiles lmops' steps (or loads them), pages the weights in
        t1 = time.perf_counter()
        fn()
        print(f"warm-up {name}: {time.perf_counter() - t1:.1f}s", flush=True)
    result["warmup_s"] = round(time.perf_counter() - t0, 1)
    result["batch1"] = {k: _summary(v, bits[k]) for k, v in _rounds(b1, repeats).items()}
    print("batch 1 done", flush=True)
    result["batch8"] = {k: _summary(v, bits[k]) for k, v in _rounds(b8, max(2, repeats - 1)).items()}
    # lmops' int8 batched step is slow (see the README): timed once, on fewer tokens
    result["batch8"]["lmops_int8"] = {**_summary(_rounds({"x": lmops_b8(int8, n8_int8)}, 1)["x"], 8.0),
                                      "new_tokens": n8_int8}

    def ratio(batch: str, a: str, b: str) -> float | None:
        r = result[batch]
        return round(r[a]["tokens_per_s"] / r[b]["tokens_per_s"], 3) if a in r and b in r else None

    ratios = {"b1 lmops_fp32 / hf_fp32": ratio("batch1", "lmops_fp32", "hf_fp32"),
              "b1 lmops_fp32 / llama_cpp_f32": ratio("batch1", "lmops_fp32", "llama_cpp_f32"),
              "b1 lmops_int8 / llama_cpp_q8_0": ratio("batch1", "lmops_int8", "llama_cpp_q8_0"),
              "b1 lmops_int8 / llama_cpp_original": ratio("batch1", "lmops_int8", "llama_cpp_original"),
              "b1 lmops_int8 / lmops_fp32": ratio("batch1", "lmops_int8", "lmops_fp32"),
              "b8 lmops_fp32 / llama_cpp_f32": ratio("batch8", "lmops_fp32", "llama_cpp_f32"),
              "b8 lmops_int8 / llama_cpp_q8_0": ratio("batch8", "lmops_int8", "llama_cpp_q8_0"),
              "b8 / b1 lmops_fp32": round(result["batch8"]["lmops_fp32"]["tokens_per_s"]
                                          / result["batch1"]["lmops_fp32"]["tokens_per_s"], 3)}
    result["ratios"] = {k: v for k, v in ratios.items() if v is not None}
    if have_llama:
        result["roundtrip"] = _roundtrip(model, llms["f32"], prompts[:ROUNDTRIP_PROMPTS])
    else:
        print("llama.cpp part skipped (see above)", flush=True)
    llms.clear()  # closes the llama.cpp contexts before their files go
    for t in ("f32", "q8_0"):
        files.get(t, tmp / "none").unlink(missing_ok=True)
    tmp.rmdir()
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    return result


def _roundtrip(model, llm, prompts: list[list[int]]) -> dict:
    """lmops' greedy tokens (eager step) against llama.cpp's on the F32 export, per prompt."""
    from lmcore.model.generate import SamplingParams, generate_tokens

    sp = SamplingParams(max_new_tokens=ROUNDTRIP_TOKENS, temperature=0.0, stop_at_eos=False)
    agree = []
    for p in prompts:
        ours = [t for t, _ in generate_tokens(model, p, sp)]
        theirs = _llama_cpp.greedy(llm, p, ROUNDTRIP_TOKENS)
        agree.append(next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours)))
    return {"prompts": len(prompts), "tokens": ROUNDTRIP_TOKENS, "same_leading_tokens": agree,
            "matches": sum(a == ROUNDTRIP_TOKENS for a in agree)}
