"""Preference pairs from feedback: corrections and thumbs on the same prompt pair up, each naming the model
version that served the rejected text; harvested through the real store, GX suite and data registry."""

from __future__ import annotations

import json

import pytest

from lmcore.config import FeedbackParams, Params
from lmcore.data.versions import DataRegistry
from lmcore.feedback.harvest import harvest, preference_pairs, read_pairs
from lmcore.feedback.store import FeedbackRow, FeedbackStore
from lmcore.settings import Settings

pytestmark = pytest.mark.data


def test_pairs_from_corrections_and_ratings():
    rows = [FeedbackRow(1, "g1", -1, "fixed", None, 1.0, "P:", "bad", "3"),  # correction: fixed > bad
            FeedbackRow(2, "g2", 1, None, None, 2.0, "Q:", "good", "3"),  # up and down on Q pair up
            FeedbackRow(3, "g3", -1, None, None, 3.0, "Q:", "worse", "4"),
            FeedbackRow(4, "g4", -1, None, None, 4.0, "R:", "alone", "4"),  # unpaired: evaluation only
            FeedbackRow(5, "g5", 1, "same", None, 5.0, "S:", "same", "4"),  # a "correction" equal to the text
            FeedbackRow(6, "g6", 1, None, None, 6.0, "Q:", "worse", "4")]  # same text up and down: no pair
    pairs = preference_pairs(rows)
    got = [(p["prompt"], p["chosen"], p["rejected"], p["model_version"], p["pair"]) for p in pairs]
    assert got == [("P:", "fixed", "bad", "3", "correction"), ("Q:", "good", "worse", "4", "ratings")]


def test_harvest_versions_pairs_and_quarantines_personal_data(tmp_path):
    settings = Settings(workspace=tmp_path / "ws", home=tmp_path / "home")
    settings.workspace.mkdir()
    store = FeedbackStore(settings.feedback_db)
    try:
        for i, (prompt, completion, rating, correction, version) in enumerate([
            ("# sort the list\n", "print('no')\n", -1, "items.sort()\n", "1"),
            ("# greet the user\n", "hello there, friend\n", 1, None, "1"),
            ("# greet the user\n", "go away, whoever you are\n", -1, None, "2"),
            ("# who to ask\n", "nobody knows, sorry\n", -1, "mail jane.doe@example.com\n", "2"),
        ]):
            gid = f"g{i:07d}"
            store.log_generation(id=gid, model_version=version, prompt=prompt, completion=completion, params={},
                                 latency_ms=1, prompt_tokens=1, completion_tokens=1)
            store.add_feedback(gid, rating, correction=correction)
        params = Params(feedback=FeedbackParams(min_new_records=1, holdout_fraction=0.0))
        res = harvest(settings, params, store=store)
    finally:
        store.close()
    assert res.pairs == 2  # the correction and the up/down on one prompt; the e-mail pair is quarantined
    pairs = sorted(read_pairs(DataRegistry.open(settings)), key=lambda p: p["prompt"])
    assert [(p["chosen"], p["rejected"], p["model_version"], p["pair"], p["split"]) for p in pairs] == [
        ("hello there, friend\n", "go away, whoever you are\n", "2", "ratings", "train"),
        ("items.sort()\n", "print('no')\n", "1", "correction", "train")]
    sft = [t for _, t, _ in DataRegistry.open(settings).iter_records()]
    assert not any(t.startswith('{"prompt"') for t in sft)  # pairs never reach SFT as text
    assert json.loads(next(iter(DataRegistry.open(settings).read(kinds=("preference",))["meta"])))["generation_id"]
