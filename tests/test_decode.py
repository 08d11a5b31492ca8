"""The decode step (lmcore.model.decode), compiled and batched, against the eager model it must reproduce."""

from __future__ import annotations

import threading

import pytest
import torch
from _lm_helpers import sharp_model

from lmcore.model.decode import DECODER_SLOTS, Decoder
from lmcore.model.generate import SamplingParams, decode_threads, generate_tokens
from lmcore.model.transformer import ModelConfig, Transformer
from lmcore.optimize.quantize import quantize_model, weight_only_model

pytestmark = pytest.mark.model

# grouped-query attention (2 kv-heads for 4 heads) and a block shorter than the generations below
CFG = ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=16)
# the cache length generate_tokens rounds to: every compiled decoder here shares one compiled step (a
# compile costs 20-30 s), and the batch's single-row step is that one too
LEN = DECODER_SLOTS


@pytest.fixture(scope="module")
def model() -> Transformer:
    return sharp_model(CFG)


@pytest.fixture(autouse=True)
def _decode_threads():
    """Every test decodes on the thread count a compiled generate_tokens uses: a compiled step is built per count."""
    with decode_threads("cpu", CFG, compiled=True):
        yield


def ids(out: list[tuple[int, float]]) -> list[int]:
    return [t for t, _ in out]


@torch.inference_mode()
def eager_logits(model: Transformer, seq: list[int]) -> torch.Tensor:
    """(len(seq), V) next-token logits of one forward pass over seq: the reference for every step.

    Through a KV cache sized for seq, since a cacheless forward refuses more than block_size tokens.
    """
    return model(torch.tensor([seq]), cache=model.new_cache(1, len(seq)))[0][0]


def test_every_step_matches_a_full_forward_pass(model):
    seq = [5, 9, 2, 44, 17, 3, 3, 60, 1, 28] * 3  # 30 tokens: past block_size, so RoPE grows too
    dec = Decoder(model, LEN, compiled=True)
    with torch.inference_mode():
        got = [dec.prefill(seq[:1])]  # a one-token prompt: the shortest attended length is 2
        got += [dec.step(torch.tensor([[t]])) for t in seq[1:]]
    want = eager_logits(model, seq)
    assert torch.allclose(torch.cat(got), want, atol=1e-4), (torch.cat(got) - want).abs().max()


def test_greedy_and_seeded_sampling_give_the_eager_tokens(model):
    prompt = [7, 8, 9]
    for sp in (SamplingParams(max_new_tokens=40, temperature=0.0),
               SamplingParams(max_new_tokens=40, temperature=1.0, top_k=20, top_p=0.9, seed=11)):
        eager = list(generate_tokens(model, prompt, sp))
        compiled = list(generate_tokens(model, prompt, sp, compiled=True))
        assert ids(compiled) == ids(eager)
        assert max(abs(a - b) for (_, a), (_, b) in zip(compiled, eager, strict=True)) < 1e-4


def test_eos_stops_a_compiled_generation(model):
    sp = SamplingParams(max_new_tokens=30, temperature=0.0)
    full = ids(generate_tokens(model, [3, 4], sp, compiled=True))
    eos = full[5]
    cut = ids(generate_tokens(model, [3, 4], sp, eos_id=eos, compiled=True))
    assert cut == full[: full.index(eos)] and len(cut) < len(full)


def test_concurrent_generations_do_not_share_a_cache(model):
    sp = SamplingParams(max_new_tokens=12, temperature=0.0)
    want_a, want_b = ids(generate_tokens(model, [1, 2, 3], sp)), ids(generate_tokens(model, [9], sp))
    first = generate_tokens(model, [1, 2, 3], sp, compiled=True)
    second = generate_tokens(model, [9], sp, compiled=True)
    got_a, got_b = [], []
    for a, b in zip(first, second, strict=True):  # interleaved: both decoding at once
        got_a.append(a[0])
        got_b.append(b[0])
    assert (got_a, got_b) == (want_a, want_b)

    results: list[list[int]] = []
    threads = [threading.Thread(target=lambda p=p: results.append(ids(generate_tokens(model, p, sp, compiled=True))))
               for p in ([1, 2, 3], [1, 2, 3])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want_a, want_a]


