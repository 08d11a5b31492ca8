"""Sampling from a model with its KV cache: greedy, temperature, top-k, top-p, seeded, streaming.

The prompt is prefilled in one forward pass; each new token then costs one single-token
forward pass over the cache. Seeds drive a local ``torch.Generator``, so generation never
touches global RNG state and the same seed gives the same text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmcore.model import Transformer
from lmcore.tokenizer import Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop_at_eos: bool = True


def pick_next(
    logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> next ids (B,) and their probabilities (B,) under the sampling distribution."""
    logits = logits.float()
    if sp.temperature <= 0:
        probs = torch.softmax(logits, dim=-1)
        ids = logits.argmax(dim=-1)
        return ids, probs.gather(-1, ids[:, None])[:, 0]
    logits = logits / sp.temperature
    if sp.top_k and sp.top_k < logits.size(-1):
        kth = torch.topk(logits, sp.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > sp.top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    ids = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return ids, probs.gather(-1, ids[:, None])[:, 0]


@torch.inference_mode()
def generate_tokens(
    model: Transformer, prompt_ids: list[int], sp: SamplingParams, eos_id: int | None = None
) -> Iterator[tuple[int, float]]:
    """Yield (token id, probability) for each new token of one sequence."""
    device = model.embed.weight.device
    gen = None
    if sp.seed is not None and sp.temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(sp.seed)
    ids = prompt_ids[-model.cfg.block_size :] or ([eos_id] if eos_id is not None else [0])
    cache = model.new_cache(1, len(ids) + sp.max_new_tokens)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(sp.max_new_tokens):
        logits, _ = model(x, cache=cache, last_only=True)  # (1, 1, V)
        nxt, prob = pick_next(logits[:, -1, :], sp, gen)
        token = int(nxt.item())
        if sp.stop_at_eos and eos_id is not None and token == eos_id:
            return
        yield token, float(prob.item())
        x = nxt.view(1, 1)


def stream_text(model: Transformer, tokenizer: Tokenizer, prompt: str, sp: SamplingParams) -> Iterator[str]:
    """Text pieces as they are generated (never splits a UTF-8 character)."""
    ids = (tok for tok, _ in generate_tokens(model, tokenizer.encode(prompt), sp, tokenizer.eos_id))
    yield from tokenizer.decode_stream(ids)


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, sp: SamplingParams) -> str:
    ids = [tok for tok, _ in generate_tokens(model, tokenizer.encode(prompt), sp, tokenizer.eos_id)]
    return tokenizer.decode(ids)
