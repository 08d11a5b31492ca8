"""Direct preference optimisation (DPO) after SFT: learn from (prompt, chosen, rejected) pairs.

Why DPO: a correction says which of two answers a user wanted, not only what to imitate; DPO
turns that into a loss without a reward model. The reference model's log-probabilities are
computed once, before training (:func:`reference_logps`), so no second model sits in memory
while the policy trains: only two numbers per pair.

Harvested pairs are tokenized as they were served (:meth:`lmcore.data.tokenizer.Tokenizer.encode_served`:
the prompt exactly as the model saw it, already through its chat template when it chats, then each
completion and the template's end of turn); a pair whose prompt is a list of messages is tokenized
as a chat, the way TRL tokenizes conversational pairs. The loss is TRL's ``sigmoid`` DPO loss
(tests/test_dpo.py checks it against ``trl.DPOTrainer`` on the same batch and weights). LoRA
(``dpo.lora_r``) goes through peft as in SFT and is merged on save.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmcore.data.tokenizer import Tokenizer
from lmcore.errors import LmopsError
from lmcore.machine import keep_freed_memory
from lmcore.model.checkpoint import load_model, save_model
from lmcore.training.lora import add_lora, has_lora, merge_lora


@dataclass(frozen=True)
class PairBatch:
    """Token ids of 2N rows, the N chosen rows first then the N rejected, right-padded; ``targets``
    (2N, T-1) is 1 where a next token belongs to the completion (what the log-probabilities sum over)."""

    ids: torch.Tensor
    targets: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.ids.shape[0] // 2

    def rows(self, idx: torch.Tensor) -> PairBatch:
        """The pairs ``idx`` (chosen rows, then their rejected rows)."""
        r = torch.cat([idx, idx + self.pairs])
        return PairBatch(self.ids[r], self.targets[r])


def pair_messages(prompt: str | list[dict], completion: str) -> list[dict]:
    """A pair's prompt (text, or chat messages) answered by one completion, as chat messages."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [*msgs, {"role": "assistant", "content": completion}]


def encode_completions(tokenizer: Tokenizer, items: list[tuple], max_len: int, served: bool = False) -> PairBatch:
    """(prompt, completion) rows as right-padded ids plus the completion targets (rows cut to ``max_len``).

    ``served``: text prompts are taken as served (harvested), not as a user turn to template."""
    if not items:
        raise LmopsError("no completions to encode")
    rows = []
    for prompt, completion in items:
        ids, mask = (tokenizer.encode_served(prompt, completion) if served and isinstance(prompt, str)
                     else tokenizer.encode_chat(pair_messages(prompt, completion)))
        rows.append((ids[:max_len], mask[:max_len]))
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), tokenizer.eos_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.float32)
    for i, (r, m) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    if not bool((mask[:, 1:].sum(dim=1) > 0).all()):
        raise LmopsError(f"a completion has no token within {max_len} tokens (dpo.max_len)")
    return PairBatch(ids, mask[:, 1:])


def encode_pairs(tokenizer: Tokenizer, pairs: list[dict], max_len: int) -> PairBatch:
    """``pairs`` of {prompt (as served), chosen, rejected} as a :class:`PairBatch`: the chosen rows, then the
    rejected."""
    if not pairs:
        raise LmopsError("no preference pairs to encode")
    return encode_completions(tokenizer, [(p["prompt"], p[k]) for k in ("chosen", "rejected") for p in pairs],
                              max_len, served=True)


