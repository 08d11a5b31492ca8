"""Batch-1 greedy generation speed: lmcore vs ``transformers`` ``generate`` with its KV cache.

Both sides hold the same weights (converted with ``lmcore.model.hf``), get the same 32-character
tinyshakespeare prompt (char-level vocab 65) and produce exactly 500 new tokens greedily
(``do_sample=False, max_new_tokens=min_new_tokens=500`` for the reference, no EOS for
lmcore), under ``torch.inference_mode``. Runs alternate; medians are reported. The greedy
outputs of both sides are compared too (``same_tokens``: the first 500 tokens agree).

lmops decodes with its compiled step (``generate_tokens(..., compiled=True)``, see
``lmcore.model.decode``); its eager loop runs in the same rounds and is reported beside it
(``lmops_eager_tokens_per_s``, ``eager_ratio``), with the one-off compile time (``compile_s``).

Threads: both sides start from ``--threads`` (default: torch's). lmcore's compiled step decodes on
the thread count its own recorded step times favour (``lmcore.probe.compiled_step_threads``: the
warm-up runs until that choice settles, so ``compile_s`` may hold two compiles), its eager loop on
the count ``lmcore.probe.decode_probe`` measured faster (1 or all), both unless
``LMOPS_DECODE_THREADS`` says otherwise; pass ``--threads 1`` for a strictly single-threaded match.

    python bench/generate.py [--json] [--threads N] [--sizes small,large] [--repeats 3] [--new-tokens 500]

``--model PATH_OR_GGUF`` (e.g. the shipped SmolLM2-135M-Instruct Q4_1 GGUF, an HF folder or an lmops model
folder) measures a real pretrained model instead, against llama.cpp (``llama-cpp-python``, the ``bench``
extra) at the same bits per weight: lmops fp32 (compiled step) vs llama.cpp on the F32 GGUF that
``lmcore.model.gguf_writer`` exports, lmops int8 (``lmcore.optimize.quantize``, compiled int8 step) vs the
Q8_0 export, the original GGUF (Q4_1) for reference, and HF ``generate`` fp32 as the third reference.
Batch 1: ``--new-tokens`` (default 200 here) greedy tokens after the first prompt; batch 8: 8 concurrent
requests of ``--batch8-tokens`` (default 64; lmops int8: 16, timed once, its batched step is slow), lmops
through its batched decoder (``Decoder`` with 8 slots, the server engine's step),
llama.cpp as 8 sequential requests (``llama-cpp-python``'s high-level API decodes one sequence). Every
variant runs once per round, rounds alternate their order; medians and min-max ranges are reported.
Threads: ``--threads`` for everyone (``LMOPS_DECODE_THREADS`` is set to it unless given), OpenMP threads
wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set, see ``bench/_llama_cpp.py``). A GGUF round
trip: llama.cpp's greedy tokens on the F32 export against lmops' for the first 32 tokens of 3 prompts.

    python bench/generate.py --model "$(python -c 'import lmcore.model.gguf as g; print(g.shipped_gguf())')" --json
"""

from __future__ import annotations

import torch
from _common import SIZES, char_corpus, cpu_header, emit, interleaved, model_pair, parser, setup, timed

PROMPT_CHARS = 32


