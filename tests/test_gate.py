"""The promotion gate's decision on its own: every rule, on plain numbers (no MLflow, no model)."""

from __future__ import annotations

import math

import pytest

from lmcore.registry.gate import GateDecision, decide, finite_metrics, is_champion

pytestmark = pytest.mark.code

OK = {"non_empty_text": True, "deterministic_under_seed": True, "finite_logits": True, "finite_loss": True}


def _decide(challenger="2", champion="1", checks=None, ch=1.50, champ=1.60, min_imp=0.01, note="") -> GateDecision:
    return decide(challenger, champion, checks=OK if checks is None else checks, challenger_bpb=ch,
                  champion_bpb=champ, min_improvement=min_imp, champion_note=note)


def test_first_challenger_without_champion_is_promoted():
    d = _decide(champion=None, champ=None)
    assert d.promoted and d.champion is None and d.champion_bpb is None
    assert d.reason == "no comparable champion; challenger bpb 1.5000"
    assert not d.already_champion


def test_unevaluable_champion_does_not_block_and_says_why():
    d = _decide(champ=None, note="; champion v1 could not be evaluated (corrupt)")
    assert d.promoted and d.champion == "1"
    assert d.reason.endswith("; champion v1 could not be evaluated (corrupt)")


def test_a_champion_scoring_nan_does_not_hold_the_alias():
    d = _decide(champ=math.nan)
    assert d.promoted and d.reason == "no comparable champion; challenger bpb 1.5000 (champion v1 scores nan)"
    assert not _decide(champ=math.nan, checks={**OK, "finite_loss": False}).promoted  # the checks still count


def test_enough_improvement_promotes_and_too_little_rejects():
    better = _decide(ch=1.50, champ=1.60, min_imp=0.05)
    assert better.promoted and "beats champion v1 1.6000 by 0.1000 >= 0.05" in better.reason
    exact = _decide(ch=1.50, champ=1.75, min_imp=0.25)  # exactly the threshold passes (binary-exact numbers)
    assert exact.promoted
    short = _decide(ch=1.58, champ=1.60, min_imp=0.05)
    assert not short.promoted and "does not beat champion v1 1.6000 by >= 0.05" in short.reason
    worse = _decide(ch=2.0, champ=1.60, min_imp=0.0)
    assert not worse.promoted and "(improvement -0.4000)" in worse.reason


def test_failed_behaviour_checks_reject_whatever_the_numbers():
    checks = {**OK, "finite_logits": False, "finite_loss": False}
    for champion, champ in ((None, None), ("1", 9.0)):
        d = _decide(champion=champion, champ=champ, checks=checks)
        assert not d.promoted and d.reason == "failed behaviour checks: finite_logits, finite_loss"
        assert d.checks == checks


def test_already_champion_decides_nothing_and_is_not_a_promotion():
    # the one answer for both the flow's re-run and a direct registry gate: the alias does not move
    d = decide("3", "3", checks={}, challenger_bpb=1.2, champion_bpb=1.2, min_improvement=0.01)
    assert not d.promoted and d.already_champion
    assert d.reason == "v3 is already the champion (nothing new to gate)"
    # nothing was evaluated: no numbers needed, and checks cannot turn it into a rejection
    assert not decide("3", "3", checks={}, challenger_bpb=None, champion_bpb=None, min_improvement=0).promoted
    bad = decide("3", "3", checks={"finite_loss": False}, challenger_bpb=None, champion_bpb=None, min_improvement=0)
    assert "already the champion" in bad.reason


def test_versions_compare_as_strings_and_a_decision_serializes():
    assert is_champion(3, "3") and not is_champion("3", None) and not is_champion("3", "4")
    d = decide(2, 1, checks=OK, challenger_bpb=1.0, champion_bpb=2.0, min_improvement=0.1)
    assert d.challenger == "2" and d.champion == "1"
    assert d.to_dict() == {"promoted": True, "reason": d.reason, "challenger": "2", "champion": "1",
                           "challenger_bpb": 1.0, "champion_bpb": 2.0, "checks": OK, "scores": {}}


def test_a_challenger_needs_numbers_unless_it_is_the_champion():
    with pytest.raises(ValueError, match="bits per byte"):
        decide("2", "1", checks=OK, challenger_bpb=None, champion_bpb=1.0, min_improvement=0.0)


def test_finite_metrics_needs_both_numbers_finite():
    assert finite_metrics({"val_loss": 2.0, "bits_per_byte": 1.5})
    assert not finite_metrics({"val_loss": math.nan, "bits_per_byte": 1.5})
    assert not finite_metrics({"val_loss": 2.0, "bits_per_byte": math.inf})
    assert not finite_metrics({"val_loss": 2.0})
