"""Data tier: the GX suite is loaded strictly, decides pass/fail, and every failing row gets its reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from _datahelp import ROOT, data_params

from lmcore.data.ingest import expectation_params
from lmcore.data.validate import Validator, load_suite
from lmcore.errors import LmopsError

pytestmark = pytest.mark.data


def _frame(texts, sources=None, dup=None):
    from lmcore.data.clean import record_id

    n = len(texts)
    return pd.DataFrame({
        "id": [record_id(t) for t in texts], "text": texts, "source": sources or ["jsonl"] * n,
        "uri": ["u"] * n, "created_at": pd.Timestamp.now(tz="UTC"), "meta": ["{}"] * n,
        "duplicate": dup or [False] * n,
    })


def test_suite_loads_every_expectation():
    suite = load_suite("raw_text", ROOT)
    spec = json.loads((ROOT / "expectations" / "raw_text.json").read_text())
    assert len(suite.gx_suite.expectations) == len(spec["expectations"]) >= 8


def test_lossy_or_broken_suite_is_an_error(tmp_path):
    (tmp_path / "expectations").mkdir()
    spec = json.loads((ROOT / "expectations" / "raw_text.json").read_text())
    spec["expectations"].append({"type": "expect_column_values_to_be_sparkly", "kwargs": {"column": "text"}})
    (tmp_path / "expectations" / "lossy.json").write_text(json.dumps(spec))
    with pytest.raises(LmopsError, match="only .* loaded|does not load"):
        load_suite("lossy", tmp_path)
    (tmp_path / "expectations" / "broken.json").write_text("{not json")
    with pytest.raises(LmopsError, match="not valid JSON"):
        load_suite("broken", tmp_path)
    with pytest.raises(LmopsError, match="not found"):
        load_suite("missing", tmp_path)


def test_rows_get_reasons_and_counts_match_gx(lmops_home: Path):
    v = Validator("raw_text", expectation_params(data_params(allowed_sources=("jsonl",))), lmops_home, ROOT)
    texts = ["a perfectly fine record", "tiny", "has a NUL \x00 byte inside", "bad bytes \ufffd in here ok",
             "x" * 200_000, "another fine record here", "from an unknown source!"]
    sources = ["jsonl"] * 6 + ["elsewhere"]
    dup = [False] * 5 + [True, False]
    out = v.validate(_frame(texts, sources, dup))
    assert out.success is False
    r = out.reasons.tolist()
    assert r[0] == ""
    assert "lengths_to_be_between(text)" in r[1] and "lengths_to_be_between(text)" in r[4]
    assert "not_match_regex(text)" in r[2] and "not_match_regex(text)" in r[3]
    assert "in_set(duplicate)" in r[5]
    assert "in_set(source)" in r[6]
    assert out.failed["expect_column_value_lengths_to_be_between(text)"] == 2
    assert int(out.bad.sum()) == 6
    clean = v.validate(_frame(["only good rows here", "and another good one"]))
    assert clean.success and not clean.bad.any()
    docs = v.build_docs()
    assert docs and Path(docs).is_file() and str(lmops_home) in docs


def test_schema_failure_fails_every_row(lmops_home: Path):
    v = Validator("raw_text", expectation_params(data_params()), lmops_home, ROOT)
    df = _frame(["fine text number one", "fine text number two"]).drop(columns=["meta"])
    out = v.validate(df)
    assert not out.success and out.bad.all()
    assert "expect_table_columns_to_match_set" in out.reasons[0]
