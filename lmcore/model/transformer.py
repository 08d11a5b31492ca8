"""A decoder-only Transformer, Llama-style, small enough to hold in your head.

Pre-norm blocks of RMSNorm -> causal self-attention with RoPE (through
``F.scaled_dot_product_attention``) -> RMSNorm -> SwiGLU MLP; tied input/output
embeddings; grouped-query attention when ``n_kv_head < n_head``; a preallocated KV cache of
slots (:class:`KVCache`) that the forward pass fills with prompts and ``lmcore.model.decode.step``
extends one token per row (the one incremental-decoding path). Weights are laid out so that
``lmcore.model.hf`` maps them one-to-one onto Hugging Face ``LlamaForCausalLM`` (q/k/v and gate/up
are fused here for speed and split on export).

Shapes: B batch, T time (tokens), C = d_model, H heads, Hkv kv-heads, D head dim, V vocab,
S cache slots, L cache positions.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmcore.config import ModelParams, shipped_params


@dataclass(frozen=True)
class ModelConfig(ModelParams):
    """A model's shape: params.yaml's ``model`` slice (``ModelParams``: layers, heads, kv-heads, width,
    context, ffn width, RoPE base and Llama 3 scaling, norm eps, dropout, tied embeddings; defaults from
    params.yaml) plus the tokenizer's vocabulary size, which the prepared data decides."""

    vocab_size: int = field(default_factory=lambda: shipped_params().tokenizer.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def n_weights(self) -> int:
        """Weights of the matrices (embedding/head counted once), quantized or not: the decode work."""
        attn = (self.n_head + 2 * self.n_kv_head + self.n_head) * self.head_dim * self.d_model  # qkv + proj
        return self.n_layer * (attn + 3 * self.d_model * self.hidden) + self.vocab_size * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "rope_llama3" in known:  # a JSON list when read back from config.json
            known["rope_llama3"] = tuple(known["rope_llama3"] or ())
        return cls(**known)

    @classmethod
    def from_params(cls, params: ModelParams, vocab_size: int) -> ModelConfig:
        """From a ``lmcore.config.ModelParams`` slice plus the tokenizer's vocab size."""
        return cls(**{**asdict(params), "vocab_size": vocab_size})


def rope_cache(cfg: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, D) in Llama's rotate-half layout, sin's first half negated (see apply_rope)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    if cfg.rope_llama3:
        inv_freq = llama3_inv_freq(inv_freq, *cfg.rope_llama3)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (L, D/2)
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs, freqs), dim=-1).sin()  # sin(-a) = -sin(a)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_context: float) -> torch.Tensor:
    """Llama 3's RoPE scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth blend between
    (the ``llama3`` rope type of Hugging Face's config, which Llama-3.1/3.2 bases use)."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original_context / low_freq_factor, original_context / high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., D) by angles whose cos/sin broadcast against it, e.g. x (B, T, H, D), cos (T, 1, D).

    x*cos + rotate_half(x)*sin, where rotate_half(x) = (-x2, x1) equals roll(x, D/2) = (x2, x1) times
    the sign that ``rope_cache`` baked into sin: 3 ops instead of 5, which counts when decoding.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class KVCache:
    """Keys and values of up to S sequences ("slots"), each with its own length, for incremental decoding.

    Per layer ``k[i]``, ``v[i]``: (S, Hkv, max_len + 1, D), preallocated; ``lens[s]`` tokens of slot s are
    filled. Two writers, one layout: :meth:`Transformer.forward` with ``cache=`` appends a chunk of T tokens
    to B slots of equal length (a prompt's prefill), and ``lmcore.model.decode.step`` appends one token to each of
    the slots 0..B-1 at its own length (eager or compiled, batch 1 or a server's batch). Nothing else copies
    a cache, except :meth:`move`: a serving engine keeps its active rows in slots 0..B-1 and, when a row
    finishes, moves the last row into the freed slot, so that a step always reads a leading block of slots.

    Why per-layer tensors: a compiled step writes them in place; a slice of one shared tensor would make
    the compiler copy the whole cache. Why one spare position: a compiled step slices the first n <= max_len
    positions with n dynamic; a slice that can cover the whole tensor would be specialised (a second graph).
    """

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device=None, dtype=torch.float32):
        shape = (slots, cfg.n_kv_head, max_len + 1, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.lens = [0] * slots  # tokens held by each slot

    @property
    def slots(self) -> int:
        return len(self.lens)

    @property
    def pos(self) -> int:
        """Tokens in slot 0: the length of a single-sequence cache (or of a batch prefilled together)."""
        return self.lens[0]

    def reset(self) -> None:
        self.lens = [0] * self.slots

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` (its filled positions and length) into slot ``dst``."""
        n = self.lens[src]
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lens[dst] = n


def chunk_mask(start: int, T: int, device=None) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for T queries in positions start.. over keys 0..start+T-1: mask (T, start+T), True = attend."""
    if start == 0:
        return None, T > 1
    if T == 1:  # a single query sees every cached key
        return None, False
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start), False


# Above this many logits (B * T * V) a forward with targets returns (None, loss) and never materialises
# them: at 16 x 128 tokens over a 49,152 vocabulary the logits, their log-softmax and their gradient
# were 1.2 GB of a LoRA step's peak. Every caller that passes targets uses only the loss; tests with
# tiny shapes still get the logits.
PLAIN_LOSS_LOGITS = 1 << 22
LOSS_CHUNK_LOGITS = 1 << 23  # logits per chunk of rows in linear_cross_entropy (32 MB in fp32)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(h @ weight.T, targets, ignore_index=-1)`` (mean), computed ``chunk_rows`` rows at a time.

    h (N, C), weight (V, C), targets (N,). Why: the plain path keeps (N, V) logits, their log-softmax
    and their gradient alive at once; here one chunk of logits exists at a time, and with gradients
    wanted the chunk's softmax becomes its gradient in place, so the backward is two products per
    chunk and no (N, V) tensor is ever stored. The weight's gradient is only formed when it is
    trained (not under LoRA, where the tied embedding is frozen). Under autocast the products run in
    its dtype and the softmax in fp32, as the plain path does.
    """
    rows = chunk_rows or max(16, LOSS_CHUNK_LOGITS // weight.shape[0])
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(dev, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, targets, rows)
        return _linear_cross_entropy(h, weight, targets, rows, False, False)[0]


def _linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int,
                          grad_h: bool, grad_w: bool):
    """(loss, dloss/dh or None, dloss/dweight or None), chunk by chunk (see :func:`linear_cross_entropy`)."""
    valid = targets != -1
    count = valid.sum()
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if grad_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if grad_w else None
    for s in range(0, h.shape[0], rows):
        hc, tc, vc = h[s : s + rows], targets[s : s + rows].clamp(min=0), valid[s : s + rows]
        logits = (hc @ weight.T).float()  # (r, V): the only logits alive
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, tc[:, None]).squeeze(1)
        total += torch.where(vc, lse - picked, 0.0).sum()
        if grad_h or grad_w:
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs.scatter_add_(1, tc[:, None], -vc[:, None].to(probs.dtype))  # minus the one-hot target
            probs.mul_(vc[:, None] / count)  # ignored rows give nothing; the mean's 1/count
            g = probs.to(h.dtype)
            if grad_h:
                torch.mm(g, weight, out=dh[s : s + rows])
            if grad_w:
                dw += (g.T @ hc).float()
    return total / count, dh, (dw.to(weight.dtype) if dw is not None else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradients are formed in the forward (the loss is a scalar at the end of the graph) and scaled
    by the incoming gradient in the backward: no recomputation of the logits, nothing (N, V) saved."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows):
        loss, dh, dw = _linear_cross_entropy(h, weight, targets, rows, ctx.needs_input_grad[0],
                                             ctx.needs_input_grad[1])
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return (dh * grad if dh is not None else None, dw * grad if dw is not None else None, None, None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, kv: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0,
                mask: tuple[torch.Tensor | None, bool] | None = None) -> torch.Tensor:
        """x (B, T, C), cos/sin (T, D) for this chunk's positions -> (B, T, C).

        With ``kv`` (this layer's cache rows, (B, Hkv, L, D) each, filled up to ``start``), the chunk's keys
        and values are written at start..start+T-1 and attention covers all start+T of them, under
        ``mask`` = :func:`chunk_mask` (start, T).
        """
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        # split, not slicing: its backward is one cat instead of a zero-filled gradient per slice
        qk, v = self.qkv(x).view(B, T, H + 2 * Hkv, D).split((H + Hkv, Hkv), dim=2)
        if torch.is_grad_enabled() and v.requires_grad and kv is None:
            v = v.contiguous()  # attention saves v for its backward: as a view it would keep all of q|k|v alive
        q, k = apply_rope(qk, cos[:, None], sin[:, None]).split((H, Hkv), dim=2)  # q and k rotated in one go
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D) x2

        attn_mask, causal = None, T > 1
        if kv is not None:
            ck, cv = kv
            ck[:, :, start : start + T] = k
            cv[:, :, start : start + T] = v
            k, v = ck[:, :, : start + T], cv[:, :, : start + T]  # (B, Hkv, start+T, D)
            attn_mask, causal = mask if mask is not None else chunk_mask(start, T, x.device)
        with sdpa_kernel(SDPBackend.MATH) if _math_attention(v) else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=causal,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=Hkv != H,
            )  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


