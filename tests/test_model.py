"""The Transformer itself: cache decoding equals a full forward, slots of different lengths, loss, limits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmcore.model.transformer import ModelConfig, Transformer

pytestmark = pytest.mark.model


def make(**kw) -> Transformer:
    cfg = ModelConfig(**{"vocab_size": 53, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64,
                         "block_size": 40, "tie_embeddings": False, **kw})
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_incremental_decoding_matches_full_forward(n_kv_head):
    model = make(n_kv_head=n_kv_head)
    x = torch.randint(0, 53, (3, 30))
    with torch.no_grad():
        full, _ = model(x)  # (3, 30, V)
        cache = model.new_cache(3, 30)
        parts = [model(x[:, :12], cache=cache)[0], model(x[:, 12:20], cache=cache)[0]]  # prefill, then a chunk
        parts += [model(x[:, t : t + 1], cache=cache)[0] for t in range(20, 30)]  # then single tokens
        last, _ = model(x[:, :17], cache=model.new_cache(3, 17), last_only=True)
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, full[:, 16:17], atol=1e-5, rtol=1e-5)


def test_slots_of_different_lengths_decode_together_as_they_would_alone():
    """Prompts prefilled into their own slots, then one step for all rows: each row's logits are its own."""
    from lmcore.model.decode import Decoder

    model = make()
    rows = [torch.randint(0, 53, (n,)) for n in (9, 4, 1)]
    dec = Decoder(model, 12, slots=3)
    with torch.no_grad():
        first = torch.cat([dec.prefill(r.tolist(), slot=s) for s, r in enumerate(rows)])  # (3, V)
        nxt = first.argmax(-1)  # (3,)
        step = dec.step(nxt)  # (3, V)
        for i, r in enumerate(rows):
            alone, _ = model(torch.cat([r, nxt[i : i + 1]])[None])
            torch.testing.assert_close(first[i], alone[0, -2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[i], alone[0, -1], atol=1e-5, rtol=1e-5)
    assert dec.cache.lens == [10, 5, 2]
    dec.move(0, 2)  # a finished row's slot takes the last row: its keys, values and length
    assert dec.cache.lens == [10, 5, 10]
    assert all(torch.equal(k[2, :, :10], k[0, :, :10]) for k in dec.cache.k + dec.cache.v)
    with pytest.raises(ValueError, match="one length"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=dec.cache)  # slots 0 and 1 differ in length


def test_loss_matches_cross_entropy_and_trains():
    model = make(dropout=0.1).train()
    x, y = torch.randint(0, 53, (4, 16)), torch.randint(0, 53, (4, 16))
    logits, loss = model(x, y)
    assert logits.shape == (4, 16, 53)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, 53), y.view(-1)).item(), rel=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, fused=True)
    first = loss.item()
    for _ in range(8):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5
    y[:, :8] = -1  # ignored positions
    assert torch.isfinite(model(x, y)[1])


def test_tied_embeddings_share_storage_and_limits_are_enforced():
    tied = make(tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed.weight
    assert tied.num_params() < make().num_params()
    with pytest.raises(ValueError, match="block_size"):
        tied(torch.zeros(1, 41, dtype=torch.long))
    cache = tied.new_cache(1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="cache full"):
        tied(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_cpu_bf16_training_attention_runs_as_plain_matmuls_with_fp32_gradients():
    """SDPA's fused CPU kernel has a slow bf16 backward: bf16 training uses its math path instead."""
    from torch.profiler import profile

    model = make(n_kv_head=2).train()
    x = torch.randint(0, 53, (4, 32))
    _, ref_loss = model(x, x)
    ref_loss.backward()
    ref_grad = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    with profile() as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" in ops
    assert not any("flash" in op for op in ops), sorted(op for op in ops if "flash" in op)
    torch.testing.assert_close(loss, ref_loss, atol=0.02, rtol=0.02)
    grad = model.blocks[0].attn.qkv.weight.grad
    assert grad.dtype == torch.float32 and F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.99
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), profile() as prof:
        model.eval()(x)  # inference keeps SDPA's own choice
    assert "aten::_scaled_dot_product_attention_math" not in {e.key for e in prof.key_averages()}
