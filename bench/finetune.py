"""Fine-tuning a pretrained base: lmops (full and LoRA) against transformers + peft at the same settings.

One tiny random ``LlamaForCausalLM`` base (written by ``save_pretrained``, with a byte-level BPE
``tokenizer.json`` trained on tinyshakespeare) is fine-tuned six ways for the same number of
optimizer steps on the same windows (one prepared token stream, ``lmcore.training.loop.Batches``,
same seed) at the same lr (constant, no warmup), batch, sequence length, clipping, fp32 and LoRA
rank/alpha/targets:

* ``lmops-full`` / ``lmops-lora``: ``lmcore.training.loop.train`` with ``model.base`` (the real
  training path; LoRA injected through peft into lmops' fused ``qkv``/``gate_up`` layers);
* ``hf-full`` / ``hf-lora``: ``AutoModelForCausalLM`` (+ ``peft.get_peft_model`` on q/k/v/o and
  gate/up/down) in a plain loop with ``torch.optim.AdamW`` (fused) and cross-entropy on its logits;
* ``hf-trainer-full`` / ``hf-trainer-lora`` (``--trainer``): the same model through
  ``transformers.Trainer`` (the windows in order, fused AdamW, the same loss), as most users run it.

Each variant runs in its own process, so ``peak_rss_mb`` is its own. Reported: tokens/s over the
training steps, peak RSS and the held-out loss after the budget (the same 10 fixed validation
windows for every variant). LoRA rank r is r per projection on both sides: peft gives q, k and v
rank r each, lmops gives its fused q|k|v layer rank 3r (and gate|up 2r) at the same alpha / r scale
(``lmcore.training.lora.lora_config``), a superset of the separate adapters' updates.

Each variant runs ``--rounds`` times, in alternating order; medians are reported (this host's speed drifts
by +-20% between minutes, more than the differences measured), and the median of the rounds' own ratios
(``*_ratio_paired``: lmops and its reference run back to back within a round, so each ratio sees one host speed).

    python bench/finetune.py [--json] [--steps 40] [--rounds 3] [--trainer] [--threads N]
                             [--device cuda --shape 12x768 --dtype bfloat16]
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

from lmcore.data.prepare import load_prepared

VARIANTS = ("lmops-full", "hf-full", "hf-trainer-full", "lmops-lora", "hf-lora", "hf-trainer-lora")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LMOPS_TARGETS = ["qkv", "proj", "gate_up", "down"]
PREPARED = "prepared"  # the base folder's prepared training data (lmcore.data.prepare)


def make_base(folder: Path, layers: int, width: int, vocab: int) -> Path:
    """A random Llama base with a BPE tokenizer trained on the corpus, as ``save_pretrained`` writes it."""
    import transformers

    from lmcore.config import load_params
    from lmcore.data.prepare import prepare_split_texts
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
    cut = int(len(text) * 0.9)
    # one prepared folder every variant trains from: the same token stream, so the same windows
    prepare_split_texts([text[:cut]], [text[cut:]], folder / PREPARED, load_params(ROOT / "params.yaml").tokenizer,
                        tokenizer=Tokenizer.load(folder))
    np.save(folder / "val_ids.npy", np.asarray(tok.encode(text[cut:]), dtype=np.uint16))
    return folder


def train_ids(base: Path) -> np.ndarray:
    return load_prepared(base / PREPARED).tokens("train")


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
    t0 = time.perf_counter()
    res = train(base / PREPARED, work / "run", p.model, p.train, progress=False)
    wall = time.perf_counter() - t0
    model, _, _ = load_model(res.model_dir, args.device)
    dev = torch.device(args.device)
    loss = heldout_loss(lambda x: model(x)[0], np.load(base / "val_ids.npy"), args.seq, dev)
    return {"tokens_per_s": res.tokens / res.seconds, "heldout_loss": loss, "train_s": res.seconds, "wall_s": wall}


def hf_model(base: Path, args, lora: bool) -> torch.nn.Module:
    """The base as transformers loads it, with peft's LoRA on every Llama projection when ``lora``."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=float(2 * args.rank),
                                                           target_modules=HF_TARGETS, lora_dropout=0.0))
    return model


def hf_result(model: torch.nn.Module, base: Path, args, seconds: float, dev: torch.device) -> dict:
    """A reference run's tokens/s over ``seconds`` of training and its held-out loss."""
    model.eval()
    loss = heldout_loss(lambda x: model(input_ids=x).logits, np.load(base / "val_ids.npy"), args.seq, dev)
    return {"tokens_per_s": args.steps * args.batch * args.seq / seconds, "heldout_loss": loss, "train_s": seconds}


def run_hf(base: Path, args, lora: bool) -> dict:

    from lmcore.training.loop import Batches

    dev = torch.device(args.device)
    model = hf_model(base, args, lora).to(dev)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr_lora if lora else args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=True)
    batches = Batches(train_ids(base), args.seq, args.batch, 7, dev)
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
    return hf_result(model, base, args, time.perf_counter() - t0, dev)