def test_a_full_cache_and_an_oversized_prompt_are_refused(model):
    dec = Decoder(model, 4)
    with pytest.raises(ValueError, match="does not fit"):
        dec.prefill([1, 2, 3, 4])
    with torch.inference_mode():
        dec.prefill([1, 2, 3])
        dec.step(torch.tensor([[4]]))
        with pytest.raises(ValueError, match="cache full"):
            dec.step(torch.tensor([[5]]))


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_an_int8_model_decodes_weight_only(model, monkeypatch, kernels):
    """With int8 kernels the decoder reads the int8 tensors; without (a CPU where they lose to
    fp32) their float values: either way the numerics of the weight-only model."""
    monkeypatch.setenv("LMOPS_INT8_KERNELS", kernels)
    int8 = quantize_model(model)
    qkv = int8.blocks[0].attn.qkv
    assert qkv.int8_weight.dtype == torch.int8 and qkv.int8_scale.shape == (qkv.int8_weight.shape[0],)
    dec = Decoder(int8, 32, compiled=True)
    read = dec.weights[1][0][1]
    if kernels == "1":
        assert read[0] is qkv.int8_weight  # the decoder reads the int8 tensor itself
    else:
        assert read.dtype == torch.float32 and torch.equal(read, qkv.int8_weight.float() * qkv.int8_scale[:, None])
        assert Decoder(int8, 32, compiled=True).weights[1][0][1] is read  # made once per module, not per decoder
    seq = [5, 9, 2, 44, 17, 3, 3, 60, 1, 28, 11, 12]
    reference = weight_only_model(int8)  # float weights equal to q * scale
    with torch.inference_mode():
        dec.prefill(seq[:4])  # the eager int8 model (activations quantized too) fills the prompt's slots...
        prompt_cache = reference.new_cache(1, 4)
        reference(torch.tensor([seq[:4]]), cache=prompt_cache)
        for i in range(CFG.n_layer):  # ...so put weight-only keys and values there to compare the steps alone
            dec.cache.k[i][:, :, :4] = prompt_cache.k[i][:, :, :4]
            dec.cache.v[i][:, :, :4] = prompt_cache.v[i][:, :, :4]
        got = torch.cat([dec.step(torch.tensor([[t]])) for t in seq[4:]])
    want = eager_logits(reference, seq)[4:]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    float_logits = eager_logits(model, seq)[4:]
    assert 0 < (got - float_logits).abs().max() < 0.5  # int8 rounding shows, but stays small


def test_int8_kernels_follow_the_machines_probe(model, monkeypatch, tmp_path):
    """Measured once per machine and cached; the decoder's choice is the measurement's."""
    from lmcore.model.decode import int8_matvec_speedup, use_int8_kernels

    monkeypatch.delenv("LMOPS_INT8_KERNELS", raising=False)
    first = int8_matvec_speedup(home=tmp_path)
    assert first["fp32_us"] > 0 and first["int8_us"] > 0 and first["speedup"] > 0
    assert int8_matvec_speedup(home=tmp_path) == first  # cached: a second measurement would differ
    assert use_int8_kernels(quantize_model(model)) is (int8_matvec_speedup()["speedup"] >= 1.0)
    assert use_int8_kernels(model) is False  # a float model has no int8 weights to read


def test_a_new_process_loads_the_compiled_step_from_disk(model, monkeypatch):
    """The AOT-compiled library is kept under the lmops home: a later process (here: an emptied
    in-process table) loads it instead of compiling again, and it decodes the same logits."""
    from lmcore.model import decode
    from lmcore.settings import get_settings

    seq = [3, 14, 15, 9, 26, 5]
    first = Decoder(model, LEN, compiled=True)
    libraries = sorted(get_settings().decode_cache.glob("step-*.pt2"))
    assert libraries
    monkeypatch.setattr(decode, "_libraries", {})
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", None)  # compiling again would fail
    second = Decoder(model, LEN, compiled=True)
    assert sorted(get_settings().decode_cache.glob("step-*.pt2")) == libraries
    with torch.inference_mode():
        a = [first.prefill(seq[:2])] + [first.step(torch.tensor([[t]])) for t in seq[2:]]
        b = [second.prefill(seq[:2])] + [second.step(torch.tensor([[t]])) for t in seq[2:]]
    assert torch.equal(torch.cat(a), torch.cat(b))


def test_a_compiled_batch_of_rows_at_different_lengths_matches_each_row_alone(model):
    """The server's case: slots of different lengths step together, rows leave (the last row moves into
    the freed slot) and the batch shrinks to one row, all through one compiled step (B is dynamic)."""
    seqs = [[5, 9, 2, 44, 17, 3, 3, 60, 1, 28, 7, 7], [3, 14, 15, 9, 26, 5], [8, 8, 1, 2, 3, 4, 5, 6, 7, 9, 10]]
    cuts = [5, 1, 3]  # prompt lengths
    dec = Decoder(model, LEN, slots=4, compiled=True)
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    with torch.inference_mode():
        for s, (seq, cut) in enumerate(zip(seqs, cuts, strict=True)):
            got[s].append(dec.prefill(seq[:cut], slot=s))
        rows = [0, 1, 2]  # rows[slot]: which sequence a slot holds
        while rows:
            logits = dec.step(torch.tensor([seqs[r][dec.cache.lens[s]] for s, r in enumerate(rows)]))  # (B, V)
            for s, r in enumerate(rows):
                got[r].append(logits[s : s + 1])
            for s in reversed(range(len(rows))):
                if dec.cache.lens[s] == len(seqs[rows[s]]):  # this sequence is done: the last row takes its slot
                    dec.move(len(rows) - 1, s)
                    rows[s] = rows[-1]
                    rows.pop()
    for seq, cut, g in zip(seqs, cuts, got, strict=True):
        want = eager_logits(model, seq)[cut - 1 :]
        assert torch.allclose(torch.cat(g), want, atol=1e-4), (torch.cat(g) - want).abs().max()


