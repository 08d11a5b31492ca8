"""A decoder-only Transformer, Llama-style, small enough to hold in your head.

Pre-norm blocks of RMSNorm -> causal self-attention with RoPE (through
``F.scaled_dot_product_attention``) -> RMSNorm -> SwiGLU MLP; tied input/output
embeddings; grouped-query attention when ``n_kv_head < n_head``; a preallocated KV cache
for incremental decoding. Weights are laid out so that ``lmcore.hf`` maps them one-to-one
onto Hugging Face ``LlamaForCausalLM`` (q/k/v and gate/up are fused here for speed and
split on export).

Shapes: B batch, T time (tokens), C = d_model, H heads, Hkv kv-heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    d_model: int = 128
    block_size: int = 128
    ffn_hidden: int = 0  # 0 = Llama rule: 8/3 * d_model rounded up to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True

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
        return cls(**known)

    @classmethod
    def from_params(cls, params, vocab_size: int) -> ModelConfig:
        """From a ``lmcore.config.ModelParams`` slice plus the tokenizer's vocab size."""
        return cls(vocab_size=vocab_size, **asdict(params))


def rope_cache(cfg: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, D) in Llama's rotate-half layout, sin's first half negated (see apply_rope)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)  # (L, D/2)
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs, freqs), dim=-1).sin()  # sin(-a) = -sin(a)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., D) by angles whose cos/sin broadcast against it, e.g. x (B, T, H, D), cos (T, 1, D).

    x*cos + rotate_half(x)*sin, where rotate_half(x) = (-x2, x1) equals roll(x, D/2) = (x2, x1) times
    the sign that ``rope_cache`` baked into sin: 3 ops instead of 5, which counts when decoding.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class KVCache:
    """Preallocated keys/values for every layer: ``kv`` is (n_layer, B, 2*Hkv, max_len, D), keys first.

    ``k``/``v`` are views (n_layer, B, Hkv, max_len, D) of its two halves, so code that moves a
    row's cache (e.g. a serving engine's slots) can copy keys and values in one go through ``kv``.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        Hkv = cfg.n_kv_head
        self.kv = torch.zeros((cfg.n_layer, batch_size, 2 * Hkv, max_len, cfg.head_dim), device=device, dtype=dtype)
        self.k, self.v = self.kv[:, :, :Hkv], self.kv[:, :, Hkv:]
        self.max_len = max_len
        self.pos = 0  # tokens already in the cache (the same slot index for every row)
        self.pad: torch.Tensor | None = None  # (B,) left-padding slots per row; those keys are never attended
        self.mask: tuple[torch.Tensor | None, bool] | None = None  # (mask, is_causal) of the running forward

    def reset(self) -> None:
        self.pos = 0

    def step_mask(self, T: int, B: int) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for the next T tokens of B rows: mask (T, pos+T) or (B, 1, T, pos+T), True = attend.

        Query i sits in slot pos + i and sees slots <= pos + i. Left-padded rows (``pad``) are aligned
        on the right: RoPE only sees position differences, so shifting a row by its padding leaves its
        logits unchanged; its first ``pad[b]`` slots are masked out.
        """
        start = self.pos
        if self.pad is None:
            if start == 0:
                return None, T > 1
            if T == 1:  # a single query sees every cached key
                return None, False
            return torch.ones(T, start + T, dtype=torch.bool, device=self.kv.device).tril(diagonal=start), False
        slots = torch.arange(start + T, device=self.kv.device)  # (S,)
        query = (start + torch.arange(T, device=self.kv.device))[:, None]  # (T, 1) slot of each query
        keep = slots[None, None, :] >= self.pad[:B, None, None].to(self.kv.device)  # (B, 1, S) real tokens
        # (B, T, S); a padding query sees itself, so no row is fully masked (that would give NaN)
        mask = (slots[None, :] <= query) & (keep | (slots[None, :] == query))
        return mask[:, None], False  # (B, 1, T, S)


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

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, C), cos/sin (T, D) for this chunk's positions -> (B, T, C)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        # split, not slicing: its backward is one cat instead of a zero-filled gradient per slice
        qk, v = self.qkv(x).view(B, T, H + 2 * Hkv, D).split((H + Hkv, Hkv), dim=2)
        q, k = apply_rope(qk, cos[:, None], sin[:, None]).split((H, Hkv), dim=2)  # q and k rotated in one go
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D) x2

        mask, causal = None, T > 1
        if cache is not None:
            start = cache.pos
            ck, cv = cache.k[layer, :B], cache.v[layer, :B]  # (B, Hkv, max_len, D)
            ck[:, :, start : start + T] = k
            cv[:, :, start : start + T] = v
            k, v = ck[:, :, : start + T], cv[:, :, : start + T]  # (B, Hkv, start+T, D)
            mask, causal = cache.mask or cache.step_mask(T, B)  # built once per forward by Transformer.forward
        with sdpa_kernel(SDPBackend.MATH) if _math_attention(v) else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal,
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
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0):
        if self.drop.p == 0.0:  # skip two no-op module calls: per-step overhead matters when decoding
            x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
            return x + self.mlp(self.mlp_norm(x))
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer))
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

    def _rope(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + T > self.rope_cos.shape[0]:  # decoding past block_size: extend the table
            cos, sin = rope_cache(self.cfg, 2 * (start + T), device=self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.dtype), sin.to(self.rope_sin.dtype)
        return self.rope_cos[start : start + T], self.rope_sin[start : start + T]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids -> logits (B, T, V) (or (B, 1, V) with last_only), loss."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if cache is None and self.cfg.block_size < T:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache full: {start} + {T} > {cache.max_len}")
        cos, sin = self._rope(start, T)
        if cache is not None:
            cache.mask = cache.step_mask(T, B)
        x = self.drop(self.embed(idx))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.pos, cache.mask = start + T, None
        if last_only:
            x = x[:, -1:, :]
        x = self.norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.block_size, p.device, dtype or p.dtype)
