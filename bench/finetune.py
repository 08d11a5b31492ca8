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

``--model PATH_OR_GGUF`` runs the real case instead of the tiny random base: a pretrained Llama (an HF
folder, or a GGUF file converted once by ``lmcore.model.gguf.hf_folder_from_gguf``) fine-tuned on a
deterministic chat set rendered by its own template (``tinyshakespeare`` speeches as user turn / reply
pairs; prompt tokens masked, -1, on both sides). It adds ``lmops-*-auto``: lmops with its automatic
choices (``train.dtype`` as this machine's probe decides at the training window and batch; with a base
``train.optimizer: auto`` is AdamW; ``train.compile`` stays off, its default) beside the equal-settings
variants (both sides fp32 eager). Also reported per variant: model FLOPs utilisation against the
machine's measured fp32 matmul peak (the best of ``lmcore.machine.cpu_profile``'s ``fp32_gflops`` and
``_common.matmul_gflops``' 1536^3 product, measured in the parent before the runs), counting
6 N per token for full fine-tuning and 4 N + 6 N_adapter for LoRA (forward 2 N, backward through the
activations 2 N, no gradient of the frozen weights, adapters forward and backward), N the model's
weights (the tied embedding once: its head product is counted, its lookup is free).

    python bench/finetune.py [--json] [--steps 40] [--rounds 3] [--trainer] [--threads N]
                             [--device cuda --shape 12x768 --dtype bfloat16]
    python bench/finetune.py --model SmolLM2-135M-Instruct.Q4_1.gguf --batch 16 --seq 128 --steps 4 --rounds 1
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
from _common import CORPUS, ROOT, cpu_header, matmul_gflops, parser, quiet_transformers, setup, with_cpu

from lmcore.data.prepare import load_prepared

VARIANTS = ("lmops-full", "lmops-full-auto", "hf-full", "hf-trainer-full", "lmops-lora", "lmops-lora-auto", "hf-lora",
            "hf-trainer-lora")
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
    return folder


def real_base(spec: str) -> Path:
    """The HF folder of ``--model``: itself, or a GGUF file's cached conversion."""
    from lmcore.model.gguf import hf_folder_from_gguf

    path = Path(spec).expanduser()
    return hf_folder_from_gguf(path) if path.suffix.lower() == ".gguf" else path


