"""Tiny corpora and params shared by the prepare/train/evaluate/CLI tests (fast on 2 CPU cores)."""

from __future__ import annotations

import random
from pathlib import Path

from lmcore.config import load_params

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the", "model", "learns", "text", "from", "data", "and", "serves", "users", "who", "give", "feedback",
         "def", "return", "class", "import", "value", "loop", "train", "token")

TINY = {
    "model.n_layer": 2, "model.n_head": 2, "model.n_kv_head": 2, "model.d_model": 32, "model.block_size": 32,
    "tokenizer.kind": "byte", "train.batch_size": 8, "train.max_steps": 40, "train.max_minutes": 0,
    "train.warmup_steps": 5, "train.eval_interval": 20, "train.eval_iters": 2, "train.checkpoint_interval": 20,
    "train.log_interval": 5, "train.lr": 1e-2, "train.min_lr": 1e-3, "eval.max_batches": 4, "eval.batch_size": 8,
    "eval.n_samples": 2, "eval.sample_max_new_tokens": 8,
    "train.threads": 1,  # pinned: tests compare runs bit for bit, and the ThreadTuner follows the load
}


def tiny_params(**overrides):
    """Real params.yaml with a tiny model; keyword names use '__' for '.' (train__lr=1e-3)."""
    sets = dict(TINY)
    sets.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_params(ROOT / "params.yaml", sets)


def write_corpus(folder: Path, n_files: int = 6, paragraphs: int = 40, seed: int = 0) -> Path:
    """A folder of small patterned text files (learnable in a few dozen steps)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(paragraphs)]
        (folder / f"doc{i}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return folder


def sharp_model(cfg):
    """A seeded random Transformer in eval mode with embeddings scaled up 8x: sharper distributions than
    the 0.02 init, so greedy and sampling choices actually depend on the logits."""
    import torch

    from lmcore.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.embed.weight.mul_(8)
    return model
