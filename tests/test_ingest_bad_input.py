"""Data tier: bad input never crashes the pipeline or loses rows: bad rows are quarantined with their
reason, bad files refused by name, and an interrupted ingest leaves the previous version intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from _datahelp import data_params, env_for, make_workspace

from lmcore.data.ingest import ingest
from lmcore.data.versions import DataRegistry
from lmcore.errors import LmopsError

pytestmark = pytest.mark.data
LMOPS = str(Path(sys.executable).parent / "lmops")


@pytest.fixture()
def reg(tmp_path, lmops_home):
    return DataRegistry(make_workspace(tmp_path / "ws"), lmops_home)


def _ok(r):
    assert r.rows == r.accepted + r.quarantined + r.skipped_known
    return r


def _quarantine(r):
    return pd.read_parquet(r.quarantine_path)


def _good(path: Path, n=5, prefix="good"):
    lines = (json.dumps({"text": f"{prefix} record number {i} of the batch"}) for i in range(n))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_invalid_utf8_and_nul_rows_are_quarantined(tmp_path, reg):
    (tmp_path / "bad.txt").write_bytes(b"valid start of a text file\n\nbroken \xff\xfe bytes in this paragraph\n")
    jl = _good(tmp_path / "a.jsonl")
    with open(jl, "a") as f:
        f.write(json.dumps({"text": "a NUL \u0000 hides in this row"}) + "\n")
    r = _ok(ingest([str(tmp_path / "bad.txt"), str(jl)], data_params(record_chars=10), registry=reg, progress=False))
    assert r.accepted == 6 and r.quarantined == 2 and r.version
    q = _quarantine(r)
    assert q["reasons"].str.contains("not_match_regex").all()
    assert q["text"].str.contains("\ufffd").sum() == 1 and q["text"].str.contains("\x00").sum() == 1


def test_bad_files_are_refused_by_name(tmp_path, reg):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary" * 100)
    pd.DataFrame({"body": ["no text column here at all"]}).to_csv(tmp_path / "t.csv", index=False)
    good = _good(tmp_path / "g.jsonl")
    r = _ok(ingest([str(tmp_path / n) for n in ("empty.txt", "blob.txt", "t.csv")] + [str(good)],
                   data_params(), registry=reg, progress=False))
    assert r.accepted == 5
    text = "\n".join(r.refusals)
    assert "empty.txt: empty file" in text and "blob.txt: binary file" in text
    assert "t.csv: CSV has no column 'text'" in text
    with pytest.raises(LmopsError, match=r"nothing ingested: .*empty\.txt: empty file"):
        ingest([str(tmp_path / "empty.txt")], data_params(), registry=reg, progress=False)


def test_missing_path_and_symlink_loops(tmp_path, reg):
    with pytest.raises(LmopsError, match=r"nothing to ingest: .*does-not-exist: no such file or directory"):
        ingest([str(tmp_path / "does-not-exist")], data_params(), registry=reg, progress=False)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(LmopsError, match="loop: symlink loop"):
        ingest([str(loop)], data_params(), registry=reg, progress=False)
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    _good(d / "sub" / "x.jsonl")
    (d / "sub" / "back").symlink_to(d, target_is_directory=True)
    r = _ok(ingest([str(d)], data_params(), registry=reg, progress=False))
    assert r.accepted == 5 and any("symlink loop" in x for x in r.refusals)


def test_broken_jsonl_line_is_quarantined_and_reingest_is_a_noop(tmp_path, reg):
    f = _good(tmp_path / "a.jsonl", n=10)
    with open(f, "a") as fh:
        fh.write('{"text": "unterminated\n')
    r1 = _ok(ingest([str(f)], data_params(), registry=reg, progress=False))
    assert (r1.accepted, r1.quarantined) == (10, 1)
    assert _quarantine(r1)["reasons"].str.startswith("unparseable: invalid JSON").all()
    r2 = _ok(ingest([str(f)], data_params(), registry=reg, progress=False))
    assert (r2.rows, r2.skipped_known, r2.accepted, r2.quarantined, r2.version) == (11, 11, 0, 0, None)
    assert len(reg.versions()) == 1


def test_duplicates_within_and_across_batches(tmp_path, reg):
    rows = [{"text": "the same text twice over"}] * 3 + [{"text": "a different text entirely"}]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    r1 = _ok(ingest([str(f)], data_params(chunk_rows=2), registry=reg, progress=False))  # dup spans chunks
    assert (r1.accepted, r1.quarantined) == (2, 2)
    assert _quarantine(r1)["reasons"].str.contains(r"in_set\(duplicate\)").all()
    g = tmp_path / "e.jsonl"
    g.write_text(json.dumps({"text": "a different text entirely"}) + "\n" + json.dumps({"text": "brand new text row"}))
    r2 = _ok(ingest([str(g)], data_params(), registry=reg, progress=False))
    assert (r2.skipped_known, r2.accepted) == (1, 1)
    assert reg.read()["text"].tolist().count("a different text entirely") == 1


def test_50mb_single_line_is_quarantined_not_fatal(tmp_path, reg):
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        f.write("y" * (50 << 20))
        f.write("\n\nand a normal paragraph after the giant line\n")
    r = _ok(ingest([str(big)], data_params(), registry=reg, progress=False))
    assert (r.accepted, r.quarantined) == (1, 1)
    assert "lengths_to_be_between" in _quarantine(r)["reasons"][0]


def test_mostly_bad_batch_is_refused_and_registry_untouched(tmp_path, reg):
    first = _ok(ingest([str(_good(tmp_path / "a.jsonl"))], data_params(), registry=reg, progress=False))
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"x{i}"}) for i in range(8)) + "\n"
                 + json.dumps({"text": "one good row among the short ones"}) + "\n")
    r = _ok(ingest([str(f)], data_params(max_failure_rate=0.5), registry=reg, progress=False))
    assert r.batch_refused and r.version is None and (r.accepted, r.quarantined) == (0, 9)
    assert [v.id for v in reg.versions()] == [first.version]
    q = _quarantine(r)
    assert (q["reasons"] == "batch_refused").sum() == 1
    # the good row of a refused batch is not "known": a fixed batch takes it
    assert _ok(ingest([str(f)], data_params(max_failure_rate=1.0), registry=reg, progress=False)).accepted == 1


@pytest.mark.slow
def test_sigkill_mid_ingest_leaves_previous_version_intact(tmp_path, lmops_home):
    ws = make_workspace(tmp_path / "ws", chunk_rows=5000)
    env = env_for(ws, lmops_home)
    small = _good(tmp_path / "small.jsonl", n=20)
    out = subprocess.run([LMOPS, "ingest", str(small), "--json"], cwd=ws, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert (res["rows"], res["accepted"], res["quarantined"]) == (20, 20, 0) and res["version"]
    v1 = res["version"]
    shown = json.loads(subprocess.run([LMOPS, "data", "show", "--json"], cwd=ws, env=env, capture_output=True,
                                      text=True, check=True).stdout)
    assert shown["id"] == v1 and shown["rows"] == 20
    listed = json.loads(subprocess.run([LMOPS, "data", "versions", "--json"], cwd=ws, env=env, capture_output=True,
                                       text=True, check=True).stdout)
    assert [v["id"] for v in listed["versions"]] == [v1]
    before = DataRegistry(ws, lmops_home).read(v1)

    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for i in range(60_000):
            f.write(json.dumps({"text": f"a longer record number {i} to keep the ingest busy"}) + "\n")
    proc = subprocess.Popen([LMOPS, "ingest", str(big), "--json"], cwd=ws, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = ws / "data" / ".staging"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(staging.glob("*.parquet")):
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    reg = DataRegistry(ws, lmops_home)
    assert reg.current().id == v1
    pd.testing.assert_frame_equal(reg.read(v1), before)
    reg.ensure_initialized()  # the next writer cleans up after the killed one
    assert reg.check() == []
    assert not any(staging.glob("*"))
    st = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "data/raw.dvc"], cwd=ws, env=env,
                        capture_output=True, text=True)
    assert st.returncode == 0 and json.loads(st.stdout or "{}") == {}, st.stdout + st.stderr
