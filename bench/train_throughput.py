"""Training throughput (forward + backward + AdamW step), lmcore vs transformers' LlamaForCausalLM.

Same layers, heads, width, intermediate size (Llama rule: 384 / 1024), tied embeddings,
vocab (65: char-level tinyshakespeare), batch and sequence, same initial weights and the
same batches. lmops trains with its real optimizer (``lmcore.training.optimizers.build_optimizers`` with
params.yaml's ``train`` slice, optimizer AdamW like the reference's: decay on matrices only) in
the precision ``lmops train`` picks (``lmcore.device.training_choices``: bf16 autocast where this
machine's probe measured a faster bf16 step at this shape, else fp32); the reference with a plain
``torch.optim.AdamW`` (same lr, decay and betas) and ``F.cross_entropy`` on its logits, in fp32
(transformers' default). Where lmops picks bf16, lmops in fp32 is timed too
(``ratio_fp32``: the same precision on both sides). Each side runs several optimizer steps
per round, rounds alternate (ABBA...), medians are reported, plus lmcore's MFU against the
matmul peak of the precision it ran in (best of 1536^2 matmuls, measured before, between and
after the sizes, since load on a shared machine drifts).

    python bench/train_throughput.py [--json] [--threads N] [--sizes small,large] [--repeats R] [--compile]

``--compile`` times lmops under ``torch.compile`` (``train.compile: true``) and reports the
one-off compile time as ``compile_s``; off by default because compiling takes minutes on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import (
    ROOT,
    SIZES,
    char_corpus,
    cpu_header,
    emit,
    flops_per_token,
    interleaved,
    matmul_gflops,
    model_pair,
    parser,
    setup,
    timed,
)

# (optimizer steps per round, rounds) per size: keeps the default run within ~3 minutes on 2 cores.
PLAN = {"small": (10, 7), "large": (2, 5)}


def batches(data: torch.Tensor, batch: int, seq: int, n: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (n, batch), generator=g)
    return [(torch.stack([data[i : i + seq] for i in row]), torch.stack([data[i + 1 : i + 1 + seq] for i in row]))
            for row in starts]


def train_params(**overrides):
    """params.yaml's train slice with AdamW (what the reference runs) and the named ``overrides``."""
    from lmcore.config import load_params

    return load_params(ROOT / "params.yaml", {"train.optimizer": "adamw",
                                              **{f"train.{k}": v for k, v in overrides.items()}}).train


def lmops_optimizers(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """What ``lmops train`` uses with params.yaml's train slice, AdamW."""
    from lmcore.training.optimizers import build_optimizers

    return build_optimizers(model, train_params())


def measure(name: str, vocab: int, data: torch.Tensor, rounds: int, compile: bool = False) -> dict:
    from lmcore.device import training_choices

    size = SIZES[name]
    steps, default_rounds = PLAN[name]
    ours, ref = model_pair(size, vocab, size["seq"])
    ours.train()
    ref.train()
    opts_ours = lmops_optimizers(ours)
    tp = train_params()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=tp.lr, weight_decay=tp.weight_decay, betas=(tp.beta1, tp.beta2))
    data_batches = batches(data, size["batch"], size["seq"], steps)
    fwd = torch.compile(ours) if compile else ours
    # the precision `lmops train` picks here (train.dtype auto: this machine's probe at this shape)
    amp = training_choices(torch.device("cpu"), train_params(batch_size=size["batch"]), ours.cfg).autocast

    def step_ours(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = amp) -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            _, loss = fwd(x, y)
        loss.backward()
        for opt in opts_ours:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def step_ref(x: torch.Tensor, y: torch.Tensor) -> None:
        logits = ref(input_ids=x).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    compile_s = timed(lambda: step_ours(*data_batches[0]))  # warm up (and compile) before timing
    step_ref(*data_batches[0])
    arms = {"lmops": lambda: [step_ours(x, y) for x, y in data_batches],
            "reference": lambda: [step_ref(x, y) for x, y in data_batches]}
    if amp is not None:
        step_ours(*data_batches[0], None)
        arms["lmops_fp32"] = lambda: [step_ours(x, y, None) for x, y in data_batches]
    sec = interleaved(arms, rounds or default_rounds)
    tokens = steps * size["batch"] * size["seq"]
    lm, rf = tokens / sec["lmops"], tokens / sec["reference"]
    same = {"ratio_fp32": round(sec["reference"] / sec["lmops_fp32"], 3)} if amp is not None else {}
    return {"lmops_tokens_per_s": round(lm, 1), "reference_tokens_per_s": round(rf, 1), "ratio": round(lm / rf, 3),
            "lmops_precision": "bfloat16" if amp is not None else "float32", "reference_precision": "float32",
            **same, "gflops_per_s": round(lm * flops_per_token(ours.cfg, size["seq"]) / 1e9, 1),
            **({"compile_s": round(compile_s, 1)} if compile else {})}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="time lmops under torch.compile")
    args = p.parse_args()
    setup(args)
    cpu_header()
    from _common import quiet_transformers

    quiet_transformers()
    data, vocab = char_corpus()
    result: dict = {"sizes": {}}
    peak = {"float32": 0.0, "bfloat16": 0.0}
    for name in args.sizes.split(","):  # the peak is re-measured around each size: load on a shared box drifts
        peak["float32"] = max(peak["float32"], matmul_gflops())
        result["sizes"][name] = measure(name, vocab, data, args.repeats, args.compile)
    peak["float32"] = max(peak["float32"], matmul_gflops())
    if any(r["lmops_precision"] == "bfloat16" for r in result["sizes"].values()):
        peak["bfloat16"] = matmul_gflops(dtype=torch.bfloat16)
    for r in result["sizes"].values():
        r["mfu"] = round(r["gflops_per_s"] / peak[r["lmops_precision"]], 3)
        r["reference_mfu"] = round(r["gflops_per_s"] / r["ratio"] / peak["float32"], 3)
    result.update({"matmul_gflops": round(peak["float32"], 1),
                   **({"matmul_gflops_bf16": round(peak["bfloat16"], 1)} if peak["bfloat16"] else {}),
                   "threads": torch.get_num_threads(), "vocab": vocab,
                   "compile": args.compile,
                   "flops_per_token": "6*N_matmul + 12*L*C*T (PaLM/nanoGPT; causal attention counted in full)"})
    emit(result, args.json)


if __name__ == "__main__":
    main()
