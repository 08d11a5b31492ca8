"""The CUDA path in one run: correctness, the real training loop, throughput vs transformers, NCCL.

CI machines have no GPU, so this is the script a GPU session runs once (a few minutes on one
H100/H200-class card). Each section reports into one JSON object; a failing section records its
error and the rest still run.

  env         torch/CUDA versions, the card, and its measured bf16 matmul peak (TFLOP/s)
  parity      fp32 logits of lmcore vs transformers' LlamaForCausalLM on the GPU; cached decoding
              vs one full forward pass
  train       ``lmcore.training.loop.train`` itself on char-level tinyshakespeare: bf16 autocast (the
              default on CUDA) eager, then ``train.compile: true``, then a checkpoint + ``resume``
  throughput  training tokens/s, lmcore (eager and compiled) vs transformers (eager), both under
              bf16 autocast with fused AdamW, at the CPU benchmark's large size and at a GPT-2-small
              size; MFU against the measured bf16 peak
  generate    batch-1 greedy decoding, 500 new tokens, lmcore (its compiled decode step, and eager
              in the same rounds) vs ``transformers.generate``
  ddp         NCCL: ``torchrun`` launches a 1-process group that wraps lmcore in DDP and all-reduces
              (two ranks would need two GPUs: NCCL refuses two ranks on one device)

    python bench/gpu.py [--json] [--sections env,parity,...] [--corpus PATH]
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import CORPUS, ROOT, flops_per_token, interleaved, model_pair, parser, quiet_transformers, setup

SECTIONS = ("env", "parity", "train", "throughput", "generate", "ddp")
GPU_SIZES = {
    "large": {"n_layer": 6, "n_head": 6, "d_model": 384, "batch": 16, "seq": 256},
    "gpt2s": {"n_layer": 12, "n_head": 12, "d_model": 768, "batch": 32, "seq": 1024},
}
# The train section is params.yaml's configuration (optimizer auto = Muon on CUDA, its lr schedule, ...)
# with only these keys changed: the GPU-sized model and a fixed step budget on the card.
TRAIN_OVERRIDES = {
    "model.n_layer": 6, "model.n_head": 6, "model.n_kv_head": 6, "model.d_model": 384, "model.block_size": 256,
    "train.device": "cuda", "train.batch_size": 64, "train.max_steps": 400,
    "train.max_minutes": 0,  # the step budget decides, not the wall clock
    "train.eval_interval": 200, "train.eval_iters": 20, "train.checkpoint_interval": 0, "train.log_interval": 50,
}


def sync_timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bf16_peak(n: int = 8192, iters: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    dt = sync_timed(lambda: [a @ b for _ in range(iters)])
    return 2 * n**3 * iters / dt / 1e12


def section_env(ctx: dict) -> dict:
    p = torch.cuda.get_device_properties(0)
    ctx["peak_tflops"] = bf16_peak()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": p.name,
            "sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
            "bf16": torch.cuda.is_bf16_supported(), "bf16_matmul_tflops": round(ctx["peak_tflops"], 1)}


def section_parity(ctx: dict) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ours, ref = model_pair(GPU_SIZES["large"], 65, 256)
    ours, ref = ours.cuda().eval(), ref.cuda().eval()
    x = torch.randint(0, 65, (2, 256), device="cuda")
    with torch.no_grad():
        a, _ = ours(x)
        b = ref(input_ids=x).logits
        cache = ours.new_cache(2, 256)
        steps = [ours(x[:, :200], cache=cache)[0]] + [ours(x[:, t : t + 1], cache=cache)[0] for t in range(200, 256)]
        inc = torch.cat(steps, dim=1)
    return {"hf_max_abs_diff": float((a - b).abs().max()), "cache_max_abs_diff": float((a - inc).abs().max()),
            "ok": bool((a - b).abs().max() < 1e-4 and (a - inc).abs().max() < 1e-4)}


def _prepared(ctx: dict) -> Path:
    if "prepared" not in ctx:
        from lmcore.config import TokenizerParams
        from lmcore.data.prepare import prepare_split_texts

        text = Path(ctx["corpus"]).read_text(encoding="utf-8")
        cut = int(len(text) * 0.9)
        out = Path(ctx["tmp"]) / "prepared"
        prepare_split_texts([text[:cut]], [text[cut:]], out, TokenizerParams(kind="byte"), "tinyshakespeare")
        ctx["prepared"] = out
    return ctx["prepared"]


def section_train(ctx: dict) -> dict:
    from dataclasses import replace

    from lmcore.config import load_params
    from lmcore.plots import read_history
    from lmcore.training.loop import train

    data = _prepared(ctx)
    params = load_params(ROOT / "params.yaml", TRAIN_OVERRIDES)
    mp, base = params.model, params.train
    out: dict = {}
    for name, extra in (("eager_bf16", {}), ("compiled_bf16", {"compile": True})):
        t0 = time.perf_counter()
        r = train(data, Path(ctx["tmp"]) / name, mp, replace(base, **extra), progress=False)
        rows = [h for h in read_history(r.history_csv) if h["tokens_per_s"]]
        out[name] = {"wall_s": round(time.perf_counter() - t0, 1), "steps": r.steps,
                     "val_loss": round(r.final_val_loss, 4), "bits_per_byte": round(r.final_val_loss / math.log(2), 4),
                     "tokens_per_s_last": rows[-1]["tokens_per_s"] if rows else None}
    run = Path(ctx["tmp"]) / "resume"
    p1 = replace(base, max_steps=60, checkpoint_interval=30)
    train(data, run, mp, p1, progress=False)
    r2 = train(data, run, mp, replace(base, max_steps=100, checkpoint_interval=30), resume=True, progress=False)
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)
    out["resume"] = {"steps": r2.steps, "checkpoint_step": int(state["step"]), "has_cuda_rng": "rng_cuda" in state,
                     "ok": r2.steps == 100 and int(state["step"]) == 100}
    return out


def _train_steps(fwd, opts, x: torch.Tensor, y: torch.Tensor, steps: int, hf: bool) -> None:
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if hf:
                logits = fwd(input_ids=x).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
            else:
                _, loss = fwd(x, y)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    torch.cuda.synchronize()


def _throughput_at(name: str, size: dict, peak_tflops: float, steps: int = 10) -> dict:
    from lmcore.config import load_params
    from lmcore.training.optimizers import build_optimizers

    ours, ref = model_pair(size, 50304 if name == "gpt2s" else 65, size["seq"])
    ours, ref = ours.cuda().train(), ref.cuda().train()
    compiled = torch.compile(ours)
    # params.yaml's train slice with AdamW on both sides (the reference has no Muon), the same lr, decay, betas
    tp = load_params(ROOT / "params.yaml", {"train.optimizer": "adamw"}).train
    opt_ours = build_optimizers(ours, tp)
    opt_ref = [torch.optim.AdamW(ref.parameters(), lr=tp.lr, weight_decay=tp.weight_decay,
                                 betas=(tp.beta1, tp.beta2), fused=True)]
    x, y = (torch.randint(0, ours.cfg.vocab_size, (size["batch"], size["seq"]), device="cuda") for _ in range(2))
    runs = {"eager": lambda: _train_steps(ours, opt_ours, x, y, steps, False),
            "compiled": lambda: _train_steps(compiled, opt_ours, x, y, steps, False),
            "reference": lambda: _train_steps(ref, opt_ref, x, y, steps, True)}
    compile_s = sync_timed(runs["compiled"])
    runs["eager"]()
    runs["reference"]()
    tps = {k: steps * size["batch"] * size["seq"] / v for k, v in interleaved(runs, 5).items()}
    tflops = flops_per_token(ours.cfg, size["seq"]) / 1e12
    return {"lmops_tokens_per_s": round(tps["eager"]), "lmops_compiled_tokens_per_s": round(tps["compiled"]),
            "reference_tokens_per_s": round(tps["reference"]), "ratio": round(tps["eager"] / tps["reference"], 3),
            "compiled_ratio": round(tps["compiled"] / tps["reference"], 3), "compile_s": round(compile_s, 1),
            "mfu": round(tps["eager"] * tflops / peak_tflops, 3),
            "compiled_mfu": round(tps["compiled"] * tflops / peak_tflops, 3),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)}


def section_throughput(ctx: dict) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = True
    out = {}
    for name, size in GPU_SIZES.items():
        out[name] = _throughput_at(name, size, ctx.get("peak_tflops") or bf16_peak())
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def section_generate(ctx: dict) -> dict:
    from generate import measure  # bench/generate.py: the CPU benchmark's own loop, on the GPU

    return measure(GPU_SIZES["large"], 65, list(range(1, 33)), 500, 3, device="cuda", compiled=True)


DDP_CHILD = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from torch.nn.parallel import DistributedDataParallel as DDP
from lmcore.model.transformer import ModelConfig, Transformer
dist.init_process_group("nccl")
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])); torch.cuda.set_device(dev)
net = Transformer(ModelConfig(vocab_size=65, n_layer=2, n_head=4, n_kv_head=4, d_model=128, block_size=64)).to(dev)
ddp = DDP(net, device_ids=[dev.index]); opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
x = torch.randint(0, 65, (8, 64), device=dev)
losses = []
for _ in range(20):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = ddp(x, x)
    loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
t = torch.ones(4, device=dev); dist.all_reduce(t)
print("DDP", dist.get_backend(), dist.get_world_size(), losses[0], losses[-1], t.sum().item(), flush=True)
dist.destroy_process_group()
"""


def section_ddp(ctx: dict) -> dict:
    script = Path(ctx["tmp"]) / "ddp_child.py"
    script.write_text(DDP_CHILD)
    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        str(script), root], capture_output=True, text=True, timeout=180)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("DDP ")), "")
    if r.returncode != 0 or not line:
        raise RuntimeError(f"torchrun rc={r.returncode}: {r.stderr[-800:]}")
    _, backend, world, first, last, total = line.split()
    return {"backend": backend, "world_size": int(world), "loss_first": round(float(first), 4),
            "loss_last": round(float(last), 4), "all_reduce_sum": float(total),
            "ok": backend == "nccl" and float(last) < float(first)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--corpus", default=str(CORPUS))
    args = p.parse_args()
    setup(args)
    quiet_transformers()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device")
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="lmops-cuda-") as tmp:
        ctx = {"tmp": tmp, "corpus": args.corpus}
        for name in args.sections.split(","):
            t0 = time.perf_counter()
            try:
                result[name] = globals()[f"section_{name}"](ctx)
            except Exception as e:  # one broken section must not hide the others' figures
                traceback.print_exc()
                result[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            result[name]["section_s"] = round(time.perf_counter() - t0, 1)
            print(f"{name}: {json.dumps(result[name])}", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
