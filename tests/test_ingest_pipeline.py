"""Data tier: the fast ingest path (Arrow cleaning, JSONL read in pieces, hashing worker, reader thread)
gives exactly what the plain per-row path gives: same texts, same ids, same duplicates, no row lost."""

from __future__ import annotations

import hashlib
import json
import random

import pyarrow as pa
import pytest
from _datahelp import data_params, make_workspace

from lmcore.data import digests, sources
from lmcore.data.clean import clean_array, make_cleaner, record_id
from lmcore.data.ingest import ingest
from lmcore.data.sources import read, resolve
from lmcore.data.versions import DataRegistry

pytestmark = pytest.mark.data

FLAGS = [(True, True, True), (False, True, True), (True, False, True), (True, True, False), (False, False, False)]


def _texts(rng: random.Random, n: int, alphabet: list[str]) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(n)]


@pytest.mark.parametrize("flags", FLAGS)
def test_clean_array_matches_the_python_cleaner(flags):
    nfc, newlines, strip = flags
    params = data_params(normalize_nfc=nfc, normalize_newlines=newlines, strip_trailing_whitespace=strip)
    clean = make_cleaner(params)
    rng = random.Random(7)
    pieces = ["a", "b", " ", "\t", "\n", "\r", "\f", "\v", "x\r\n", " \n", "\t\r\n"]
    for trial in range(300):
        texts = _texts(rng, rng.randint(0, 8), pieces + (["e\u0301"] if trial % 5 == 0 else []))
        typ = pa.large_string() if trial % 2 else pa.string()
        padded = pa.array([" \r\n"] + texts + ["\r \n"], typ)  # a slice must not see its neighbours' bytes
        for arr in (pa.array(texts, typ), padded.slice(1, len(texts))):
            out = clean_array(arr, params)
            if out is None:  # non-ASCII under NFC: the Python path takes the chunk
                assert nfc and not all(t.isascii() for t in texts)
            else:
                assert out.to_pylist() == [clean(t) for t in texts]


def test_sha256_worker_matches_hashlib_and_survives_its_death(monkeypatch):
    monkeypatch.setattr(digests, "MIN_ROWS", 1)
    rng = random.Random(3)
    texts = _texts(rng, 3000, ["a", "é", "€", "\n", " ", "😀"])
    with digests.Sha256Worker() as worker:
        for typ in (pa.string(), pa.large_string()):
            full = pa.array(["x"] + texts + ["y"], typ)
            for arr in (full, full.slice(1, len(texts)), full.slice(5, 1)):
                want = b"".join(hashlib.sha256(t.encode()).digest() for t in arr.to_pylist())
                assert worker.digests(arr) == want
        assert worker.proc is not None
        worker.proc.kill()
        worker.proc.wait()
        arr = pa.array(texts)
        assert worker.digests(arr) == digests.sha256_digests(arr)  # hashed here from now on
        assert worker.proc is None and worker.failed


def test_jsonl_read_in_pieces_keeps_every_row_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_BLOCK_BYTES", 700)
    monkeypatch.setattr(sources, "_PARSE_BYTES", 200)
    lines = [json.dumps({"text": f"row {i} " + "w" * (i % 7), "k": i}) for i in range(60)]
    lines[20] = json.dumps({"text": "a line longer than one parse piece " + "z" * 300, "k": 20})
    lines[41] = '{"text": "broken'
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    inputs, _ = resolve([str(f)])
    batches = list(read(inputs[0], data_params(chunk_rows=16)))
    texts, metas, errors = [], [], []
    for rb in batches:
        got = rb.texts.to_pylist() if isinstance(rb.texts, pa.Array) else list(rb.texts)
        texts += got
        metas += rb.meta if isinstance(rb.meta, list) else [rb.meta] * len(got)
        errors += [e for e in rb.errors or () if e]
    assert len(errors) == 1 and errors[0].startswith("line 42: invalid JSON")
    assert texts[:41] == [json.loads(x)["text"] for x in lines[:41]] and texts[41] == lines[41]
    assert texts[42:] == [json.loads(x)["text"] for x in lines[42:]]
    assert [json.loads(m)["k"] for m in metas[:41]] == list(range(41))
    assert all(len(rb.texts) <= 16 for rb in batches)


def test_large_ingest_through_worker_and_reader_thread(tmp_path, lmops_home, monkeypatch):
    asked = []
    ask = digests.Sha256Worker._ask
    monkeypatch.setattr(digests.Sha256Worker, "_ask", lambda self, arr: asked.append(len(arr)) or ask(self, arr))
    params = data_params(chunk_rows=5000, normalize_nfc=False)  # non-ASCII stays on the Arrow path too
    n = 14_000
    texts = [f"record number {i} caf\u00e9 \u2014 {'x' * (i % 13)}  " for i in range(n)]
    texts[6000] = texts[100]  # a duplicate across chunks
    texts[9000] = texts[8999]  # ... and one inside a chunk
    lines = [json.dumps({"text": t}) for t in texts]
    lines[12000] = '{"text": null}'  # its chunk takes the per-row path
    big, bad = tmp_path / "big.jsonl", tmp_path / "bad.jsonl"
    big.write_text("\n".join(lines) + "\n")
    bad.write_text('{"text": "one more record, after the big file"}\n{"text": "broken\n')
    reg = DataRegistry(make_workspace(tmp_path / "ws"), lmops_home)
    r = ingest([str(big), str(bad)], params, registry=reg, progress=False)
    assert asked and all(k >= digests.MIN_ROWS for k in asked)
    assert (r.rows, r.accepted, r.quarantined) == (n + 2, n - 2, 4)
    assert r.reasons["expect_column_values_to_be_in_set(duplicate)"] == 2 and r.reasons["unparseable"] == 1
    assert r.reasons["expect_column_values_to_not_be_null(text)"] == 1
    clean = make_cleaner(params)
    want = [clean(t) for i, t in enumerate(texts) if i not in (6000, 9000, 12000)]
    want.append("one more record, after the big file")
    got = reg.read()
    assert got["text"].tolist() == want
    assert got["id"].tolist() == [record_id(t) for t in want]
    assert {"wait", "read", "clean", "validate"} <= set(r.timings)
