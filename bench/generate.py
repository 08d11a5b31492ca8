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
    p.add_argument("--new-tokens", type=int, default=500, help="tokens generated per run")
    args = p.parse_args()
    setup(args)
    cpu_header()
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


if __name__ == "__main__":
    main()