def test_the_servers_engine_decodes_with_the_compiled_step(tmp_path):
    """The engine compiles the batched step in the background, switches to it, and its rows (queued past
    max_batch, finishing at different steps, greedy and seeded) get the tokens each would get alone."""
    import asyncio
    import time

    from _serve_helpers import make_model

    from lmcore.serve.engine import Engine, Row

    engine = Engine(str(make_model(tmp_path / "tiny", seed=1)), max_batch=2, max_new_tokens=24, batch_window_ms=20)
    try:
        assert engine.reload()["ok"]
        batcher = engine.current
        assert batcher.compile_done.wait(900) and batcher.decoder.compiled and engine.health()["compiled_decode"]
        lm = batcher.lm
        jobs = [("x", SamplingParams(max_new_tokens=24, temperature=0, stop_at_eos=False)),
                ("hello there", SamplingParams(max_new_tokens=5, temperature=0)),
                ("abc", SamplingParams(max_new_tokens=12, temperature=1.0, top_k=30, seed=3, stop_at_eos=False)),
                ("a prompt longer than the thirty-two token block of this model",
                 SamplingParams(max_new_tokens=9, temperature=0.7, seed=5))]

        async def one(prompt: str, sp: SamplingParams) -> list[int]:
            q: asyncio.Queue = asyncio.Queue()
            engine.submit(Row([], sp, time.monotonic() + 300, asyncio.get_running_loop(), q), prompt=prompt)
            out = []
            while (ev := await q.get())[0] == "token":
                out.append(ev[1])
            assert ev[0] == "done", ev
            return out

        async def all_of() -> list[list[int]]:
            return await asyncio.gather(*(one(p, sp) for p, sp in jobs))

        got = asyncio.run(all_of())
    finally:
        engine.stop()
    eos = lm.tokenizer.eos_id
    want = [ids(generate_tokens(lm.model, lm.tokenizer.encode(p)[-32:], sp, eos)) for p, sp in jobs]
    assert got == want


def test_prompts_prefilled_together_match_each_prefilled_alone(model):
    """The server admits waiting rows with one right-padded forward pass: each row's logits, and its
    steps after (the padding written past a shorter row's end is masked, then overwritten), are its own."""
    prompts = [[5, 9, 2, 44, 17], [3], [8, 8, 1, 2, 3, 4, 5, 6]]
    together = Decoder(model, 32, slots=4)
    with torch.inference_mode():
        together.prefill([1, 2], slot=0)  # a row already decoding
        got = together.prefill_many(prompts, slot=1)
        assert together.cache.lens[1:4] == [5, 1, 8]
        steps = [together.step(torch.tensor([[0], [7], [7], [7]]))[1:] for _ in range(3)]
    for r, ids in enumerate(prompts):
        want = eager_logits(model, ids + [7, 7, 7])[len(ids) - 1 :]  # the prompt's last logits, then 3 steps
        assert torch.allclose(got[r], want[0], atol=1e-5), (got[r] - want[0]).abs().max()
        assert torch.allclose(torch.stack([s[r] for s in steps]), want[1:], atol=1e-4)


@pytest.mark.parametrize("int8", [False, True])
def test_a_compiled_generation_records_its_step_time_for_the_thread_choice(model, monkeypatch, int8):
    """The compiled step's thread count follows its own recorded times (lmcore.probe.compiled_step_threads),
    an int8 step's apart from the float step's of the same shape."""
    from lmcore.machine import _memo
    from lmcore.model.generate import STEPS_TIMED, process_threads
    from lmcore.probe import _compiled_step_ident, _compiled_step_path, cached_compiled_steps, compiled_step_threads

    monkeypatch.setattr("lmcore.probe.machine_busy", lambda: False)  # the other test worker's load
    monkeypatch.setenv("LMOPS_INT8_KERNELS", "1")  # the step reads int8 weights, whatever this CPU's probe says
    record = _compiled_step_path(_compiled_step_ident(process_threads()), CFG, int8, None)
    record.unlink(missing_ok=True)  # so that what is read below is this generation's record
    _memo.pop(record, None)
    sp = SamplingParams(max_new_tokens=STEPS_TIMED + 2, temperature=0.0)
    decoded = quantize_model(model) if int8 else model
    assert len(ids(generate_tokens(decoded, [3, 4, 5], sp, compiled=True))) == STEPS_TIMED + 2
    recorded = cached_compiled_steps(many=process_threads())
    (mine,) = [c for c in recorded if c["int8"] is int8
               and c["shape"]["d_model"] == CFG.d_model and c["shape"]["vocab_size"] == CFG.vocab_size]
    (ms,) = mine["ms"].values()
    assert 0 < ms < 1.0  # a step of this tiny model: too short to split over threads
    assert mine["threads"] == compiled_step_threads(CFG, process_threads(), int8=int8) == 1
