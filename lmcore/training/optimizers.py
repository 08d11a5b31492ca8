"""Optimizers and the learning-rate schedule.

``adamw``: one AdamW with two groups, because weight decay should shrink matrices (2D
weights) but not gains, biases or embeddings. ``muon``: ``torch.optim.Muon`` (momentum
orthogonalised by Newton-Schulz, Keller Jordan's recipe) for the 2D hidden matrices of the
blocks, AdamW for embeddings, norms and the output head, as in modded-nanogpt. ``auto``: the
one of the two that :mod:`lmcore.probe` finds faster per wall-clock second on this machine.
Every group carries ``base_lr``; :func:`set_lr` scales all of them by one schedule multiplier.

torch's Muon runs Newton-Schulz in bf16, which is right on GPUs and AMX CPUs but 30-100x slower
than fp32 on AVX2-only CPUs (1-3 GFLOP/s): there it quartered the training speed. :class:`Muon`
is torch's optimizer with the iteration's precision as a parameter, chosen by the probe.
"""

from __future__ import annotations

import math

import torch
from torch.optim._muon import _adjust_lr

from lmcore.errors import LmopsError


def newton_schulz(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation, in ``dtype``, of a matrix ``g``
    (m, n) or of each matrix of a stack (k, m, n): one batched product instead of k small ones.

    In float32 a rectangular matrix iterates on its small Gram matrix instead (:func:`_gram_iteration`):
    the same polynomial, in about half the FLOPs. bf16 keeps torch's own sequence of products.
    """
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT  # (small, large): the Gram matrix is the small side squared
    if x.dim() == 2:
        x, mm = x / x.norm().clamp(min=eps), torch.addmm  # spectral norm <= 1
    else:
        x, mm = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps), torch.baddbmm
    if dtype == torch.float32 and x.size(-1) > x.size(-2) and steps > 1:
        x = _gram_iteration(x, steps, coefficients, mm)
    else:
        for _ in range(steps):
            gram = x @ x.mT
            x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _gram_iteration(x: torch.Tensor, steps: int, coefficients: tuple[float, float, float], mm) -> torch.Tensor:
    """The iteration X <- aX + (bA + cA^2)X, A = XX^T, carried out on (m, m) matrices for X (m, n), m < n.

    Every iterate is X_k = Q_k X_0 with Q_k a polynomial in G = X_0 X_0^T, so A_k = Q_k^2 G and
    Q_{k+1} = (aI + bA_k + cA_k^2) Q_k: products of m x m matrices, and X_0 is touched twice (G and
    the final Q X_0): 4m^2 n + 26m^3 FLOPs for 5 steps against 20m^2 n + 10m^3. Float32 only: Q
    grows to ~3.4^5 on the smallest singular directions, too coarse for bf16's 8 bits.
    """
    a, b, c = coefficients
    gram = x @ x.mT  # G: (m, m)
    eye = torch.eye(gram.size(-1), dtype=gram.dtype, device=gram.device)
    q = mm(gram, gram, gram, beta=b, alpha=c) + a * eye  # Q_1 = aI + bG + cG^2
    for _ in range(steps - 1):
        qa = q @ (q @ gram)  # A = Q^2 G
        q = mm(q, mm(qa, qa, qa, beta=b, alpha=c), q, beta=a)
    return q @ x


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with Newton-Schulz in ``ns_dtype`` (torch's own hard-codes bf16), and
    same-shape matrices (one per layer) orthogonalised together in one batched iteration: on a
    CPU a 128-wide model's 16 small iterations per step cost more in dispatch than in arithmetic.

    The update is torch's single-tensor one (momentum, Nesterov, decoupled weight decay, the
    learning-rate adjustment), so state dicts are interchangeable with ``torch.optim.Muon``.
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            by_shape: dict[tuple[int, ...], list[int]] = {}
            updates = []
            for i, (grad, buf) in enumerate(zip(grads, bufs, strict=True)):
                buf.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
                by_shape.setdefault(tuple(grad.shape), []).append(i)
            for shape, idx in by_shape.items():
                stack = updates[idx[0]] if len(idx) == 1 else torch.stack([updates[i] for i in idx])
                ortho = newton_schulz(stack, group["ns_steps"], group["ns_coefficients"], group["eps"],
                                      self.ns_dtype)
                adjusted = _adjust_lr(lr, group["adjust_lr_fn"], torch.Size(shape))
                for j, i in enumerate(idx):
                    params[i].mul_(1 - lr * wd)
                    params[i].add_((ortho if len(idx) == 1 else ortho[j]).to(params[i].dtype), alpha=-adjusted)
        return loss


def _is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim == 2 and not name.startswith(("embed", "lm_head")) and ".embed" not in name


def _named_unique(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters once each (tied embedding/head shares one tensor)."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def adamw_groups(named: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float) -> list[dict]:
    """Decay 2D weights except embeddings; never decay norms, biases or embeddings."""
    decay = [p for n, p in named if p.ndim >= 2 and not n.startswith("embed")]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and not n.startswith("embed"))]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr, "name": "no_decay"})
    return groups


def build_optimizers(model: torch.nn.Module, train, optimizer: str | None = None,
                     ns_dtype: torch.dtype = torch.bfloat16) -> list[torch.optim.Optimizer]:
    """Optimizers for ``optimizer`` (default ``train.optimizer``; ``auto`` must be resolved by the
    caller, see :func:`lmcore.probe.training_choices`); step them all each iteration.

    ``ns_dtype`` is Muon's Newton-Schulz precision.
    """
    named = _named_unique(model)
    # one fused kernel per step instead of ~10 small ops per tensor: CUDA and CPU alike (torch >= 2.4)
    fused = {"fused": True} if {p.device.type for _, p in named} in ({"cpu"}, {"cuda"}) else {}
    betas = (train.beta1, train.beta2)
    optimizer = optimizer or train.optimizer
    if optimizer == "adamw":
        return [torch.optim.AdamW(adamw_groups(named, train.lr, train.weight_decay), betas=betas, **fused)]
    if optimizer == "muon":
        hidden = [p for n, p in named if _is_hidden_matrix(n, p)]
        rest = [(n, p) for n, p in named if not _is_hidden_matrix(n, p)]
        opts: list[torch.optim.Optimizer] = []
        if hidden:
            opts.append(Muon(
                [{"params": hidden, "lr": train.muon_lr, "base_lr": train.muon_lr, "name": "muon"}],
                lr=train.muon_lr, weight_decay=train.weight_decay, momentum=train.muon_momentum, nesterov=True,
                ns_dtype=ns_dtype,
            ))
        if rest:
            opts.append(torch.optim.AdamW(adamw_groups(rest, train.lr, train.weight_decay), betas=betas, **fused))
        return opts
    raise LmopsError(f"unknown optimizer '{optimizer}' (use adamw, muon or auto)")


def lr_multiplier(step: int, frac: float, train) -> float:
    """Schedule multiplier in [min_lr/lr, 1].

    ``step`` drives the warmup; ``frac`` is the share of the budget used (steps or wall-clock,
    whichever is further along) and drives the decay: ``cosine``, ``linear`` or ``wsd``
    (constant, then a linear cool-down over the last ``cooldown_frac``).
    """
    if train.warmup_steps and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    floor = train.min_lr / train.lr
    start = min(train.warmup_steps / train.max_steps, 0.999)
    p = min(max((frac - start) / (1.0 - start), 0.0), 1.0)
    if train.lr_schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    if train.lr_schedule == "linear":
        return floor + (1 - floor) * (1 - p)
    if train.lr_schedule == "wsd":
        c = train.cooldown_frac
        return 1.0 if p < 1 - c else floor + (1 - floor) * (1 - p) / max(c, 1e-9)
    if train.lr_schedule == "constant":
        return 1.0
    raise LmopsError(f"unknown lr schedule '{train.lr_schedule}'")


def set_lr(optimizers: list[torch.optim.Optimizer], mult: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
