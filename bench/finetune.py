"""Fine-tuning a pretrained base: lmops (full and LoRA) against transformers + peft at the same settings.

One tiny random ``LlamaForCausalLM`` base (written by ``save_pretrained``, with a byte-level BPE
``tokenizer.json`` trained on tinyshakespeare) is fine-tuned four ways for the same number of
optimizer steps on the same windows (``lmcore.training.loop.Batches``, same seed) at the same lr
(constant, no warmup), batch, sequence length, clipping and LoRA rank/alpha/targets:

* ``lmops-full`` / ``lmops-lora``: ``lmcore.training.loop.train`` with ``model.base`` (the real
  training path; LoRA injected through peft into lmops' fused ``qkv``/``gate_up`` layers);
* ``hf-full`` / ``hf-lora``: ``AutoModelForCausalLM`` (+ ``peft.get_peft_model`` on q/k/v/o and
  gate/up/down) in a plain loop with ``torch.optim.AdamW`` (fused) and cross-entropy on its logits.

Each variant runs in its own process, so ``peak_rss_mb`` is its own. Reported: tokens/s over the
training steps, peak RSS and the held-out loss after the budget (the same 10 fixed validation
windows for every variant). LoRA's parameterisations differ slightly: lmops puts one adapter on the
fused q|k|v projection (rank r shared by q, k and v), peft on each of q, k, v.

    python bench/finetune.py [--json] [--steps 40] [--threads N] [--device cuda --shape 12x768 --dtype bfloat16]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import CORPUS, ROOT, cpu_header, parser, quiet_transformers, setup, with_cpu

VARIANTS = ("lmops-full", "hf-full", "lmops-lora", "hf-lora")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LMOPS_TARGETS = ["qkv", "proj", "gate_up", "down"]


def make_base(folder: Path, layers: int, width: int, vocab: int) -> Path:
    """A random Llama base with a BPE tokenizer trained on the corpus, as ``save_pretrained`` writes it."""
    import transformers

    from lmcore.data.tokenizer import Tokenizer
    from lmcore.model.hf import _tokenizer_files

    text = CORPUS.read_text(encoding="utf-8")
    tok = Tokenizer.train([text[i : i + 2000] for i in range(0, len(text), 2000)], "bpe", vocab)
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in _tokenizer_files(tok).items():
        (folder / name).write_text(body, encoding="utf-8")
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=int(width * 8 / 3
                                   // 64 * 64 + 64), num_hidden_layers=layers, num_attention_heads=width // 64,
                                   num_key_value_heads=width // 64, max_position_embeddings=1024, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True, eos_token_id=tok.eos_id, bos_token_id=tok.eos_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    cut = int(len(ids) * 0.9)
    np.save(folder / "train_ids.npy", ids[:cut])
    np.save(folder / "val_ids.npy", ids[cut:])
    (folder / "docs.json").write_text(json.dumps([text[: int(len(text) * 0.9)], text[int(len(text) * 0.9):]]))
    return folder


def heldout_loss(logits_of, val: np.ndarray, seq: int, device: torch.device) -> float:
    """Mean cross-entropy over 10 fixed validation windows of ``seq`` tokens."""
    from lmcore.training.loop import Batches

    b = Batches(val, seq, 8, 999, device)
    losses = []
    with torch.no_grad():
        for i in range(10):
            x, y = b.get(i)
            logits = logits_of(x)
            losses.append(float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))))
    return sum(losses) / len(losses)


def run_lmops(base: Path, args, lora: bool) -> dict:
    from lmcore.config import load_params
    from lmcore.data.prepare import prepare_split_texts
    from lmcore.data.tokenizer import Tokenizer
    from lmcore.model.checkpoint import load_model
    from lmcore.training.loop import train

    sets = {"model.base": str(base), "model.block_size": args.seq, "train.device": args.device,
            "train.batch_size": args.batch, "train.max_steps": args.steps, "train.max_minutes": 0,
            "train.lr": args.lr_lora if lora else args.lr, "train.min_lr": 0.0, "train.warmup_steps": 0,
            "train.lr_schedule": "constant", "train.optimizer": "adamw", "train.weight_decay": 0.0,
            "train.dtype": args.dtype, "train.eval_interval": 0, "train.checkpoint_interval": 0,
            "train.log_interval": 10, "train.threads": args.threads if args.device == "cpu" else 0,
            "train.lora_r": args.rank if lora else 0, "train.lora_alpha": float(2 * args.rank),
            "train.lora_targets": LMOPS_TARGETS, "train.seed": 7}
    p = load_params(ROOT / "params.yaml", sets)
    work = Path(tempfile.mkdtemp(prefix="lmops-ft-"))
    docs = json.loads((base / "docs.json").read_text())
    data = prepare_split_texts([docs[0]], [docs[1]], work / "data", p.tokenizer, tokenizer=Tokenizer.load(base))
    t0 = time.perf_counter()
    res = train(data.dir, work / "run", p.model, p.train, progress=False)
    wall = time.perf_counter() - t0
    model, _, _ = load_model(res.model_dir, args.device)
    dev = torch.device(args.device)
    loss = heldout_loss(lambda x: model(x)[0], np.load(base / "val_ids.npy"), args.seq, dev)
    return {"tokens_per_s": res.tokens / res.seconds, "heldout_loss": loss, "train_s": res.seconds, "wall_s": wall}


def run_hf(base: Path, args, lora: bool) -> dict:
    import transformers

    from lmcore.training.loop import Batches

    dev = torch.device(args.device)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(dev)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=float(2 * args.rank),
                                                           target_modules=HF_TARGETS, lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr_lora if lora else args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=True)
    batches = Batches(np.load(base / "train_ids.npy"), args.seq, args.batch, 7, dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else torch.autocast(
        dev.type, enabled=False)
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = batches.get(step)
        with amp:
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.eval()
    loss = heldout_loss(lambda x: model(input_ids=x).logits, np.load(base / "val_ids.npy"), args.seq, dev)
    return {"tokens_per_s": args.steps * args.batch * args.seq / seconds, "heldout_loss": loss, "train_s": seconds}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    quiet_transformers()
    base = Path(args.base)
    lora = args.variant.endswith("lora")
    out = run_lmops(base, args, lora) if args.variant.startswith("lmops") else run_hf(base, args, lora)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--shape", default="4x256", help="layers x width of the base")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-lora", type=float, default=2e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--variant", choices=VARIANTS, help="(internal) run one variant in this process")
    p.add_argument("--base", help="(internal) the base folder the parent process wrote")
    args = p.parse_args()
    setup(args)
    if args.variant:
        return child(args)
    cpu_header()
    layers, width = (int(v) for v in args.shape.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(Path(tmp) / "base", layers, width, args.vocab)
        results = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, "--base", str(base)] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("steps", "batch", "seq", "rank", "lr", "lr_lora", "device", "dtype", "threads")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            results[variant] = json.loads(line.removeprefix("RESULT "))
            r = results[variant]
            print(f"{variant:>11}: {r['tokens_per_s']:>9.1f} tok/s  peak RSS {r['peak_rss_mb']:>7.0f} MB  "
                  f"held-out loss {r['heldout_loss']:.4f}", flush=True)
    summary = {"shape": args.shape, "steps": args.steps, "batch": args.batch, "seq": args.seq, "rank": args.rank,
               "device": args.device, "dtype": args.dtype, "variants": results}
    for kind in ("full", "lora"):
        ours, ref = results[f"lmops-{kind}"], results[f"hf-{kind}"]
        summary[f"{kind}_ratio"] = round(ours["tokens_per_s"] / ref["tokens_per_s"], 3)
        summary[f"{kind}_loss_delta"] = round(ours["heldout_loss"] - ref["heldout_loss"], 4)
        print(f"{kind}: lmops/reference tokens/s {summary[f'{kind}_ratio']:.2f}x (target >= 1.2), held-out loss "
              f"lmops - reference {summary[f'{kind}_loss_delta']:+.4f} (target <= 0)")
    if args.json:
        print(json.dumps(with_cpu(summary)))


if __name__ == "__main__":
    main()
