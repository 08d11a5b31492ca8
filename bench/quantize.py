"""Int8 dynamic quantization vs fp32: batch-1 CPU decode speed and bits per byte, 6 x 6 x 384 model.

The model (6 layers, 6 heads, d_model 384, byte-level vocab, block 256) is first trained
briefly with ``lmcore.training.loop`` on tinyshakespeare (first 90% train, last 10% validation) so
that bits per byte mean something; then ``lmops optimize quantize``'s own code path
(``save_quantized`` -> ``load_model``) makes the int8 variant. Decode: greedy, batch 1,
KV cache, ``--new-tokens`` tokens per run, fp32 and int8 runs interleaved, medians. Both decode
with lmops' compiled step (``lmcore.model.decode``: for int8 a weight-only int8 matrix-vector kernel);
the eager loops (int8 = torch's dynamic quantization) are timed in the same rounds and reported
as ``eager_speedup``.
bpb: the first ``--eval-tokens`` validation tokens, both models on the same windows: ``bpb_change``
for the eager int8 model (activations quantized too), ``bpb_change_wo`` for the weight-only
numerics of the compiled step.

    python bench/quantize.py [--json] [--threads N] [--repeats 5] [--train-minutes 1.5] [--new-tokens 128]

Prints ``speedup`` (int8 tokens/s / fp32 tokens/s) and ``bpb_change`` ((bpb_int8 - bpb_fp32)
/ bpb_fp32); targets: speedup >= 1.5 with bpb_change <= 0.01.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from _common import CORPUS, ROOT, cpu_header, interleaved, parser, setup, with_cpu

# params.yaml's configuration with only these keys changed: the 6 x 6 x 384 model, CPU, a small batch,
# a short warmup, no evaluation or checkpoint during the brief training (step cap and budget: the flags).
OVERRIDES = {
    "model.n_layer": 6, "model.n_head": 6, "model.n_kv_head": 6, "model.d_model": 384, "model.block_size": 256,
    "train.device": "cpu", "train.batch_size": 4, "train.warmup_steps": 10, "train.eval_interval": 0,
    "train.eval_iters": 4, "train.checkpoint_interval": 0, "train.log_interval": 50,
}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--train-minutes", type=float, default=2.5, help="training budget (wall clock)")
    p.add_argument("--train-threads", type=int, default=0, help="torch threads while training (0 = all cores)")
    p.add_argument("--train-steps", type=int, default=400, help="training step cap")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per decode run")
    p.add_argument("--eval-tokens", type=int, default=8192, help="validation tokens for bits per byte")
    args = p.parse_args()
    setup(args)
    cpu_header()
    import torch

    from lmcore.config import TokenizerParams, load_params
    from lmcore.data.prepare import prepare_split_texts
    from lmcore.model.checkpoint import load_model
    from lmcore.model.generate import SamplingParams, generate_tokens
    from lmcore.optimize.quantize import bits_per_byte, model_bytes, save_quantized, weight_only_model
    from lmcore.training.loop import train

    text = CORPUS.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmops-bench-quantize-") as tmp:
        tmp = Path(tmp)
        data = prepare_split_texts([text[:cut]], [text[cut:]], tmp / "data", TokenizerParams(kind="byte"))
        params = load_params(ROOT / "params.yaml", {**OVERRIDES, "train.max_steps": args.train_steps,
                                                    "train.max_minutes": args.train_minutes})
        mp, tp = params.model, params.train
        torch.set_num_threads(args.train_threads or os.cpu_count() or 1)
        trained = train(data.dir, tmp / "run", mp, tp, progress=False)
        torch.set_num_threads(args.threads)  # measure at the thread count asked for
        fp32_dir = trained.model_dir
        int8_dir = save_quantized(fp32_dir, tmp / "int8")
        fp32, tok, _ = load_model(fp32_dir)
        int8, _, _ = load_model(int8_dir)

        val = text[cut:]
        prompt = tok.encode(val[:64])
        sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False)

        def decode(model, compiled=True):
            def run():
                with torch.inference_mode():
                    n = sum(1 for _ in generate_tokens(model, prompt, sp, compiled=compiled))
                assert n == args.new_tokens
            return run

        runs = {"fp32": decode(fp32), "int8": decode(int8),
                "fp32_eager": decode(fp32, False), "int8_eager": decode(int8, False)}
        for run in runs.values():  # warm up (and compile) all
            run()
        med = interleaved(runs, args.repeats or 5)
        tps = {k: args.new_tokens / v for k, v in med.items()}
        fp32_tps, int8_tps = tps["fp32"], tps["int8"]
        fp32_bpb = bits_per_byte(fp32, tok, [val], max_tokens=args.eval_tokens)
        int8_bpb = bits_per_byte(int8, tok, [val], max_tokens=args.eval_tokens)
        wo_bpb = bits_per_byte(weight_only_model(int8), tok, [val], max_tokens=args.eval_tokens)
        with torch.inference_mode():
            same = [t for t, _ in generate_tokens(fp32, prompt, sp, compiled=True)] == [
                t for t, _ in generate_tokens(int8, prompt, sp, compiled=True)]
        result = {
            "model": "6x6x384 byte-level",
            "threads": torch.get_num_threads(),
            "train_steps": trained.steps,
            "train_val_loss": round(trained.final_val_loss or float("nan"), 4),
            "fp32_tokens_per_s": round(fp32_tps, 1),
            "int8_tokens_per_s": round(int8_tps, 1),
            "speedup": round(int8_tps / fp32_tps, 3),
            "fp32_eager_tokens_per_s": round(tps["fp32_eager"], 1),
            "int8_eager_tokens_per_s": round(tps["int8_eager"], 1),
            "eager_speedup": round(tps["int8_eager"] / tps["fp32_eager"], 3),
            "fp32_bpb": round(fp32_bpb, 4),
            "int8_bpb": round(int8_bpb, 4),
            "bpb_change": round((int8_bpb - fp32_bpb) / fp32_bpb, 5),
            "int8_wo_bpb": round(wo_bpb, 4),
            "bpb_change_wo": round((wo_bpb - fp32_bpb) / fp32_bpb, 5),
            "same_greedy_tokens": same,
            "fp32_mb": round(model_bytes(fp32_dir) / 1e6, 2),
            "int8_mb": round(model_bytes(int8_dir) / 1e6, 2),
            "seconds": round(time.perf_counter() - t_start, 1),
        }
    result["targets_met"] = result["speedup"] >= 1.5 and max(result["bpb_change"], result["bpb_change_wo"]) <= 0.01
    print(f"decode batch 1: fp32 {result['fp32_tokens_per_s']} tok/s, int8 {result['int8_tokens_per_s']} tok/s, "
          f"speedup {result['speedup']}x")
    print(f"bits per byte: fp32 {result['fp32_bpb']}, int8 {result['int8_bpb']} ({result['bpb_change']:+.4%}), "
          f"int8 weight-only {result['int8_wo_bpb']} ({result['bpb_change_wo']:+.4%})")
    print("  ".join(f"{k}={v}" for k, v in result.items()))
    if args.json:
        print(json.dumps(with_cpu(result)))


if __name__ == "__main__":
    main()
