"""The promotion gate: what a challenger must show to become ``champion``, decided in one place.

:func:`decide` is the decision itself: pure (numbers and version ids in, a :class:`GateDecision`
out; no MLflow, no model, no I/O), so every branch is testable on its own. :func:`behaviour_checks`
and :func:`prompt_completions` run a model to produce the decision's inputs and the gate's
side-by-side samples. Tracking the decision (a gate run, version tags) and moving the alias
are the registry's job (:func:`lmcore.registry.models.gate`); this module never touches either.

The rules, in order:

1. the challenger *is* the champion: nothing to decide, ``promoted=False`` (the alias does not
   move, so there is nothing to deploy and the version's earlier gate record stands);
2. any behaviour check failed (the HF export check among them): rejected, whatever the numbers say;
3. no comparable champion (none, or it could not be evaluated): promoted;
4. what users asked for, when there is something to compare: the challenger's mean log-likelihood of
   the golden completions (``gate.golden``) is more than ``golden_tolerance`` nats/token below the
   champion's, or it prefers the harvested corrections (pairs) in a share not at least
   ``min_preference_gain`` above the champion's: rejected. The share is taken over the held-out pairs
   (``split: holdout``, which DPO never trains on) once there are ``min_heldout_pairs`` of them, else
   over all pairs (the reason then says that some may have been trained on);
5. the challenger's bits per byte beat the champion's by at least ``min_improvement``: promoted;
6. otherwise: rejected.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmcore.machine import release_freed_memory
from lmcore.model.checkpoint import load_model
from lmcore.model.generate import SamplingParams, generate_text, generate_tokens
from lmcore.model.hf import export_hf
from lmcore.training.dpo import completion_loglik, preference_scores

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
    scores: dict[str, float] = field(default_factory=dict)  # golden / preference numbers, challenger_* and champion_*

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
           champion_bpb: float | None, min_improvement: float, champion_note: str = "",
           scores: Mapping[str, float] | None = None, golden_tolerance: float = 0.0,
           min_preference_gain: float = 0.0, min_heldout_pairs: int = 10) -> GateDecision:
    """The gate's decision (see the module doc for the rules).

    ``champion_bpb`` is None when there is no champion or it could not be evaluated (then
    ``champion_note`` says why, and goes into the reason). ``challenger_bpb`` may be None only
    when the challenger is already the champion (nothing was evaluated). ``scores`` holds
    ``challenger_``/``champion_`` ``golden_loglik``, ``preference_accuracy`` and ``heldout_preference_accuracy``
    where there was a golden set or harvested pairs to score (rule 4 compares only what both sides have).
    """
    challenger, champion = str(challenger), None if champion is None else str(champion)
    checks = {str(k): bool(v) for k, v in checks.items()}
    min_imp = float(min_improvement)
    scores = {str(k): float(v) for k, v in (scores or {}).items()}

    def decision(promoted: bool, reason: str) -> GateDecision:
        return GateDecision(promoted=promoted, reason=reason, challenger=challenger, champion=champion,
                            challenger_bpb=challenger_bpb, champion_bpb=champion_bpb, checks=checks, scores=scores)

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
    if regression := _user_regression(scores, float(golden_tolerance), float(min_preference_gain),
                                      int(min_heldout_pairs)):
        return decision(False, regression)
    gain = champion_bpb - challenger_bpb
    if gain >= min_imp:
        return decision(True, f"challenger bpb {challenger_bpb:.4f} beats champion v{champion} {champion_bpb:.4f} "
                              f"by {gain:.4f} >= {min_imp}{_user_note(scores, int(min_heldout_pairs))}")
    return decision(False, f"challenger bpb {challenger_bpb:.4f} does not beat champion v{champion} "
                           f"{champion_bpb:.4f} by >= {min_imp} (improvement {gain:.4f})")


def _user_regression(scores: Mapping[str, float], golden_tolerance: float, min_preference_gain: float,
                     min_heldout_pairs: int) -> str:
    """Rule 4's reason to reject ("" when the challenger passes it, or there was nothing to compare)."""
    ch, cp = scores.get("challenger_golden_loglik"), scores.get("champion_golden_loglik")
    if ch is not None and cp is not None and ch < cp - golden_tolerance:
        return (f"golden prompts regress: challenger log-likelihood {ch:.4f} < champion {cp:.4f} - "
                f"{golden_tolerance} nats/token")
    key, which = _preference_set(scores, min_heldout_pairs)
    ch, cp = scores.get(f"challenger_{key}"), scores.get(f"champion_{key}")
    if ch is not None and cp is not None and ch < cp + min_preference_gain - 1e-9:
        return (f"harvested preferences: challenger prefers the chosen text in {ch:.0%} of {which}, champion "
                f"{cp:.0%} (needs at least {min_preference_gain:+.0%})")
    return ""