def prepare_chats(base: Path, out: Path, chats: int = 1500) -> Path:
    """A chat set rendered by ``base``'s template (user: one speech of tinyshakespeare, assistant: the next),
    prepared with its tokenizer; the last tenth of the chats held out. Deterministic: no model writes it."""
    from lmcore.config import load_params
    from lmcore.data.chat import chat_text
    from lmcore.data.prepare import prepare_split_texts
    from lmcore.data.tokenizer import Tokenizer

    speeches = [s.strip() for s in CORPUS.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    docs = [chat_text([{"role": "user", "content": speeches[i]}, {"role": "assistant", "content": speeches[i + 1]}])
            for i in range(0, min(2 * chats, len(speeches) - 1), 2)]
    cut = len(docs) * 9 // 10
    prepare_split_texts(docs[:cut], docs[cut:], out, load_params(ROOT / "params.yaml").tokenizer,
                        tokenizer=Tokenizer.load(base))
    return out


def train_batches(data: Path, args, device: torch.device):
    """The training windows every variant steps through (same stream, mask, seed: same windows)."""
    from lmcore.training.loop import Batches

    d = load_prepared(data)
    return Batches(d.tokens("train"), args.seq, args.batch, 7, device, d.loss_mask("train"))


def heldout_loss(logits_of, data: Path, args, device: torch.device) -> float:
    """Mean cross-entropy over ``--heldout`` fixed validation windows of ``seq`` tokens (8 per batch),
    masked prompt tokens (-1) ignored."""
    from lmcore.training.loop import Batches

    d = load_prepared(data)
    b = Batches(d.tokens("val"), args.seq, 8, 999, device, d.loss_mask("val"))
    losses = []
    with torch.no_grad():
        for i in range(max(1, args.heldout // 8)):
            x, y = b.get(i)
            logits = logits_of(x)
            losses.append(float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                                ignore_index=-1)))
    return sum(losses) / len(losses)


def vm_hwm_mb() -> float:
    """This process's peak resident memory so far (MB): VmHWM, its own address space's high-water mark.

    Not ``ru_maxrss``: Linux carries that over fork and exec, so a child lighter than the parent that
    started it reports the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flops_per_token(model: torch.nn.Module, lora: bool) -> tuple[float, int, int]:
    """(model FLOPs per trained token, N weights, N adapter weights): 6 N full; 4 N + 6 N_adapter LoRA."""
    seen: set[int] = set()
    n = n_adapter = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "lora_" in name:
            n_adapter += p.numel()
        else:
            n += p.numel()
    return (4 * n + 6 * n_adapter if lora else 6 * n), n, n_adapter


def run_lmops(base: Path, data: Path, args, lora: bool, dtype: str) -> dict:
    from lmcore.config import load_params
    from lmcore.model.checkpoint import load_model
    from lmcore.training.loop import train

    sets = {"model.base": str(base), "model.block_size": args.seq, "train.device": args.device,
            "train.batch_size": args.batch, "train.max_steps": args.steps, "train.max_minutes": 0,
            "train.lr": args.lr_lora if lora else args.lr, "train.min_lr": 0.0, "train.warmup_steps": 0,
            "train.lr_schedule": "constant", "train.optimizer": "adamw", "train.weight_decay": 0.0,
            "train.dtype": dtype, "train.eval_interval": 0, "train.checkpoint_interval": 0, "train.eval_iters": 1,
            "train.log_interval": 10, "train.threads": args.threads if args.device == "cpu" else 0,
            "train.lora_r": args.rank if lora else 0, "train.lora_alpha": float(2 * args.rank),
            "train.lora_targets": LMOPS_TARGETS, "train.seed": 7}
    p = load_params(ROOT / "params.yaml", sets)
    work = Path(tempfile.mkdtemp(prefix="lmops-ft-"))
    if args.heap_keep_mb:  # what lmcore.machine.keep_freed_memory keeps in the heap (a diagnostic, see --help)
        import lmcore.machine

        lmcore.machine.MALLOC_KEEP_BYTES = args.heap_keep_mb << 20
    t0 = time.perf_counter()
    res = train(data, work / "run", p.model, p.train, progress=False)
    wall = time.perf_counter() - t0
    train_peak = vm_hwm_mb()
    model, _, _ = load_model(res.model_dir, args.device)
    dev = torch.device(args.device)
    loss = heldout_loss(lambda x: model(x)[0], data, args, dev)
    flops = flops_per_token(model, False)[0] if not lora else None
    if lora:  # the merged model has no adapters left: count them from the adapter file
        from safetensors.torch import load_file

        adapter = load_file(str(res.out_dir / "adapter" / "adapter_model.safetensors"))
        n_adapter = sum(t.numel() for t in adapter.values())
        flops = 4 * flops_per_token(model, False)[1] + 6 * n_adapter
    return {"tokens_per_s": res.tokens / res.seconds, "heldout_loss": loss, "train_s": res.seconds, "wall_s": wall,
            "train_peak_rss_mb": train_peak, "flops_per_token": flops, "dtype": res.choices.get("dtype")}


def hf_model(base: Path, args, lora: bool) -> torch.nn.Module:
    """The base as transformers loads it, with peft's LoRA on every Llama projection when ``lora``."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=float(2 * args.rank),
                                                           target_modules=HF_TARGETS, lora_dropout=0.0))
    return model


def hf_result(model: torch.nn.Module, data: Path, args, seconds: float, dev: torch.device, lora: bool) -> dict:
    """A reference run's tokens/s over ``seconds`` of training and its held-out loss."""
    train_peak = vm_hwm_mb()
    model.eval()
    loss = heldout_loss(lambda x: model(input_ids=x).logits, data, args, dev)
    return {"tokens_per_s": args.steps * args.batch * args.seq / seconds, "heldout_loss": loss, "train_s": seconds,
            "train_peak_rss_mb": train_peak, "flops_per_token": flops_per_token(model, lora)[0], "dtype": args.dtype}


