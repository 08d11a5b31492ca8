"""Generation: seeds, greedy, top-k/top-p, EOS, past block_size, batched rows, threads, streaming."""

from __future__ import annotations

import pytest
import torch
from _lm_helpers import sharp_model

from lmcore.data.tokenizer import Tokenizer
from lmcore.model.decode import Decoder
from lmcore.model.generate import (
    SamplingParams,
    _generator,
    decode_threads,
    generate_text,
    generate_tokens,
    pick_next,
    stream_text,
)
from lmcore.model.transformer import ModelConfig, Transformer

pytestmark = pytest.mark.model

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return sharp_model(ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=16))


def ids(out: list[tuple[int, float]]) -> list[int]:
    return [t for t, _ in out]


def test_greedy_is_argmax_of_full_forward(model):
    prompt = [3, 1, 4, 1, 5]
    out = list(generate_tokens(model, prompt, GREEDY))
    seq = list(prompt)
    with torch.no_grad():
        for token, prob in out[:10]:  # full forward, no cache, each step (stays within block_size)
            logits, _ = model(torch.tensor([seq]))
            probs = torch.softmax(logits[0, -1], dim=-1)
            assert token == int(probs.argmax())
            assert prob == pytest.approx(float(probs.max()), abs=1e-5)
            seq.append(token)
    assert len(out) == GREEDY.max_new_tokens


def test_top_k_1_is_greedy_and_seed_is_deterministic(model):
    prompt = [7, 8, 9]
    greedy = ids(generate_tokens(model, prompt, GREEDY))
    topk1 = ids(generate_tokens(model, prompt, SamplingParams(max_new_tokens=24, temperature=1.3, top_k=1, seed=5)))
    assert topk1 == greedy
    sp = SamplingParams(max_new_tokens=40, temperature=3.0, top_p=0.98, seed=123)
    a, b = ids(generate_tokens(model, prompt, sp)), ids(generate_tokens(model, prompt, sp))
    c = ids(generate_tokens(model, prompt, SamplingParams(max_new_tokens=40, temperature=3.0, top_p=0.98, seed=124)))
    assert a == b
    assert a != c  # another seed, another sample (40 tokens at T=3: a collision is essentially impossible)
    state = torch.random.get_rng_state()
    list(generate_tokens(model, prompt, sp))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is never touched


def test_pick_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    gen = torch.Generator().manual_seed(0)
    picked = {int(pick_next(logits, SamplingParams(temperature=1.0, top_k=2), gen)[0]) for _ in range(200)}
    assert picked == {2, 3}
    # top_p keeps the smallest head whose mass reaches p: softmax = .03 .09 .24 .64 -> p=0.7 keeps {3, 2}
    picked = {int(pick_next(logits, SamplingParams(temperature=1.0, top_p=0.7), gen)[0]) for _ in range(200)}
    assert picked == {2, 3}
    ids_, probs = pick_next(logits, SamplingParams(temperature=0.0), None)
    assert int(ids_) == 3 and float(probs) == pytest.approx(float(torch.softmax(logits, -1)[0, 3]))


def test_a_draw_at_the_total_mass_never_picks_a_token_without_mass(monkeypatch):
    """Inverse-CDF sampling: where rounding puts the uniform draw at the row's total mass, the pick is
    the last token that has mass, not a top-k-filtered one after it."""
    from lmcore.model import generate

    monkeypatch.setattr(generate, "_uniforms", lambda gen, rows, device: torch.ones(rows, 1))
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    ids_, probs = pick_next(logits, SamplingParams(temperature=1.0, top_k=2), None)
    assert ids_.tolist() == [1, 3] and bool((probs > 0).all())

def test_eos_stops_and_is_not_emitted(model):
    prompt = [1, 2, 3]
    greedy = ids(generate_tokens(model, prompt, GREEDY))
    eos = greedy[5]
    first = greedy.index(eos)
    assert ids(generate_tokens(model, prompt, GREEDY, eos_id=eos)) == greedy[:first]
    keep_going = SamplingParams(max_new_tokens=24, temperature=0.0, stop_at_eos=False)
    assert ids(generate_tokens(model, prompt, keep_going, eos_id=eos)) == greedy


