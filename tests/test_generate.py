"""Generation: seeds, greedy, top-k/top-p, EOS, past block_size, batches, threads, streaming."""

from __future__ import annotations

import pytest
import torch
from _lm_helpers import sharp_model

from lmcore.generate import (
    BatchDecoder,
    SamplingParams,
    decode_threads,
    generate_batch,
    generate_text,
    generate_tokens,
    pick_next,
    stream_text,
)
from lmcore.model import ModelConfig, Transformer
from lmcore.tokenizer import Tokenizer

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


def test_batch_rows_equal_single_rows(model):
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12], [4, 4], []]
    single = [list(generate_tokens(model, p, GREEDY, eos_id=0)) for p in prompts]
    batch = generate_batch(model, prompts, GREEDY, eos_id=0)
    assert [ids(b) for b in batch] == [ids(s) for s in single]
    for b, s in zip(batch, single, strict=True):
        assert [p for _, p in b] == pytest.approx([p for _, p in s], abs=1e-5)
    sampled = SamplingParams(max_new_tokens=30, temperature=1.2, top_k=20, seed=9)
    assert [ids(b) for b in generate_batch(model, prompts[:3], sampled)] == [
        ids(generate_tokens(model, p, sampled)) for p in prompts[:3]
    ]


def test_batch_decoder_mixed_params_and_eos(model):
    prompts = [[1, 2, 3], [9, 9, 9, 9]]
    greedy0 = ids(generate_tokens(model, prompts[0], GREEDY))
    eos = greedy0[3]
    sps = [GREEDY, SamplingParams(max_new_tokens=7, temperature=0.9, seed=1)]
    dec = BatchDecoder(model, prompts, sps, eos_id=eos)
    steps = 0
    while not dec.done:
        emitted = dec.step()
        assert all(0 <= row < 2 for row, _, _ in emitted)
        steps += 1
    assert ids(dec.outputs[0]) == greedy0[: greedy0.index(eos)]
    assert ids(dec.outputs[1]) == ids(generate_tokens(model, prompts[1], sps[1], eos_id=eos))
    assert steps <= 7
    assert generate_batch(model, [], GREEDY) == []


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
