"""Tiny-Shakespeare, character level, fixed wall-clock budget: lmops vs nanoGPT's CPU recipe.

Both sides train for the same ``--seconds`` on the first 90% of the file (byte-level = character
level: the file is ASCII) and are scored on the *whole* last 10% in contiguous, non-overlapping
windows of their block size, so ``val_bits_per_char`` is exact, not sampled. The reference is a
faithful copy of nanoGPT's GPT (LayerNorm, GELU MLP, learned positions, tied head) with its CPU
recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, AdamW lr 1e-3 -> 1e-4 cosine over 2000
iters, warmup 100, beta2 0.99). The lmops side is the real ``lmcore.training.loop.train`` on a
Llama-style model; its defaults below are the settings that won on this 2-core machine.

    python bench/shakespeare.py --json                     # both, 100 s each
    python bench/shakespeare.py --seconds 30 --no-reference -S train.optimizer=adamw
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_header, with_cpu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# The winning lmops settings (see the report in the module's issue note for what each bought).
WINNER = {
    "tokenizer.kind": "byte",
    "model.n_layer": 4, "model.n_head": 4, "model.n_kv_head": 4, "model.d_model": 128,
    "model.block_size": 128, "model.tie_embeddings": False,
    "train.optimizer": "muon", "train.muon_lr": 0.01, "train.muon_momentum": 0.95,
    "train.lr": 1e-2, "train.min_lr": 0.0, "train.warmup_steps": 50, "train.lr_schedule": "wsd",
    "train.cooldown_frac": 0.6, "train.beta1": 0.9, "train.beta2": 0.95, "train.weight_decay": 0.0,
    "train.grad_clip": 1.0, "train.batch_size": 8, "train.zero_init_residual": True,
    "train.max_steps": 1_000_000, "train.eval_interval": 0, "train.checkpoint_interval": 0,
    "train.log_interval": 50, "train.device": "cpu", "train.dtype": "float32", "train.seed": 1337,
}


def _split_text() -> tuple[str, str]:
    if not CORPUS.is_file():
        sys.exit(f"error: corpus not found: {CORPUS}")
    text = CORPUS.read_text(encoding="utf-8")
    n = int(0.9 * len(text))
    return text[:n], text[n:]


def run_lmops(seconds: float, sets: dict, work: Path, steps: int = 0) -> dict:
    import torch

    from lmcore.config import load_params
    from lmcore.data.prepare import prepare_split_texts, token_byte_lengths
    from lmcore.data.tokenizer import Tokenizer
    from lmcore.training.evaluate import score_tokens
    from lmcore.training.loop import train

    overrides = {**WINNER, **sets, "train.max_minutes": seconds / 60.0}
    if steps:  # research mode: a step budget (schedule follows steps), no wall-clock limit
        overrides.update({"train.max_steps": steps, "train.max_minutes": 0})
    p = load_params(REPO / "params.yaml", overrides)
    train_text, val_text = _split_text()
    data = prepare_split_texts([train_text], [val_text], work / "data", p.tokenizer)
    holder: dict = {}
    r = train(data.dir, work / "run", p.model, p.train, progress=False, on_model=lambda m: holder.update(m=m))
    net = holder["m"].eval()
    tok = Tokenizer.load(data.dir / "tokenizer.json")
    ids = data.tokens("val")[:-1]  # drop the trailing EOS: score the text itself
    t0 = time.perf_counter()
    s = score_tokens(net, ids, token_byte_lengths(tok), p.model.block_size, 64, 0, torch.device("cpu"))
    return {
        "val_bits_per_char": s["nats"] / math.log(2) / s["bytes"],
        "val_loss_nats": s["nats"] / s["tokens"],
        "val_chars_scored": s["bytes"],
        "steps": r.steps, "seconds": r.seconds, "eval_seconds": round(time.perf_counter() - t0, 2),
        "final_train_loss": r.final_train_loss, "stopped_by": r.stopped_by,
        "tokens_per_s": round(r.tokens / max(r.seconds, 1e-9)),
        "config": {k: v for k, v in overrides.items() if k.split(".")[0] in ("model", "train", "tokenizer")},
    }


def run_reference(seconds: float) -> dict:
    """nanoGPT's model and CPU recipe (character vocab of the train text), same budget, same scoring."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    train_text, val_text = _split_text()
    chars = sorted(set(train_text + val_text))
    stoi = {c: i for i, c in enumerate(chars)}
    tr = torch.tensor([stoi[c] for c in train_text], dtype=torch.long)
    va = torch.tensor([stoi[c] for c in val_text], dtype=torch.long)
    V, L, H, C, T, B = len(chars), 4, 4, 128, 64, 12
    max_iters, warmup, lr, min_lr = 2000, 100, 1e-3, 1e-4

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (z.view(b, t, H, C // H).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, C)
            x = x + self.c_proj(y)
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)
            self.lm_head = nn.Linear(C, V, bias=False)
            self.wte.weight = self.lm_head.weight
            for m in self.modules():
                if isinstance(m, nn.Linear | nn.Embedding):
                    nn.init.normal_(m.weight, 0.0, 0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            for n, p in self.named_parameters():
                if n.endswith("c_proj.weight") or n.endswith("mlp.2.weight"):
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * L))

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for blk in self.h:
                x = blk(x)
            return self.lm_head(self.ln_f(x))  # (B, T, V)

    torch.manual_seed(1337)
    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(1337)
    t0, it = time.perf_counter(), 0
    while it < max_iters and time.perf_counter() - t0 < seconds:
        ratio = (it - warmup) / (max_iters - warmup)
        cur = lr * (it + 1) / (warmup + 1) if it < warmup else min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (
            lr - min_lr)
        for grp in opt.param_groups:
            grp["lr"] = cur
        ix = torch.randint(len(tr) - T, (B,), generator=g)
        x = torch.stack([tr[i : i + T] for i in ix])
        y = torch.stack([tr[i + 1 : i + 1 + T] for i in ix])
        loss = F.cross_entropy(model(x).view(-1, V), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        it += 1
    seconds_used = time.perf_counter() - t0
    model.eval()
    nats, count = 0.0, 0
    with torch.no_grad():
        n_win = math.ceil((len(va) - 1) / T)
        for w0 in range(0, n_win, 64):
            for w in range(w0, min(w0 + 64, n_win)):  # one window at a time keeps the tail simple
                seg = va[w * T : min((w + 1) * T + 1, len(va))]
                logits = model(seg[None, :-1])
                nats += float(F.cross_entropy(logits[0], seg[1:], reduction="sum"))
                count += len(seg) - 1
    return {"val_bits_per_char": nats / math.log(2) / count, "val_loss_nats": nats / count, "steps": it,
            "seconds": round(seconds_used, 2), "config": "nanoGPT shakespeare_char CPU recipe (4L/4H/128, block 64, "
            "batch 12, AdamW 1e-3 cosine/2000, warmup 100, beta2 0.99, dropout 0)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=100.0, help="wall-clock training budget per side")
    ap.add_argument("--steps", type=int, default=0, help="research mode: lmops trains for N steps, no time limit")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-reference", action="store_true", help="skip the nanoGPT side")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[], help="override, e.g. -S train.lr=3e-3")
    ap.add_argument("--json", action="store_true", help="last line = one JSON object")
    args = ap.parse_args()

    import torch

    from lmcore.config import parse_override
    from lmcore.settings import apply_environment

    apply_environment()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_header()
    sets = dict(parse_override(s) for s in args.sets)
    with tempfile.TemporaryDirectory(prefix="lmops-bench-") as tmp:
        ours = run_lmops(args.seconds, sets, Path(tmp), args.steps)
    print(f"lmops:     {ours['val_bits_per_char']:.4f} bits/char ({ours['val_loss_nats']:.4f} nats) "
          f"after {ours['steps']} steps in {ours['seconds']:.1f}s", flush=True)
    out = {"benchmark": "shakespeare_char", "budget_seconds": args.seconds, "threads": torch.get_num_threads(),
           "val_bits_per_char": round(ours["val_bits_per_char"], 4), "seconds": ours["seconds"],
           "scored_on": "whole val split (last 10%, contiguous windows)", "lmops": ours}
    if not args.no_reference:
        ref = run_reference(args.seconds)
        print(f"reference: {ref['val_bits_per_char']:.4f} bits/char ({ref['val_loss_nats']:.4f} nats) "
              f"after {ref['steps']} steps in {ref['seconds']:.1f}s", flush=True)
        out["reference"] = ref
        out["ratio_bits_per_char"] = round(ours["val_bits_per_char"] / ref["val_bits_per_char"], 4)
        print(f"ratio lmops/reference bits per char: {out['ratio_bits_per_char']:.3f} (lower is better)")
    if args.json:
        print(json.dumps(with_cpu(out)))


if __name__ == "__main__":
    main()
