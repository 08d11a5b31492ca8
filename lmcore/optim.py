"""Optimizers and the learning-rate schedule.

``adamw``: one AdamW with two groups, because weight decay should shrink matrices (2D
weights) but not gains, biases or embeddings. ``muon``: ``torch.optim.Muon`` (momentum
orthogonalised by Newton-Schulz, Keller Jordan's recipe) for the 2D hidden matrices of the
blocks, AdamW for embeddings, norms and the output head, as in modded-nanogpt. Every group
carries ``base_lr``; :func:`set_lr` scales all of them by one schedule multiplier.
"""

from __future__ import annotations

import math

import torch

from lmcore.errors import LmopsError


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


def build_optimizers(model: torch.nn.Module, train) -> list[torch.optim.Optimizer]:
    """Optimizers for ``train.optimizer`` (a ``TrainParams``); step them all each iteration."""
    named = _named_unique(model)
    fused = {"fused": True} if all(p.is_cuda for _, p in named) else {}
    betas = (train.beta1, train.beta2)
    if train.optimizer == "adamw":
        return [torch.optim.AdamW(adamw_groups(named, train.lr, train.weight_decay), betas=betas, **fused)]
    if train.optimizer == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise LmopsError("train.optimizer=muon needs torch>=2.9 (torch.optim.Muon)")
        hidden = [p for n, p in named if _is_hidden_matrix(n, p)]
        rest = [(n, p) for n, p in named if not _is_hidden_matrix(n, p)]
        opts: list[torch.optim.Optimizer] = []
        if hidden:
            opts.append(torch.optim.Muon(
                [{"params": hidden, "lr": train.muon_lr, "base_lr": train.muon_lr, "name": "muon"}],
                lr=train.muon_lr, weight_decay=train.weight_decay, momentum=train.muon_momentum, nesterov=True,
            ))
        if rest:
            opts.append(torch.optim.AdamW(adamw_groups(rest, train.lr, train.weight_decay), betas=betas, **fused))
        return opts
    raise LmopsError(f"unknown optimizer '{train.optimizer}' (use adamw or muon)")


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