def _preference_set(scores: Mapping[str, float], min_heldout_pairs: int) -> tuple[str, str]:
    """Which preference accuracy rule 4 compares (held-out pairs once there are enough), and its words."""
    n = scores.get("challenger_heldout_pairs", 0.0)
    if n >= max(min_heldout_pairs, 1) and "champion_heldout_preference_accuracy" in scores:
        return "heldout_preference_accuracy", f"{n:.0f} held-out pairs"
    return "preference_accuracy", "all pairs (DPO may have trained on some)"


def _user_note(scores: Mapping[str, float], min_heldout_pairs: int) -> str:
    """What rule 4 compared, for a promotion's reason ("" when nothing was)."""
    key, which = _preference_set(scores, min_heldout_pairs)
    ch, cp = scores.get(f"challenger_{key}"), scores.get(f"champion_{key}")
    if ch is None or cp is None:
        return ""
    return f"; prefers the chosen text of {which} in {ch:.0%} (champion {cp:.0%})"


# --------------------------------------------------------------------------- the decision's inputs
def user_scores(model: Any, tokenizer: Any, golden: tuple[dict, ...], pairs: list[dict]) -> dict[str, float]:
    """Golden log-likelihood (``gate.golden``) and preference accuracy/margin on the harvested pairs: all of
    them, and apart the held-out ones (``split: holdout``), which no DPO run trained on."""
    out: dict[str, float] = {}
    if golden:
        out["golden_loglik"] = completion_loglik(model, tokenizer, [(g["prompt"], g["completion"]) for g in golden])
    heldout = [p for p in pairs if p.get("split") == "holdout"]
    for prefix, subset in (("", pairs), ("heldout_", heldout)):
        if subset:
            pref = preference_scores(model, tokenizer, subset)
            out.update({f"{prefix}preference_accuracy": pref["preference_accuracy"],
                        f"{prefix}preference_margin": pref["preference_margin"]})
    if heldout:
        out["heldout_pairs"] = float(len(heldout))
    return out


def hf_export_agrees(model_dir: Path, prompt: str, new_tokens: int = 12) -> bool:
    """The model's HF export loads in ``transformers`` and continues ``prompt`` greedily exactly as lmops does."""
    try:
        from transformers import AutoModelForCausalLM  # lazy: transformers imports in ~1 s
        from transformers.utils import logging as hf_logging
    except ImportError:
        return False
    model, tokenizer, _ = load_model(model_dir)
    ids = (tokenizer.encode(prompt) or [tokenizer.eos_id])[: model.cfg.block_size - new_tokens]
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    ours = [t for t, _ in generate_tokens(model, ids, sp, tokenizer.eos_id)]
    del model  # one copy of the model at a time: the export and transformers' reading come next
    release_freed_memory()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            hf = AutoModelForCausalLM.from_pretrained(str(export_hf(model_dir, Path(tmp) / "hf"))).eval()
        except Exception:  # a folder transformers cannot load is exactly what this check reports
            return False
        ref = list(ids)
        with torch.no_grad():
            for _ in range(new_tokens):
                ref.append(int(hf(torch.tensor([ref])).logits[0, -1].argmax()))
    return ours == ref[len(ids):]

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