def run_hf_trainer(base: Path, args, lora: bool) -> dict:
    """The same fine-tuning through ``transformers.Trainer`` (+ peft): how most users run it.

    Same windows (each step's 8 rows of ``Batches``, in order), lr, betas, clipping, fused AdamW; the
    loss is cross-entropy on the window's next tokens (``compute_loss``), as in the plain loop."""
    import transformers

    from lmcore.training.loop import Batches

    dev = torch.device(args.device)
    model = hf_model(base, args, lora)  # Trainer moves it to its device
    batches = Batches(train_ids(base), args.seq, args.batch, 7, torch.device("cpu"))
    windows = [batches.get(step) for step in range(args.steps)]
    rows = [{"input_ids": x[i], "labels": y[i]} for x, y in windows for i in range(x.shape[0])]

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    class NextToken(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"]).logits
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), inputs["labels"].reshape(-1))

        def _get_train_sampler(self, *a, **k):  # the windows in order: step i trains Batches.get(i)
            return torch.utils.data.SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr_lora if lora else args.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch_fused",
            use_cpu=args.device == "cpu", bf16=args.dtype == "bfloat16", logging_strategy="no",
            save_strategy="no", report_to="none", dataloader_num_workers=0, seed=7, disable_tqdm=True)
        trainer = NextToken(model=model, args=targs, train_dataset=Windows())
        t0 = time.perf_counter()
        trainer.train()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return hf_result(model, base, args, time.perf_counter() - t0, dev)


def run_variant(variant: str, base: Path, args) -> dict:
    """One variant in a fresh process (its own peak RSS, its own allocator state)."""
    cmd = [sys.executable, __file__, "--variant", variant, "--base", str(base)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k in ("steps", "batch", "seq", "rank", "lr", "lr_lora", "device", "dtype", "threads")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def child(args) -> None:
    torch.set_num_threads(args.threads)
    quiet_transformers()
    base = Path(args.base)
    lora = args.variant.endswith("lora")
    run = run_lmops if args.variant.startswith("lmops") else run_hf_trainer if "trainer" in args.variant else run_hf
    out = run(base, args, lora)
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
    p.add_argument("--rounds", type=int, default=3, help="runs of each variant (interleaved; medians reported)")
    p.add_argument("--trainer", action="store_true", help="also run transformers.Trainer as a second reference")
    p.add_argument("--variant", choices=VARIANTS, help="(internal) run one variant in this process")
    p.add_argument("--base", help="(internal) the base folder the parent process wrote")
    args = p.parse_args()
    setup(args)
    if args.variant:
        return child(args)
    cpu_header()
    layers, width = (int(v) for v in args.shape.split("x"))
    variants = [v for v in VARIANTS if args.trainer or "trainer" not in v]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(Path(tmp) / "base", layers, width, args.vocab)
        for rnd in range(args.rounds):  # rounds alternate the order (ABBA): load on a shared host drifts
            for variant in variants if rnd % 2 == 0 else variants[::-1]:
                r = run_variant(variant, base, args)
                runs[variant].append(r)
                print(f"round {rnd + 1} {variant:>15}: {r['tokens_per_s']:>9.1f} tok/s  peak RSS "
                      f"{r['peak_rss_mb']:>7.0f} MB  held-out loss {r['heldout_loss']:.4f}", flush=True)
    results = {v: {**rs[-1], "tokens_per_s": float(np.median([r["tokens_per_s"] for r in rs])),
                   "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in rs],
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for v, rs in runs.items()}
    summary = {"shape": args.shape, "steps": args.steps, "rounds": args.rounds, "batch": args.batch, "seq": args.seq,
               "rank": args.rank, "device": args.device, "dtype": args.dtype, "variants": results}
    for kind in ("full", "lora"):
        refs = [("plain loop", f"hf-{kind}", kind)] + ([("Trainer", f"hf-trainer-{kind}", f"{kind}_trainer")]
                                                       if args.trainer else [])
        for ref_name, key, tag in refs:
            ours, ref = results[f"lmops-{kind}"], results[key]
            summary[f"{tag}_ratio"] = round(ours["tokens_per_s"] / ref["tokens_per_s"], 3)
            summary[f"{tag}_loss_delta"] = round(ours["heldout_loss"] - ref["heldout_loss"], 4)
            per_round = [a / b for a, b in zip(ours["tokens_per_s_runs"], ref["tokens_per_s_runs"], strict=True)]
            # each round's pair ran back to back: its ratio sees the same host speed, medians of either side do not
            summary[f"{tag}_ratio_paired"] = round(float(np.median(per_round)), 3)
            print(f"{kind} vs {ref_name}: lmops/reference tokens/s {summary[f'{tag}_ratio']:.2f}x (medians; rounds "
                  f"{min(per_round):.2f}-{max(per_round):.2f}x, their median {summary[f'{tag}_ratio_paired']:.2f}x; "
                  f"target >= 1.2), held-out loss lmops - reference "
                  f"{summary[f'{tag}_loss_delta']:+.4f} (target <= 0); peak RSS {ours['peak_rss_mb']:.0f} vs "
                  f"{ref['peak_rss_mb']:.0f} MB")
    if args.json:
        print(json.dumps(with_cpu(summary)))


if __name__ == "__main__":
    main()
