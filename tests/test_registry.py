"""Data tier: DVC-backed dataset versions: append-only shards, exact read-back, git commits, fresh clones."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from _datahelp import env_for, make_workspace

from lmcore.data.clean import record_id
from lmcore.data.versions import DataRegistry
from lmcore.errors import LmopsError

pytestmark = pytest.mark.data


def _records(texts, source="jsonl"):
    return pd.DataFrame({
        "id": [record_id(t) for t in texts], "text": texts, "source": source, "uri": "test:",
        "created_at": pd.Timestamp("2024-01-02T03:04:05Z"), "meta": "{}",
    })


def _git(ws, *args):
    return subprocess.run(["git", "-C", str(ws), *args], check=True, capture_output=True, text=True).stdout


def test_versions_are_append_only_and_read_back_exactly(tmp_path, lmops_home):
    ws = make_workspace(tmp_path / "ws")
    reg = DataRegistry(ws, lmops_home)
    v1_df = _records([f"first batch record {i}" for i in range(20)])
    v1 = reg.add_shard(v1_df, "raw", {"accepted": 20, "sources": {"jsonl": 20}})
    v2 = reg.add_shard(_records([f"second batch record {i}" for i in range(7)], "files"), "raw",
                       {"accepted": 7, "sources": {"files": 7}})
    v3 = reg.add_shard(_records(["feedback text number one"], "feedback"), "feedback", {"sources": {"feedback": 1}})
    assert [v.id for v in reg.versions()] == [v1.id, v2.id, v3.id]
    assert len({v1.id, v2.id, v3.id}) == 3 and reg.current().id == v3.id
    assert (v2.rows, v3.rows, v3.rows_by_kind) == (27, 28, {"raw": 27, "feedback": 1})
    assert v2.sources == {"jsonl": 20, "files": 7} and v3.parent == v2.id
    assert set(v1.shards) < set(v2.shards) and v2.bytes > v1.bytes > 0
    back = reg.read(v1.id)
    pd.testing.assert_frame_equal(back.astype(str), v1_df.astype(str))
    assert len(reg.read(v2.id)) == 27 and len(reg.read()) == 28
    assert len(reg.read(v3.id, kinds=("raw",))) == 27
    assert [i for i, *_ in reg.iter_records(v1.id)] == v1_df["id"].tolist()
    assert reg.known_ids() == set(reg.read()["id"])
    assert reg.get(v1.id[:6]).id == v1.id
    with pytest.raises(LmopsError, match="unknown dataset version"):
        reg.get("nope")
    assert (lmops_home / "dvc-remote" / "files" / "md5").is_dir()  # pushed to the default local remote
    assert reg.check() == []


def test_git_commit_false_never_commits(tmp_path, lmops_home):
    ws = make_workspace(tmp_path / "ws", git=True)
    reg = DataRegistry(ws, lmops_home, git_commit=False)
    v = reg.add_shard(_records(["some record text here"]), "raw", {})
    assert v.git_rev is None
    assert subprocess.run(["git", "-C", str(ws), "log"], capture_output=True).returncode != 0  # no commits


def test_git_commit_true_commits_only_registry_files_and_a_clone_needs_pull(tmp_path, lmops_home):
    ws = make_workspace(tmp_path / "ws", git=True)
    (ws / "unrelated.txt").write_text("user's own work, never committed by lmops\n")
    reg = DataRegistry(ws, lmops_home, git_commit=True)
    v1 = reg.add_shard(_records([f"committed record {i}" for i in range(5)]), "raw", {})
    assert v1.git_rev and _git(ws, "log", "-1", "--format=%s").strip() == f"lmops: dataset {v1.id}"
    committed = set(_git(ws, "show", "--name-only", "--format=", "HEAD").split())
    assert "data/raw.dvc" in committed and "data/versions.jsonl" in committed
    assert "unrelated.txt" not in committed and "params.yaml" not in committed
    assert not any(p.startswith("data/raw/") for p in committed)  # the data goes to DVC, not git

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    creg = DataRegistry(clone, lmops_home)
    assert creg.current().id == v1.id
    with pytest.raises(LmopsError, match=r"not in the DVC cache.*dvc pull"):
        creg.read()
    creg.ensure_initialized()  # writes .dvc/config.local with the default remote in the lmops home
    r = subprocess.run([sys.executable, "-m", "dvc", "pull", "-q"], cwd=clone, env=env_for(clone, lmops_home),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pd.testing.assert_frame_equal(creg.read().astype(str), reg.read(v1.id).astype(str))
