"""Data tier: connectors turn files, folders and the stdlib corpus into raw rows (no validation here)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from _datahelp import data_params

from lmcore.data.clean import make_cleaner, record_id
from lmcore.data.sources import Refused, group_paragraphs, read, resolve, stdlib_files, stdlib_records

pytestmark = pytest.mark.data


def _rows(path, fmt="auto", **kw):
    inputs, refusals = resolve([str(path)], fmt)
    assert not refusals, refusals
    out = []
    for inp in inputs:
        for rb in read(inp, data_params(**kw)):
            out.extend(rb.texts)
    return out


def test_text_file_cut_at_paragraphs(tmp_path):
    f = tmp_path / "a.md"
    f.write_text("# Title\n\nfirst paragraph\nline two\n\n" + "x" * 50 + "\n\nlast one\n")
    texts = _rows(f, record_chars=40)
    assert texts[0].startswith("# Title") and "line two" in texts[0]
    assert any(t.startswith("x" * 50) for t in texts)  # a long paragraph stays whole
    assert "last one" in texts[-1]
    assert len(texts) == 3


def test_group_paragraphs_line_numbers():
    lines = ["a\n", "b\n", "\n", "c\n"]
    out = list(group_paragraphs(lines, limit=3))
    assert [(a, b) for _, a, b in out] == [(1, 3), (4, 4)]


def test_folder_recursive_include_exclude(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha text here\n")
    (tmp_path / "sub" / "b.md").write_text("beta text here\n")
    (tmp_path / "sub" / "c.log").write_text("not taken by default\n")
    (tmp_path / "skip.txt").write_text("excluded\n")
    inputs, refusals = resolve([str(tmp_path)], exclude=("skip.*",))
    assert not refusals
    assert sorted(p.path.name for p in inputs) == ["a.txt", "b.md"]
    inputs, _ = resolve([str(tmp_path)], include=("*.log",))
    assert [p.path.name for p in inputs] == ["c.log"]


def test_jsonl_fast_path_and_meta(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"row {i}", "k": i}) for i in range(5)) + "\n")
    inputs, _ = resolve([str(f)])
    (rb,) = list(read(inputs[0], data_params()))
    assert list(rb.texts.to_pylist()) == [f"row {i}" for i in range(5)] and rb.errors is None  # Arrow fast path
    assert json.loads(rb.meta[3]) == {"k": 3}


def test_jsonl_broken_line_is_a_row_error_not_lost(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "good one"}\n{"text": oops\n{"nottext": 1}\n{"text": "good two"}\n')
    inputs, _ = resolve([str(f)])
    (rb,) = list(read(inputs[0], data_params()))
    assert len(rb.texts) == 4
    assert [e is None for e in rb.errors] == [True, False, False, True]
    assert "invalid JSON" in rb.errors[1] and "line 2" in rb.errors[1]
    assert rb.uri[1].endswith("#L2")


def test_csv_and_parquet(tmp_path):
    df = pd.DataFrame({"body": ["first text", "second text"], "lang": ["en", "fr"]})
    df.to_csv(tmp_path / "a.csv", index=False)
    df.to_parquet(tmp_path / "a.parquet")
    for name in ("a.csv", "a.parquet"):
        inputs, _ = resolve([str(tmp_path / name)])
        (rb,) = list(read(inputs[0], data_params(), text_field="body"))
        assert rb.texts == ["first text", "second text"]
        assert json.loads(rb.meta[1]) == {"lang": "fr"}
    inputs, _ = resolve([str(tmp_path / "a.csv")])
    with pytest.raises(Refused, match="no column 'text'"):
        list(read(inputs[0], data_params()))


def test_format_override_and_sources(tmp_path):
    f = tmp_path / "notes.data"
    f.write_text('{"text": "as json"}\n')
    inputs, _ = resolve([str(f)], fmt="jsonl", source="mine")
    assert inputs[0].fmt == "jsonl" and inputs[0].source == "mine"
    inputs, _ = resolve([str(f)])
    assert inputs[0].fmt == "text" and inputs[0].source == "files"


def test_cleaning_makes_one_record_of_equal_texts():
    clean = make_cleaner(data_params())
    a = clean("cafe\u0301 \r\nline  \r\n\n")
    b = clean("caf\u00e9\nline")
    assert a == b and record_id(a) == record_id(b)
    raw = make_cleaner(data_params(normalize_nfc=False, normalize_newlines=False, strip_trailing_whitespace=False))
    assert raw("a \r\n") == "a \r\n"
    assert clean("bad \udcff").startswith("bad \ufffd")  # lone surrogates become U+FFFD (then quarantined)


def test_stdlib_corpus_is_deterministic_and_has_no_tests():
    files = stdlib_files()
    assert files and all("test" not in part.split("/")[:-1] for part in files)
    assert not any(f.startswith(("site-packages", "idlelib/idle_test", "lib2to3/tests")) for f in files)
    a = list(stdlib_records(2000, 50))
    b = list(stdlib_records(2000, 50))
    assert a == b and len(a) == 50
    assert all(uri.startswith("python-stdlib:") for _, uri, _ in a)
    assert all(len(t) <= 2000 or "\n\n" not in t for t, _, _ in a)
    meta = json.loads(a[0][2])
    assert meta["path"].endswith(".py") and meta["lines"][0] >= 1