def measure(size: dict, vocab: int, prompt: list[int], n: int, repeats: int, device: str = "cpu",
            compiled: bool = True) -> dict:
    """Median tokens/s of both sides at one size, and how many leading tokens they agree on.

    With ``compiled``, lmops decodes with its compiled step (``lmcore.model.decode``); its eager loop is
    timed in the same rounds too (``lmops_eager_tokens_per_s``), and ``compile_s`` is the first,
    compiling run's extra time.
    """
    from lmcore.model.generate import SamplingParams, generate_tokens

    ours, ref = model_pair(size, vocab, block_size=len(prompt) + n)
    ours.to(device).eval()
    ref.to(device).eval()
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    sp = SamplingParams(max_new_tokens=n, temperature=0.0)
    x = torch.tensor([prompt], device=device)
    out: dict[str, list[int]] = {}

    def run_ours() -> None:
        out["lmops"] = [t for t, _ in generate_tokens(ours, prompt, sp, eos_id=None, compiled=compiled)]

    def run_eager() -> None:
        out["lmops_eager"] = [t for t, _ in generate_tokens(ours, prompt, sp, eos_id=None)]

    def run_ref() -> None:
        with torch.inference_mode():
            y = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, use_cache=True)
        out["reference"] = y[0, len(prompt) :].tolist()

    runs = {"lmops": run_ours, "reference": run_ref} | ({"lmops_eager": run_eager} if compiled else {})
    from lmcore.model.generate import wanted_decode_threads

    # warm up all: the first compiled run compiles, and where its times favour more threads
    # (lmcore.probe.compiled_step_threads) the next one compiles the step for them; time once it settles
    warm: list[float] = []
    want = None
    while len(warm) < 3 and wanted_decode_threads(ours.cfg, compiled) != want:
        want = wanted_decode_threads(ours.cfg, compiled)
        warm.append(timed(run_ours))
    for name, fn in runs.items():
        if name != "lmops":
            fn()
    sec = interleaved(runs, repeats)
    lm, rf = n / sec["lmops"], n / sec["reference"]
    agree = next((i for i, (a, b) in enumerate(zip(out["lmops"], out["reference"], strict=True)) if a != b), n)
    result = {"lmops_tokens_per_s": round(lm, 1), "reference_tokens_per_s": round(rf, 1), "ratio": round(lm / rf, 3),
              "same_tokens": agree,
              "lmops_threads": wanted_decode_threads(ours.cfg, compiled) or torch.get_num_threads()}
    if compiled:
        result |= {"lmops_eager_tokens_per_s": round(n / sec["lmops_eager"], 1),
                   "eager_ratio": round(sec["reference"] / sec["lmops_eager"], 3),
                   "compile_s": round(sum(warm) - len(warm) * sec["lmops"], 1)}
    return result


def main() -> None:
    import os

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=0, help="tokens generated per run (default 500; 200 with "
                                                             "--model)")
    p.add_argument("--batch8-tokens", type=int, default=64, help="--model: tokens per request at batch 8")
    p.add_argument("--model", default=None, help="a real model (GGUF file, HF folder or lmops model folder): "
                                                 "compare with llama.cpp and HF instead of the synthetic sizes")
    args = p.parse_args()
    if args.model and "OMP_WAIT_POLICY" not in os.environ:  # read as torch loads: restart with it (_llama_cpp)
        import sys

        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if args.model:
        os.environ.setdefault("LMOPS_DECODE_THREADS", str(args.threads))
    setup(args)
    cpu_header()
    if args.model:
        from _real_generate import measure_real

        emit_real(measure_real(args.model, args.new_tokens or 200, args.repeats or 3, args.threads,
                               args.batch8_tokens), args.json)
        return
    args.new_tokens = args.new_tokens or 500
    from _common import quiet_transformers

    quiet_transformers()
    data, vocab = char_corpus()
    prompt = data[:PROMPT_CHARS].tolist()
    result = {"sizes": {}, "vocab": vocab, "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_CHARS,
              "threads": torch.get_num_threads(),
              "lmops_decode_threads": os.environ.get("LMOPS_DECODE_THREADS") or "probe (per size)"}
    for name in args.sizes.split(","):
        result["sizes"][name] = measure(SIZES[name], vocab, prompt, args.new_tokens, args.repeats or 3)
    emit(result, args.json)


def emit_real(result: dict, as_json: bool) -> None:
    """Human lines for ``--model``: tok/s (median, min-max) per variant and batch, then the ratios."""
    import json

    from _common import with_cpu

    for batch in ("batch1", "batch8"):
        for name, r in result[batch].items():
            print(f"{batch} {name:<16} {r['tokens_per_s']:>8.1f} tok/s  (range {r['min']:.1f}-{r['max']:.1f}, "
                  f"{r['bits_per_weight']} bits/weight)")
    for k, v in result["ratios"].items():
        print(f"ratio {k:<34} {v:.2f}x")
    print("  ".join(f"{k}={v}" for k, v in result.items() if k not in ("batch1", "batch8", "ratios", "cpu")))
    if as_json:
        print(json.dumps(with_cpu(result)))


if __name__ == "__main__":
    main()