def test_generation_past_block_size(model):
    sp = SamplingParams(max_new_tokens=5 * model.cfg.block_size, temperature=0.0)
    out = list(generate_tokens(model, list(range(40)), sp))  # prompt longer than block_size too
    assert len(out) == sp.max_new_tokens
    assert all(0 <= t < model.cfg.vocab_size and 0.0 < p <= 1.0 for t, p in out)


def batched(model: Transformer, prompts: list[list[int]], sps: list[SamplingParams], eos_id: int | None = None,
            slots: int = 2) -> list[list[tuple[int, float]]]:
    """What the server's engine does, in a few lines: rows share one decoder of ``slots`` slots, each with
    its own sampling params and generator; a finished row's slot takes the last row, a waiting prompt
    takes the freed slot. Returns (token, probability) lists, one per prompt."""
    dec = Decoder(model, model.cfg.block_size + max(sp.max_new_tokens for sp in sps), slots=slots)
    outs: list[list[tuple[int, float]]] = [[] for _ in prompts]
    gens = [_generator(sp, torch.device("cpu")) for sp in sps]
    waiting, active = list(range(len(prompts))), []  # active[s]: the prompt in slot s

    def accept(r: int, logits: torch.Tensor) -> bool:  # logits (1, V) -> whether row r goes on
        tok, prob = pick_next(logits, sps[r], gens[r])
        if sps[r].stop_at_eos and int(tok) == eos_id:
            return False
        outs[r].append((int(tok), float(prob)))
        return len(outs[r]) < sps[r].max_new_tokens

    with torch.inference_mode():
        while waiting or active:
            while waiting and len(active) < slots:
                r = waiting.pop(0)
                active.append(r)
                if not accept(r, dec.prefill(prompts[r] or [eos_id or 0], slot=len(active) - 1)):
                    active.pop()
            if not active:
                continue
            logits = dec.step(torch.tensor([outs[r][-1][0] for r in active]))  # (B, V)
            going = [accept(r, logits[s : s + 1]) for s, r in enumerate(list(active))]
            for s in reversed(range(len(going))):  # free finished slots, last first
                if not going[s]:
                    last = len(active) - 1
                    if s != last:
                        dec.move(last, s)
                    active[s] = active[last]
                    active.pop()
    return outs


def test_batched_rows_equal_single_rows(model):
    """One step for rows of different lengths, parameters and ends gives each row its single-sequence tokens."""
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12], [4, 4], []]
    single = [list(generate_tokens(model, p, GREEDY, eos_id=0)) for p in prompts]
    batch = batched(model, prompts, [GREEDY] * len(prompts), eos_id=0, slots=3)
    assert [ids(b) for b in batch] == [ids(s) for s in single]
    for b, s in zip(batch, single, strict=True):
        assert [p for _, p in b] == pytest.approx([p for _, p in s], abs=1e-5)
    greedy0 = ids(single[0])
    eos = greedy0[3]
    sps = [GREEDY, SamplingParams(max_new_tokens=7, temperature=0.9, seed=1),
           SamplingParams(max_new_tokens=30, temperature=1.2, top_k=20, seed=9),
           SamplingParams(max_new_tokens=3, seed=4)]
    got = batched(model, prompts[:4], sps, eos_id=eos, slots=2)
    assert ids(got[0]) == greedy0[: greedy0.index(eos)]
    assert [ids(g) for g in got] == [ids(generate_tokens(model, p, sp, eos_id=eos)) for p, sp in zip(
        prompts[:4], sps, strict=True)]


def test_decode_threads_restores_setting(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("LMOPS_DECODE_THREADS", "1")
    with decode_threads("cpu"):
        assert torch.get_num_threads() == 1
        with decode_threads("cpu"):  # nested / concurrent users share the setting
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("LMOPS_DECODE_THREADS", "0")
    with decode_threads("cpu"):
        assert torch.get_num_threads() == before


def test_text_and_stream_agree():
    corpus = ["the cat sat on the mat. ", "über naïve café 日本語 🙂 "] * 30
    tok = Tokenizer.train(corpus, kind="bpe", vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, d_model=32, block_size=32)
    torch.manual_seed(1)
    m = Transformer(cfg).eval()
    sp = SamplingParams(max_new_tokens=40, temperature=1.0, seed=7)
    text = generate_text(m, tok, "the cat", sp)
    pieces = list(stream_text(m, tok, "the cat", sp))
    assert "".join(pieces) == text
