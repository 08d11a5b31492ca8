"""The chunked linear + cross-entropy (``lmcore.model.transformer.linear_cross_entropy``) against the plain path.

The training loss of a large vocabulary never materialises its logits; these check that the loss and
every gradient (hidden states, tied head/embedding, LoRA adapters) equal ``F.cross_entropy`` over
the full logits, with ignored targets, under a frozen head, and through the model's own forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmcore.model import transformer
from lmcore.model.transformer import ModelConfig, Transformer, linear_cross_entropy


def _plain(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ w.T).float(), t, ignore_index=-1)


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_loss_and_gradients_equal_the_plain_path(rows: int, frozen_head: bool):
    torch.manual_seed(0)
    h = torch.randn(50, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 24, dtype=torch.float64, requires_grad=not frozen_head)
    t = torch.randint(0, 97, (50,))
    t[::3] = -1  # ignored (masked prompt) targets
    ref = _plain(h, w, t)
    ref_grads = torch.autograd.grad(ref, [h] + ([] if frozen_head else [w]))
    got = linear_cross_entropy(h, w, t, rows)
    grads = torch.autograd.grad(got, [h] + ([] if frozen_head else [w]))
    torch.testing.assert_close(got, ref.to(got.dtype))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_no_grad_and_all_ignored_targets():
    h, w = torch.randn(9, 8), torch.randn(13, 8)
    t = torch.randint(0, 13, (9,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, 4), _plain(h, w, t))
    assert torch.isnan(linear_cross_entropy(h, w, torch.full((9,), -1), 4))  # as F.cross_entropy: 0 / 0


def test_bf16_autocast_is_close_to_the_plain_path():
    torch.manual_seed(0)
    h, w = torch.randn(40, 32, requires_grad=True), torch.randn(61, 32, requires_grad=True)
    t = torch.randint(0, 61, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.T).float(), t)
        got = linear_cross_entropy(h, w, t, 16)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)
    ref_g, got_g = torch.autograd.grad(ref, [h, w]), torch.autograd.grad(got, [h, w])
    for g, r in zip(got_g, ref_g, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=2e-2, rtol=0.05)


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=16, dropout=0.0,
                      tie_embeddings=True)
    return Transformer(cfg).double().train()


@pytest.mark.parametrize("lora", [False, True])
def test_model_forward_equals_the_plain_loss(monkeypatch, lora: bool):
    """Through the whole model (tied head, LoRA on its fused layers): same loss, same gradient of every
    trained tensor, whether the logits are materialised or not."""
    x = torch.randint(0, 101, (3, 16))
    y = torch.randint(0, 101, (3, 16))
    y[0, :10] = -1  # a chat row's prompt
    losses, grads = [], []
    for limit in (1 << 40, 0):  # plain (logits returned), then chunked (None)
        net = _model()
        if lora:
            from types import SimpleNamespace

            from lmcore.training.lora import add_lora

            torch.manual_seed(1)
            net = add_lora(net, SimpleNamespace(lora_r=2, lora_alpha=4.0, lora_dropout=0.0,
                                                lora_targets=["qkv", "proj", "gate_up", "down"]))
            for name, p in net.named_parameters():
                if "lora_B" in name:  # peft starts B at zero: make the adapters count
                    torch.nn.init.normal_(p, std=0.1)
        monkeypatch.setattr(transformer, "PLAIN_LOSS_LOGITS", limit)
        logits, loss = net(x, y)
        assert (logits is None) == (limit == 0)
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in net.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    if lora:
        assert all("lora_" in n for n in grads[0])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_swiglu_recomputed_backward_equals_autograd():
    """The MLP saves only gate|up and recomputes silu(gate) in its backward: same output, same gradients."""
    torch.manual_seed(0)
    gu = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 8, dtype=torch.float64)
    gate, up = gu.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    (ref_g,) = torch.autograd.grad(ref, gu, grad)
    got = transformer._SiluMul.apply(gu)
    (got_g,) = torch.autograd.grad(got, gu, grad)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_g, ref_g)
