"""Harvesting feedback into versioned `feedback` records: splits, PII quarantine, watermark, idempotence."""

from __future__ import annotations

import json
import threading

import pytest

from lmcore.config import FeedbackParams, Params
from lmcore.feedback.harvest import build_records, harvest, holdout_score, is_trainable
from lmcore.feedback.store import FeedbackStore
from lmcore.settings import Settings

pytestmark = pytest.mark.data


@pytest.fixture()
def env(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    settings = Settings(workspace=ws, home=tmp_path / "home")
    store = FeedbackStore(settings.feedback_db)
    yield settings, store
    store.close()


def _generation(store, gid, prompt, completion):
    store.log_generation(id=gid, model_version="3", prompt=prompt, completion=completion, params={},
                         latency_ms=1, prompt_tokens=1, completion_tokens=1)


def _fill(store, n_up=6, tag="a"):
    """Thumbs-up, corrections, thumbs-down and personal data; returns the expected counts."""
    for i in range(n_up):
        gid = f"{tag}{i:07x}up"
        _generation(store, gid, f"def add_{tag}{i}(a, b):\n", "    return a + b\n")
        store.add_feedback(gid, 1)
    gid = f"{tag}000c0rr"
    _generation(store, gid, f"# sort a list {tag}\n", "print('no')\n")
    store.add_feedback(gid, -1, correction="items.sort()\n", comment="use sort")
    gid = f"{tag}000d0wn"
    _generation(store, gid, f"# say hello {tag}\n", "zzzzzzzzzzzzzzzz\n")
    store.add_feedback(gid, -1)
    gid = f"{tag}000e1a1"
    _generation(store, gid, f"# contact {tag}\n", "mail jane.doe@example.com for help\n")
    store.add_feedback(gid, 1)
    gid = f"{tag}000ca4d"
    _generation(store, gid, f"# pay {tag}\n", "card 4111 1111 1111 1111 ok\n")
    store.add_feedback(gid, 1)
    return n_up + 4


def test_records_take_the_correction_and_mark_negatives():
    from lmcore.feedback.store import FeedbackRow

    rows = [FeedbackRow(1, "g1", 1, None, None, 0.0, "P:", "good", "1"),
            FeedbackRow(2, "g2", -1, "fixed", "c", 0.0, "P:", "bad", "1"),
            FeedbackRow(3, "g3", -1, None, None, 0.0, "P:", "bad", "1")]
    recs = build_records(rows, holdout_fraction=0.0)
    assert [r["text"] for r in recs] == ["P:good", "P:fixed", "P:bad"]
    assert [r["meta"]["split"] for r in recs] == ["train", "train", "negative"]
    assert [r["meta"]["prompt_chars"] for r in recs] == [2, 2, 2]  # where the prompt ends: masked in training
    assert recs[0]["uri"] == "feedback://g1" and recs[1]["meta"]["corrected"] is True
    assert all(r["meta"]["split"] == "holdout" for r in build_records(rows[:2], holdout_fraction=0.999999))
    assert not is_trainable(json.dumps({"split": "negative"})) and is_trainable("{}")
    scores = [holdout_score(f"id{i}") for i in range(2000)]
    assert 0.15 < sum(s < 0.2 for s in scores) / 2000 < 0.25 and holdout_score("x") == holdout_score("x")


def test_harvest_validates_versions_and_is_idempotent(env):
    settings, store = env
    params = Params(feedback=FeedbackParams(min_new_records=5, holdout_fraction=0.25))
    rows = _fill(store)
    res = harvest(settings, params, store=store)
    assert res.new_rows == rows and res.quarantined == 2  # the e-mail and the card number
    assert res.negatives == 1 and res.train_records + res.holdout_records == 7
    assert res.version and res.should_train and res.watermark == rows

    from lmcore.data.versions import DataRegistry

    reg = DataRegistry.open(settings)
    df = reg.read(res.version, kinds=("feedback",))
    assert len(df) == 8 and set(df["source"]) == {"feedback"}
    assert not df["text"].str.contains("@example.com|4111").any()
    metas = [json.loads(m) for m in df["meta"]]
    assert sorted(m["split"] for m in metas).count("negative") == 1
    assert any(t.rstrip().endswith("items.sort()") for t in df["text"])
    assert any(v.id == res.version for v in reg.versions())

    # Training reads each record as its served prompt (masked) and the correction or liked completion.
    from lmcore.data.prepare import encode_doc
    from lmcore.data.served import parse_served
    from lmcore.data.tokenizer import Tokenizer

    docs = {rid: text for rid, text, _ in reg.iter_records(res.version)}
    fixed = next(d for d in docs.values() if (parse_served(d) or ("", ""))[1] == "items.sort()")
    assert parse_served(fixed) == ("# sort a list a\n", "items.sort()")
    tok = Tokenizer.train(["# sort a list a\nitems.sort()\n"] * 4, "byte")
    ids, mask = encode_doc(tok, fixed)
    assert tok.decode(i for i, m in zip(ids, mask, strict=True) if m) == "items.sort()"
    assert tok.decode(ids) == "# sort a list a\nitems.sort()" and ids[-1] == tok.eos_id and mask[-1] == 1

    again = harvest(settings, params, store=store)  # nothing new: nothing added
    assert (again.new_rows, again.version, again.should_train) == (0, None, False)
    assert reg.versions()[-1].id == res.version


def test_concurrent_harvests_never_double_append(env):
    settings, store = env
    params = Params(feedback=FeedbackParams(min_new_records=1))
    rows = _fill(store, n_up=4, tag="b")
    results, errors = [], []

    def run():
        try:
            results.append(harvest(settings, params))
        except Exception as e:  # pragma: no cover - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.new_rows for r in results) == [0, rows]
    from lmcore.data.versions import DataRegistry

    df = DataRegistry.open(settings).read(kinds=("feedback",))
    assert len(df) == rows - 2 and df["id"].is_unique


def test_a_failed_ingest_keeps_the_rows_for_the_next_harvest(env, monkeypatch):
    settings, store = env
    params = Params(feedback=FeedbackParams(min_new_records=1))
    rows = _fill(store, n_up=2, tag="c")
    import lmcore.feedback.harvest as harvest_mod  # the name harvest calls

    real = harvest_mod.ingest_records

    def broken(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(harvest_mod, "ingest_records", broken)
    with pytest.raises(OSError):
        harvest(settings, params, store=store)
    assert store.watermark() == rows  # claimed ...
    monkeypatch.setattr(harvest_mod, "ingest_records", real)
    res = harvest(settings, params, store=store)  # ... and handed back
    assert res.new_rows == rows and res.version is not None