def _math_attention(v: torch.Tensor) -> bool:
    """Plain matmuls + softmax (SDPA's math backend) for bf16 training on a CPU; else SDPA's own pick.

    Why: the fused CPU flash kernel's bf16 backward is slow at these head sizes (2-core AMX
    Xeon: 22 ms of a 45 ms step at 4 x 128 wide, D 32), while the math path runs its two
    matmuls on the AMX tiles: training steps are 1.5-2x faster (see lmcore.device). ``v`` tells
    the precision: under autocast it leaves the qkv matmul in bf16, while q and k come out of
    RoPE's fp32 tables in fp32.
    """
    return v.device.type == "cpu" and v.dtype == torch.bfloat16 and torch.is_grad_enabled()


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = cfg.hidden
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)  # (B, T, 2 hidden): gate | up
        if torch.is_grad_enabled() and gu.requires_grad:
            return self.down(_SiluMul.apply(gu))
        gate, up = gu.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up of gate|up (..., 2 hidden), saving only gate|up: autograd's own ops also keep
    silu(gate) (hidden floats per token and layer, 1/8 of a LoRA step's activations at 576 wide),
    which the backward recomputes here from gate for a few elementwise passes."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor) -> torch.Tensor:
        gate, up = gu.chunk(2, dim=-1)
        ctx.save_for_backward(gu)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (gu,) = ctx.saved_tensors
        gate, up = gu.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_gate = grad * up * (sig + silu * (1 - sig))  # d silu(g)/dg = s + g s (1 - s)
        return torch.cat((d_gate, grad * silu), dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, kv=None, start=0, mask=None):
        if self.drop.p == 0.0:  # skip two no-op module calls: per-step overhead matters when decoding
            x = x + self.attn(self.attn_norm(x), cos, sin, kv, start, mask)
            return x + self.mlp(self.mlp_norm(x))
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, kv, start, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cache(cfg, cfg.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual outputs
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def rope(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, D) of positions start..start+T-1; decoding past block_size grows the table."""
        if start + T > self.rope_cos.shape[0]:
            cos, sin = rope_cache(self.cfg, 2 * (start + T), device=self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.dtype), sin.to(self.rope_sin.dtype)
        return self.rope_cos[start : start + T], self.rope_sin[start : start + T]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        slot: int = 0,
        last: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) token ids -> logits (B, T, V) (or (B, 1, V) with last_only, or at ``last``), loss.

        With ``targets`` (-1 = ignored) the loss is their mean cross-entropy; above ``PLAIN_LOSS_LOGITS``
        logits it is computed without them (:meth:`loss_of`) and the logits returned are None.

        With ``cache``, idx's rows continue the cache's slots slot..slot+B-1 (all of one length) and
        their keys and values are appended there: a prompt's prefill, or a chunk after it. ``last``
        (B,): the position of each row's last real token, for right-padded rows (logits (B, 1, V)).
        """
        B, T = idx.shape
        start = cache.lens[slot] if cache is not None else 0
        if cache is None and self.cfg.block_size < T:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}")
        if cache is not None:
            if start + T > cache.max_len:
                raise ValueError(f"KV cache full: {start} + {T} > {cache.max_len}")
            if slot + B > cache.slots or any(n != start for n in cache.lens[slot : slot + B]):
                raise ValueError(f"rows {slot}..{slot + B - 1} are not slots of one length in this cache")
        cos, sin = self.rope(start, T)
        mask = chunk_mask(start, T, idx.device) if cache is not None else None
        x = self.drop(self.embed(idx))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            kv = (cache.k[i][slot : slot + B], cache.v[i][slot : slot + B]) if cache is not None else None
            x = block(x, cos, sin, kv, start, mask)
        if cache is not None:
            cache.lens[slot : slot + B] = [start + T] * B
        if last is not None:
            x = x[torch.arange(B, device=x.device), last][:, None]  # (B, 1, C)
        elif last_only:
            x = x[:, -1:, :]
        if targets is not None and x.shape[0] * x.shape[1] * self.cfg.vocab_size > PLAIN_LOSS_LOGITS:
            return None, self.loss_of(x, targets)
        x = self.norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def loss_of(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the last block's output x (B, T, C) without the (B, T, V) logits.

        Rows whose target is ignored (-1: masked prompt tokens) are dropped before the final norm and
        head; the rest go through :func:`linear_cross_entropy` in chunks of rows.
        """
        h, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        if not torch.compiler.is_compiling():  # a data-dependent row count would recompile every step
            keep = t != -1
            if not bool(keep.all()):
                idx = keep.nonzero().squeeze(1)
                h, t = h.index_select(0, idx), t.index_select(0, idx)
        return linear_cross_entropy(self.norm(h), self.lm_head.weight, t)

    def new_cache(self, slots: int, max_len: int | None = None, dtype=None) -> KVCache:
        """A cache of ``slots`` sequences of up to ``max_len`` (default block_size) tokens each."""
        p = self.embed.weight
        return KVCache(self.cfg, slots, max_len or self.cfg.block_size, p.device, dtype or p.dtype)
