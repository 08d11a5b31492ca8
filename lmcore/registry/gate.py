"""The promotion gate: what a challenger must show to become ``champion``, decided in one place.

:func:`decide` is the decision itself: pure (numbers and version ids in, a :class:`GateDecision`
out; no MLflow, no model, no I/O), so every branch is testable on its own. :func:`behaviour_checks`
and :func:`prompt_completions` run a model to produce the decision's inputs and the gate's
side-by-side samples. Tracking the decision (a gate run, version tags) and moving the alias
are the registry's job (:func:`lmcore.registry.models.gate`); this module never touches either.

The rules, in order:

1. the challenger *is* the champion: nothing to decide, ``promoted=False`` (the alias does not
   move, so there is nothing to deploy and the version's earlier gate record stands);
2. any behaviour check failed: rejected, whatever the numbers say;
3. no comparable champion (none, or it could not be evaluated): promoted;
4. the challenger's bits per byte beat the champion's by at least ``min_improvement``: promoted;
5. otherwise: rejected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lmcore.model.generate import SamplingParams, generate_text

FINITE_METRICS = ("val_loss", "bits_per_byte")


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reason: str
    challenger: str
    champion: str | None
    challenger_bpb: float | None
    champion_bpb: float | None
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def already_champion(self) -> bool:
        """The challenger was already the champion: the gate decided nothing."""
        return is_champion(self.challenger, self.champion)

    def to_dict(self) -> dict:
        return asdict(self)


def is_champion(challenger: str, champion: str | None) -> bool:
    """Whether the version being gated is the current champion (rule 1: nothing to decide)."""
    return champion is not None and str(champion) == str(challenger)


def decide(challenger: str, champion: str | None, *, checks: Mapping[str, bool], challenger_bpb: float | None,
           champion_bpb: float | None, min_improvement: float, champion_note: str = "") -> GateDecision:
    """The gate's decision (see the module doc for the rules).

    ``champion_bpb`` is None when there is no champion or it could not be evaluated (then
    ``champion_note`` says why, and goes into the reason). ``challenger_bpb`` may be None only
    when the challenger is already the champion (nothing was evaluated).
    """
    challenger, champion = str(challenger), None if champion is None else str(champion)
    checks = {str(k): bool(v) for k, v in checks.items()}
    min_imp = float(min_improvement)

    def decision(promoted: bool, reason: str) -> GateDecision:
        return GateDecision(promoted=promoted, reason=reason, challenger=challenger, champion=champion,
                            challenger_bpb=challenger_bpb, champion_bpb=champion_bpb, checks=checks)

    if is_champion(challenger, champion):
        return decision(False, f"v{challenger} is already the champion (nothing new to gate)")
    failed = [k for k, ok in checks.items() if not ok]
    if failed:
        return decision(False, f"failed behaviour checks: {', '.join(failed)}")
    if challenger_bpb is None:
        raise ValueError("a challenger that is not the champion needs its bits per byte")
    if champion_bpb is None or not math.isfinite(champion_bpb):  # a broken champion must not hold the alias
        note = champion_note if champion_bpb is None else f" (champion v{champion} scores {champion_bpb})"
        return decision(True, f"no comparable champion; challenger bpb {challenger_bpb:.4f}{note}")
    gain = champion_bpb - challenger_bpb
    if gain >= min_imp:
        return decision(True, f"challenger bpb {challenger_bpb:.4f} beats champion v{champion} {champion_bpb:.4f} "
                              f"by {gain:.4f} >= {min_imp}")
    return decision(False, f"challenger bpb {challenger_bpb:.4f} does not beat champion v{champion} "
                           f"{champion_bpb:.4f} by >= {min_imp} (improvement {gain:.4f})")


# --------------------------------------------------------------------------- the decision's inputs
def finite_metrics(metrics: Mapping[str, Any]) -> bool:
    """The evaluation numbers the gate compares are finite (a missing one counts as not)."""
    return all(math.isfinite(float(metrics.get(k, float("nan")))) for k in FINITE_METRICS)


def finite_logits(model: Any, tokenizer: Any, prompts: tuple[str, ...]) -> bool:
    """One forward pass over the prompts gives finite logits (sampling from NaN logits would crash)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(" ".join(prompts or ("\n",)))[: model.cfg.block_size] or [tokenizer.eos_id]
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids], dtype=torch.long, device=device))  # (1, T, V)
    return bool(torch.isfinite(logits).all().item())


def behaviour_checks(model: Any, tokenizer: Any, prompts: tuple[str, ...], seed: int, metrics: dict) -> dict[str, bool]:
    """Cheap sanity checks a challenger must pass: text comes out, a seed pins it, numbers are finite."""
    prompts = prompts or ("\n",)
    finite_numbers = finite_metrics(metrics)
    if not finite_logits(model, tokenizer, prompts):  # sampling from NaN logits would just crash
        return {"non_empty_text": False, "deterministic_under_seed": False, "finite_logits": False,
                "finite_loss": finite_numbers}
    sp = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=1.0, seed=seed, stop_at_eos=False)
    first = [generate_text(model, tokenizer, p, sp) for p in prompts]
    second = [generate_text(model, tokenizer, p, sp) for p in prompts]
    return {
        "non_empty_text": any(s.strip() for s in first),
        "deterministic_under_seed": first == second,
        "finite_logits": True,
        "finite_loss": finite_numbers,
    }


def prompt_completions(model: Any, tokenizer: Any, eval_params: Any) -> list[dict]:
    """Seeded completions of the fixed prompt set (``params.eval.prompts``), the same for every version."""
    sp = SamplingParams(max_new_tokens=eval_params.sample_max_new_tokens, temperature=eval_params.temperature,
                        top_k=eval_params.top_k, top_p=eval_params.top_p, seed=eval_params.seed)
    return [{"prompt": p, "completion": generate_text(model, tokenizer, p, sp)} for p in eval_params.prompts]
