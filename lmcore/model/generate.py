"""Sampling from a model with its KV cache: greedy, temperature, top-k, top-p, seeded, streaming.

The prompt is prefilled in one forward pass; each new token then costs one decode step
(``lmcore.model.decode.step``, eager or compiled) over the preallocated cache. Seeds drive a
local ``torch.Generator`` per sequence, so generation never touches global RNG state, the same
seed gives the same text, and a request the server batches with others samples exactly as it
would alone
(``lmcore.serve.engine`` decodes with the same step and :func:`pick_next`).

Speed notes (CPU): a decode step is a few hundred tiny ops, so per-op overhead rules.
For small models intra-op threads cost more than they give (and collapse when the CPU is
shared: 2 threads were 8-13x slower than 1 on a busy 2-core box), while a larger model's
matrix-vector products may gain from them, depending on the CPU. So :func:`decode_threads`
uses the count :func:`lmcore.probe.decode_probe` measured faster for the model's shape on this
machine, and for the compiled step the count its own recorded times favour
(:func:`lmcore.probe.compiled_step_threads`); ``LMOPS_DECODE_THREADS`` overrides (0 = always leave
torch's setting). Greedy picks
skip the full softmax's extra ops.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lmcore.data.tokenizer import Tokenizer
from lmcore.model.decode import DECODER_SLOTS, Decoder, use_int8_kernels
from lmcore.model.transformer import Transformer
from lmcore.probe import compiled_step_threads, decode_probe, record_compiled_step

# Smaller temperatures sample as this one: logits divided by less overflow float32 to inf (NaN probabilities,
# which would stop the server's decode loop), and at this one sampling is already the argmax but for exact ties.
MIN_TEMPERATURE = 1e-6
STEPS_TIMED = 24  # compiled steps timed per generation, for the thread choice


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop_at_eos: bool = True


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


@contextmanager
def decode_threads(device: torch.device | str = "cpu", cfg=None, compiled: bool = False,
                   int8: bool = False) -> Iterator[None]:
    """Run CPU decoding of a model (``cfg``: its ``ModelConfig``) on the thread count its probe chose
    (``compiled``: a batch-1 compiled step, :func:`lmcore.probe.compiled_step_threads`; ``int8``: one
    that reads int8 weights).

    Reference-counted, so overlapping generations in several threads restore the original
    setting only when the last one leaves; the first one decides (at the process's own count).
    """
    global _threads_users, _threads_saved
    if torch.device(device).type != "cpu":
        yield
        return
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            want = wanted_decode_threads(cfg, compiled, int8)
            if want > 0 and want != _threads_saved:
                torch.set_num_threads(want)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0 and torch.get_num_threads() != _threads_saved:
                torch.set_num_threads(_threads_saved)


def process_threads() -> int:
    """torch's thread count as the process set it, also while :func:`decode_threads` has changed it."""
    with _threads_lock:
        return _threads_saved if _threads_users else torch.get_num_threads()


def wanted_decode_threads(cfg, compiled: bool = False, int8: bool = False) -> int:
    """``LMOPS_DECODE_THREADS``, else the probe's pick for ``cfg``; 0 = leave torch's setting."""
    env = os.environ.get("LMOPS_DECODE_THREADS", "")
    if env.strip():
        return int(env)
    if cfg is None:
        return 0
    if compiled:
        return compiled_step_threads(cfg, torch.get_num_threads(), int8=int8)

    return decode_probe(cfg).decode_threads


def pick_next(
    logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator | None | list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) -> next ids (B,) and their probabilities (B,) under the sampling distribution.

    ``gen``: one generator for every row, or a list with each row's own (None: the global RNG). Each
    row draws one uniform number from its generator and takes the token where the cumulative
    probability passes it (inverse CDF), so rows sampled alike are one batched pick whatever their
    seeds, and a row's token depends only on its logits and its generator: the server's batch gives
    a seeded request the text it gets alone.
    """
    logits = logits.float()
    if sp.temperature <= 0:  # greedy: the max of the softmax is the softmax of the max
        probs, ids = torch.softmax(logits, dim=-1).max(dim=-1)
        return ids, probs
    logits = logits / max(sp.temperature, MIN_TEMPERATURE)
    if sp.top_k and sp.top_k < logits.size(-1):
        kth = torch.topk(logits, sp.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > sp.top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    cdf = probs.cumsum(dim=-1)
    u = _uniforms(gen, probs.size(0), probs.device) * cdf[:, -1:]  # (B, 1), below each row's total mass
    # right=True: the first token whose cumulative mass exceeds u, so a zero-probability token is never
    # picked; where rounding puts u at the total, the last token that has mass
    last = probs.size(-1) - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1, keepdim=True)  # (B, 1)
    ids = torch.minimum(torch.searchsorted(cdf, u, right=True), last)[:, 0]
    return ids, probs.gather(-1, ids[:, None])[:, 0]


def _uniforms(gen: torch.Generator | None | list[torch.Generator | None], rows: int,
              device: torch.device) -> torch.Tensor:
    """(rows, 1) uniform numbers in [0, 1): one draw per row from its own generator, or one call for all."""
    if not isinstance(gen, list):
        return torch.rand(rows, 1, generator=gen, device=device)
    return torch.stack([torch.rand(1, generator=g, device=device) for g in gen])


def _generator(sp: SamplingParams, device: torch.device) -> torch.Generator | None:
    if sp.seed is None or sp.temperature <= 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(sp.seed)
    return gen


def _prompt(model: Transformer, prompt_ids: list[int], eos_id: int | None) -> list[int]:
    """The last block_size prompt tokens; an empty prompt starts from EOS (the document separator)."""
    return list(prompt_ids[-model.cfg.block_size :]) or [eos_id if eos_id is not None else 0]


@torch.inference_mode()
def generate_tokens(
    model: Transformer, prompt_ids: list[int], sp: SamplingParams, eos_id: int | None = None,
    compiled: bool = False,
) -> Iterator[tuple[int, float]]:
    """Yield (token id, probability) for each new token of one sequence.

    Generation may run past ``block_size``: the cache is sized for prompt + new tokens and the
    RoPE table grows as needed. Decodes with a one-slot :class:`lmcore.model.decode.Decoder`, the step the
    server's engine runs too; ``compiled`` uses its compiled step (same tokens, 2-3x faster per token
    on a CPU; the first call for a model shape compiles for 20-30 s, later processes load the result
    from the lmops home).
    """
    if sp.max_new_tokens <= 0:
        return
    device = model.embed.weight.device
    gen = _generator(sp, device)
    ids = _prompt(model, prompt_ids, eos_id)
    stop = eos_id if (sp.stop_at_eos and eos_id is not None) else None
    size = len(ids) + sp.max_new_tokens
    if compiled:  # one compiled step serves every cache of the same rounded length
        size = -(-size // DECODER_SLOTS) * DECODER_SLOTS
    timed = compiled and device.type == "cpu"  # its times decide its thread count (compiled_step_threads)
    int8 = timed and use_int8_kernels(model)  # an int8 step's times are kept apart from the float one's
    many = process_threads()
    with decode_threads(device, model.cfg, timed, int8):
        dec = Decoder(model, size, compiled=compiled)  # a fresh one per sequence: its cache is a few MB
        logits = dec.prefill(ids)  # (1, V)
        times: list[float] = []
        for i in range(sp.max_new_tokens):
            nxt, prob = pick_next(logits, sp, gen)
            token = int(nxt)
            if token == stop:
                return
            yield token, float(prob)
            if i + 1 < sp.max_new_tokens:
                t0 = time.perf_counter()
                logits = dec.step(nxt)  # (1,) -> (1, V)
                if timed and len(times) < STEPS_TIMED:
                    times.append(time.perf_counter() - t0)
                    if len(times) == STEPS_TIMED:  # the median past the first few (caches, page faults)
                        record_compiled_step(model.cfg, torch.get_num_threads(), many,
                                             statistics.median(times[4:]) * 1e3, int8=int8)


def stream_text(model: Transformer, tokenizer: Tokenizer, prompt: str, sp: SamplingParams,
                compiled: bool = False) -> Iterator[str]:
    """Text pieces as they are generated (never splits a UTF-8 character)."""
    ids = (tok for tok, _ in generate_tokens(model, tokenizer.encode(prompt), sp, tokenizer.eos_id, compiled))
    yield from tokenizer.decode_stream(ids)


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: str, sp: SamplingParams,
                  compiled: bool = False) -> str:
    ids = [tok for tok, _ in generate_tokens(model, tokenizer.encode(prompt), sp, tokenizer.eos_id, compiled)]
    return tokenizer.decode(ids)