def sequence_logps(model: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
    """Summed log-probability of each row's completion tokens, (2N,)."""
    logits, _ = model(batch.ids[:, :-1])  # (2N, T-1, V)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.ids[:, 1:, None]).squeeze(-1)
    return (logp * batch.targets).sum(dim=1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``sigmoid`` DPO loss over rows [chosen..., rejected...]; (mean loss, per-pair reward margins)."""
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    margin = beta * ((pc - rc) - (pr - rr))
    return -F.logsigmoid(margin).mean(), margin.detach()


@torch.no_grad()
def reference_logps(model: torch.nn.Module, batch: PairBatch, chunk: int = 8) -> torch.Tensor:
    """The reference log-probabilities of every row, once, before training: (2N,)."""
    was = model.training
    model.eval()
    out = torch.cat([sequence_logps(model, PairBatch(batch.ids[i : i + chunk], batch.targets[i : i + chunk]))
                     for i in range(0, batch.ids.shape[0], chunk)])
    model.train(was)
    return out


def per_token_logps(model: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
    """Mean log-probability per completion token of each row (length-fair), without gradients."""
    return reference_logps(model, batch) / batch.targets.sum(dim=1)


def preference_scores(model: torch.nn.Module, tokenizer: Tokenizer, pairs: list[dict], max_len: int = 512) -> dict:
    """How much ``model`` prefers each chosen completion: the share of pairs where its mean per-token
    log-probability beats the rejected one's (length-fair: corrections and served texts differ in
    length), and the mean margin in nats per token."""
    c, r = per_token_logps(model, encode_pairs(tokenizer, pairs, max_len)).chunk(2)
    return {"preference_accuracy": float((c > r).float().mean()), "preference_margin": float((c - r).mean()),
            "pairs": len(pairs)}


def completion_loglik(model: torch.nn.Module, tokenizer: Tokenizer, items: list[tuple], max_len: int = 512) -> float:
    """Mean per-token log-likelihood of reference completions after their prompts (the gate's golden set)."""
    return float(per_token_logps(model, encode_completions(tokenizer, items, max_len)).mean())


@dataclass(frozen=True)
class DpoResult:
    model_dir: Path
    steps: int
    seconds: float
    first_loss: float
    final_loss: float
    before: dict  # preference_scores of the SFT model
    after: dict  # ... of the DPO model
    losses: tuple[float, ...] = ()  # the DPO loss of every step

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def train_dpo(model_dir: str | Path, pairs: list[dict], dp, out_dir: str | Path, meta: dict | None = None,
              seed: int = 1337) -> DpoResult:
    """DPO on ``pairs`` from the SFT model in ``model_dir`` (``dp`` = ``DpoParams``); writes ``out_dir/model``.

    The SFT model is also the reference: its log-probabilities are taken once, then it trains.
    """
    model, tokenizer, sft_meta = load_model(model_dir)
    if model.embed.weight.device.type == "cpu":
        keep_freed_memory()  # as train(): no page faults on every step's activations
    batch = encode_pairs(tokenizer, pairs, min(dp.max_len, model.cfg.block_size + 1))
    before = preference_scores(model, tokenizer, pairs, dp.max_len)
    ref = reference_logps(model, batch)
    torch.manual_seed(seed)
    if dp.lora_r:
        model = add_lora(model, dp)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=dp.lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(dp.max_steps):
        opt.param_groups[0]["lr"] = dp.lr * min(1.0, (step + 1) / max(dp.warmup_steps, 1))
        idx = torch.from_numpy(rng.choice(batch.pairs, size=min(dp.batch_size, batch.pairs), replace=False))
        rows = batch.rows(idx)
        loss, _ = dpo_loss(sequence_logps(model, rows), torch.cat([ref[idx], ref[idx + batch.pairs]]), dp.beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise LmopsError(f"DPO loss is {losses[-1]} at step {step}: lower dpo.lr")
    if has_lora(model):
        merge_lora(model)
    model.eval()
    after = preference_scores(model, tokenizer, pairs, dp.max_len)
    info = {"steps": dp.max_steps, "beta": dp.beta, "lr": dp.lr, "pairs": len(pairs), "lora_r": dp.lora_r,
            "first_loss": losses[0], "final_loss": losses[-1], "sft_model": str(Path(model_dir).resolve())}
    folder = save_model(Path(out_dir) / "model", model, tokenizer,
                        {**{k: v for k, v in sft_meta.items() if k != "model"}, **(meta or {}), "dpo": info})
    return DpoResult(model_dir=folder, steps=dp.max_steps, seconds=round(time.perf_counter() - t0, 3),
                     first_loss=losses[0], final_loss=losses[-1], before=before, after=after, losses=tuple(losses))