def run_hf(base: Path, data: Path, args, lora: bool) -> dict:
    dev = torch.device(args.device)
    model = hf_model(base, args, lora).to(dev)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr_lora if lora else args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=True)
    batches = train_batches(data, args, dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else torch.autocast(
        dev.type, enabled=False)
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = batches.get(step)
        with amp:
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return hf_result(model, data, args, time.perf_counter() - t0, dev, lora)


def run_hf_trainer(base: Path, data: Path, args, lora: bool) -> dict:
    """The same fine-tuning through ``transformers.Trainer`` (+ peft): how most users run it.

    Same windows (each step's 8 rows of ``Batches``, in order), lr, betas, clipping, fused AdamW; the
    loss is cross-entropy on the window's next tokens (``compute_loss``), as in the plain loop."""
    import transformers

    dev = torch.device(args.device)
    model = hf_model(base, args, lora)  # Trainer moves it to its device
    batches = train_batches(data, args, torch.device("cpu"))
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
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), inputs["labels"].reshape(-1),
                                   ignore_index=-1)

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
        return hf_result(model, data, args, time.perf_counter() - t0, dev, lora)


def run_variant(variant: str, base: Path, data: Path, args) -> dict:
    """One variant in a fresh process (its own peak RSS, its own allocator state)."""
    cmd = [sys.executable, __file__, "--variant", variant, "--base", str(base), "--data", str(data)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k in ("steps", "batch", "seq", "rank", "lr", "lr_lora", "device", "dtype", "threads", "heldout",
                 "auto_dtype", "heap_keep_mb")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def child(args) -> None:
    torch.set_num_threads(args.threads)
    quiet_transformers()
    base, data = Path(args.base), Path(args.data)
    lora = "lora" in args.variant
    if args.variant.startswith("lmops"):
        out = run_lmops(base, data, args, lora, args.auto_dtype if args.variant.endswith("auto") else args.dtype)
    else:
        out = (run_hf_trainer if "trainer" in args.variant else run_hf)(base, data, args, lora)
    out["peak_rss_mb"] = vm_hwm_mb()
    if args.device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def probed_dtype(base: Path, args) -> str:
    """What ``train.dtype: auto`` picks for this model here: the probe at the training window and batch
    (the shape that runs), not at the base's whole context."""
    import dataclasses

    from lmcore.model.base import load_base
    from lmcore.probe import Shape, probe

    cfg = load_base(str(base), verify=False)[0].cfg
    return probe(Shape.of(dataclasses.replace(cfg, block_size=args.seq), args.batch), muon=False).decisions.train_dtype


def model_flops_utilisation(r: dict, peak_gflops: float) -> float:
    return round(r["tokens_per_s"] * r["flops_per_token"] / 1e9 / peak_gflops, 4)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--shape", default="4x256", help="layers x width of the tiny random base")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--model", help="a pretrained Llama (HF folder or .gguf) instead of the tiny random base")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-lora", type=float, default=2e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the equal-settings precision")
    p.add_argument("--auto-dtype", default="", help="lmops-*-auto's train.dtype (default: this machine's probe)")
    p.add_argument("--heldout", type=int, default=80, help="held-out windows (8 per batch)")
    p.add_argument("--heap-keep-mb", type=int, default=0,
                   help="diagnostic: lmops' glibc mmap/trim threshold (lmcore.machine.MALLOC_KEEP_BYTES) in MB; "
                   "0 keeps lmops' own (1 GB: every activation stays in the heap)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each variant (interleaved; medians reported)")
    p.add_argument("--trainer", action="store_true", help="also run transformers.Trainer as a second reference")
    p.add_argument("--only", default="", help="comma-separated subset of the variants to run")
    p.add_argument("--variant", choices=VARIANTS, help="(internal) run one variant in this process")
    p.add_argument("--base", help="(internal) the base folder the parent process wrote")
    p.add_argument("--data", help="(internal) the prepared folder every variant trains on")
    args = p.parse_args()
    setup(args)
    if args.variant:
        return child(args)
    profile = cpu_header()
    variants = [v for v in VARIANTS if (args.trainer or "trainer" not in v) and (args.model or "auto" not in v)
                and (not args.only or v in args.only.split(","))]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            base = real_base(args.model)
            data = prepare_chats(base, Path(tmp) / PREPARED)
        else:
            layers, width = (int(v) for v in args.shape.split("x"))
            base = make_base(Path(tmp) / "base", layers, width, args.vocab)
            data = base / PREPARED
        if any(v.endswith("auto") for v in variants) and not args.auto_dtype:
            args.auto_dtype = probed_dtype(base, args)
            print(f"lmops auto: train.dtype {args.auto_dtype} (probe at {args.batch} x {args.seq}), "
                  f"optimizer adamw, compile off", flush=True)
        for rnd in range(args.rounds):  # rounds alternate the order (ABBA): load on a shared host drifts
            for variant in variants if rnd % 2 == 0 else variants[::-1]:
                r = run_variant(variant, base, data, args)
                runs[variant].append(r)
                print(f"round {rnd + 1} {variant:>15}: {r['tokens_per_s']:>9.1f} tok/s  peak RSS "
                      f"{r['peak_rss_mb']:>7.0f} MB (training {r['train_peak_rss_mb']:.0f})  held-out loss "
                      f"{r['heldout_loss']:.4f}  [{r['dtype']}]", flush=True)
    # the fp32 peak: the best of the profile's mid-size product and a large square one (a busy host lowers both)
    peak = round(max(profile["fp32_gflops"], matmul_gflops()), 1)
    results = {v: {**rs[-1], "tokens_per_s": float(np.median([r["tokens_per_s"] for r in rs])),
                   "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in rs],
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                   "train_peak_rss_mb": max(r["train_peak_rss_mb"] for r in rs)} for v, rs in runs.items()}
    for r in results.values():
        r["mfu_fp32_peak"] = model_flops_utilisation(r, peak)
    summary = {"model": args.model or f"random {args.shape}", "steps": args.steps, "rounds": args.rounds,
               "batch": args.batch, "seq": args.seq, "rank": args.rank, "device": args.device, "dtype": args.dtype,
               "auto_dtype": args.auto_dtype or None, "fp32_peak_gflops": peak, "heap_keep_mb": args.heap_keep_mb,
               "flops": "full 6N per token; LoRA 4N + 6N_adapter (N: weights, tied embedding once)",
               "variants": results}
    for kind in ("full", "lora"):
        refs = [("plain loop", f"lmops-{kind}", f"hf-{kind}", kind),
                ("plain loop, lmops auto", f"lmops-{kind}-auto", f"hf-{kind}", f"{kind}_auto")]
        refs += [("Trainer", f"lmops-{kind}", f"hf-trainer-{kind}", f"{kind}_trainer")] if args.trainer else []
        for ref_name, mine, key, tag in refs:
            if mine not in results or key not in results:
                continue
            ours, ref = results[mine], results[key]
            summary[f"{tag}_ratio"] = round(ours["tokens_per_s"] / ref["tokens_per_s"], 3)
            summary[f"{tag}_loss_delta"] = round(ours["heldout_loss"] - ref["heldout_loss"], 4)
            per_round = [a / b for a, b in zip(ours["tokens_per_s_runs"], ref["tokens_per_s_runs"], strict=True)]
            # each round's pair ran back to back: its ratio sees the same host speed, medians of either side do not
            summary[f"{tag}_ratio_paired"] = round(float(np.median(per_round)), 3)
            print(f"{kind} vs {ref_name}: lmops/reference tokens/s {summary[f'{tag}_ratio']:.2f}x (medians; rounds "
                  f"{min(per_round):.2f}-{max(per_round):.2f}x, their median {summary[f'{tag}_ratio_paired']:.2f}x), "
                  f"held-out loss lmops - reference {summary[f'{tag}_loss_delta']:+.4f} (target <= 0); peak RSS "
                  f"{ours['peak_rss_mb']:.0f} vs {ref['peak_rss_mb']:.0f} MB (training {ours['train_peak_rss_mb']:.0f}"
                  f" vs {ref['train_peak_rss_mb']:.0f}); MFU {ours['mfu_fp32_peak']:.1%} vs {ref['mfu_fp32_peak']:.1%}"
                  f" of {peak:.0f} GFLOP/s fp32")
    if args.json:
        print(json.dumps(with_cpu(summary)))


if __name__ == "__main__":
    main()
