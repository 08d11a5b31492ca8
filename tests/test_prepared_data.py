"""Which prepared folder a command uses (lmcore.data.prepared): every branch but the registry's
(that one is tests/test_sweep.py::test_sweep_defaults_to_the_current_dataset_version)."""

from __future__ import annotations

import shutil

import pytest
from _lm_helpers import tiny_params, write_corpus

from lmcore.data.prepare import META
from lmcore.data.prepared import WORKSPACE_PREPARED, resolve_prepared
from lmcore.errors import LmopsError

pytestmark = pytest.mark.data


@pytest.fixture
def ws(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.setenv("LMOPS_WORKSPACE", str(ws))
    monkeypatch.setenv("LMOPS_HOME", str(tmp_path / "home"))
    return ws


def test_text_is_prepared_once_into_a_content_keyed_folder(ws, tmp_path):
    p = tiny_params()
    corpus = write_corpus(tmp_path / "corpus", n_files=3)
    out, version = resolve_prepared(corpus, p)
    assert out.parent == tmp_path / "home" / "runs" / "prepared" and out.name.startswith("text-")
    assert version.startswith("files-")
    stamp = (out / META).stat().st_mtime_ns
    assert resolve_prepared(str(corpus), p) == (out, version) and (out / META).stat().st_mtime_ns == stamp
    assert resolve_prepared(out, p) == (out, version)  # a prepared folder is used as it is
    (corpus / "doc0.txt").write_text("something else entirely, and long enough to keep.\n")
    assert resolve_prepared(corpus, p)[0] != out  # changed files: a new folder


def test_a_named_text_folder_is_reused_only_on_resume(ws, tmp_path):
    p = tiny_params()
    corpus = write_corpus(tmp_path / "corpus", n_files=3)
    target = tmp_path / "run" / "data"
    out, version = resolve_prepared(corpus, p, text_dir=target)
    assert out == target and version.startswith("files-")
    stamp = (out / META).stat().st_mtime_ns
    assert resolve_prepared(corpus, p, text_dir=target, resume=True) == (out, version)
    assert (out / META).stat().st_mtime_ns == stamp
    resolve_prepared(corpus, p, text_dir=target)
    assert (out / META).stat().st_mtime_ns != stamp


def test_without_data_the_workspace_folder_then_an_error(ws, tmp_path):
    p = tiny_params()
    with pytest.raises(LmopsError, match="no dataset version yet and no prepared data in"):
        resolve_prepared(None, p)
    prepared, version = resolve_prepared(write_corpus(tmp_path / "corpus", n_files=3), p)
    shutil.copytree(prepared, ws / WORKSPACE_PREPARED)
    assert resolve_prepared(None, p) == (ws / WORKSPACE_PREPARED, version)
    with pytest.raises(LmopsError, match="corpus not found"):
        resolve_prepared(tmp_path / "missing", p)
