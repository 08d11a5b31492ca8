"""Tables that read on an 80-column terminal: `lmops models` and `lmops data versions` show a few
columns whole by default, every column with --wide, and every value in full with --json."""

from __future__ import annotations

import json

import pytest

from lmcore.cli import main

pytestmark = pytest.mark.code

RUN_ID = "0123456789abcdef0123456789abcdef"
CODE_REV = "fedcba9876543210fedcba9876543210fedcba98"
GIT_REV = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


def _cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().out


def _table_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln[:1] in "┏┃┡│└"]


def _cells(out: str) -> list[str]:
    """Every cell of the table's header and body rows, stripped."""
    return [c.strip() for ln in _table_lines(out) if ln[:1] in "┃│" for c in ln.strip("┃│").split(ln[0])]


@pytest.fixture()
def eighty(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # rich reads it for the console width
    monkeypatch.delenv("LINES", raising=False)


@pytest.fixture()
def model_versions(monkeypatch):
    import lmcore.registry.models as registry

    versions = [
        {"name": "lmops-lm", "version": "12", "aliases": ["challenger", "champion"], "created": 0,
         "run_id": RUN_ID, "status": "READY", "metrics": {"eval/bits_per_byte": 1.234567},
         "tags": {"lmops.gate.decision": "promoted", "lmops.gate.reason": "first model",
                  "lmops.dataset_version": "48483cf067ea", "lmops.code_rev": CODE_REV,
                  "lmops.params_hash": "9f8e7d6c5b4a"},
         "description": ""},
        {"name": "lmops-lm", "version": "11", "aliases": [], "created": 0, "run_id": RUN_ID[::-1],
         "status": "READY", "metrics": {"bits_per_byte": 2.5},
         "tags": {"lmops.gate.decision": "rejected", "lmops.dataset_version": "0badc0ffee12"}, "description": ""},
    ]
    monkeypatch.setattr(registry, "list_versions", lambda name: versions)
    monkeypatch.setattr(registry, "alias_history", lambda name: [])
    return versions


@pytest.fixture()
def data_versions(monkeypatch):
    from lmcore.data.versions import DataRegistry, DatasetVersion

    found = [
        DatasetVersion(id="48483cf067ea", created_at="2026-12-02T18:30:22Z", kind="ingest", rows=1234567,
                       bytes=987654321, sources={"python-stdlib": 1200000, "feedback": 34567}, accepted=1234567,
                       quarantined=4321, git_rev=GIT_REV, shards=("data/raw/shard-1.parquet",), skipped_known=0),
        DatasetVersion(id="0badc0ffee12", created_at="2026-12-03T01:02:03Z", kind="feedback", rows=1234600,
                       bytes=987660000, sources={"python-stdlib": 1200000, "feedback": 34600}, accepted=33,
                       quarantined=2, git_rev=None, shards=("data/raw/shard-1.parquet", "data/feedback/s.parquet"),
                       parent="48483cf067ea", skipped_known=5),
    ]

    class Fake:
        def versions(self):
            return found

    monkeypatch.setattr(DataRegistry, "open", classmethod(lambda cls, *a, **k: Fake()))
    return found


def test_models_fits_80_columns_with_key_values_whole(eighty, model_versions, capsys):
    code, out = _cli(capsys, "models", "--name", "lmops-lm")
    assert code == 0, out
    lines = _table_lines(out)
    assert lines and all(len(ln) <= 80 for ln in lines), out
    assert "…" not in out
    cells = _cells(out)
    for value in ("version", "aliases", "bits/byte", "gate", "data", "12", "challenger,champion", "1.2346",
                  "promoted", "48483cf067ea", "11", "2.5000", "rejected", "0badc0ffee12"):
        assert value in cells, (value, out)
    for wide_only in ("code", "params", "run", CODE_REV[:12], RUN_ID[:8]):
        assert wide_only not in cells, (wide_only, out)
    assert "v12 gate: first model" in out


def test_models_wide_shows_every_column_whole(eighty, model_versions, capsys):
    code, out = _cli(capsys, "models", "--name", "lmops-lm", "--wide")
    assert code == 0, out
    assert "…" not in out
    cells = _cells(out)
    for value in ("code", "params", "run", CODE_REV[:12], "9f8e7d6c5b4a", RUN_ID[:8], "challenger,champion",
                  "48483cf067ea"):
        assert value in cells, (value, out)


def test_models_json_has_full_values(model_versions, capsys):
    code, out = _cli(capsys, "models", "--name", "lmops-lm", "--json")
    assert code == 0
    listing = json.loads(out)
    v = listing["versions"][0]
    assert v["run_id"] == RUN_ID and v["tags"]["lmops.code_rev"] == CODE_REV
    assert v["metrics"]["eval/bits_per_byte"] == 1.234567 and v["aliases"] == ["challenger", "champion"]


def test_data_versions_fits_80_columns_with_key_values_whole(eighty, data_versions, capsys):
    code, out = _cli(capsys, "data", "versions")
    assert code == 0, out
    lines = _table_lines(out)
    assert lines and all(len(ln) <= 80 for ln in lines), out
    assert "…" not in out
    cells = _cells(out)
    for value in ("version", "created", "kind", "rows", "quarantined", "48483cf067ea", "2026-12-02T18:30:22Z",
                  "ingest", "1234567", "4321", "0badc0ffee12", "2026-12-03T01:02:03Z", "feedback", "1234600"):
        assert value in cells, (value, out)
    for wide_only in ("bytes", "sources", "accepted", "skipped", "git", "987654321"):
        assert wide_only not in cells, (wide_only, out)


def test_data_versions_wide_shows_every_column_whole(eighty, data_versions, capsys):
    code, out = _cli(capsys, "data", "versions", "--wide")
    assert code == 0, out
    assert "…" not in out
    cells = _cells(out)
    for value in ("bytes", "sources", "accepted", "skipped", "git", "987654321",
                  "feedback=34567, python-stdlib=1200000", GIT_REV[:10], "48483cf067ea", "2026-12-02T18:30:22Z"):
        assert value in cells, (value, out)


def test_data_versions_json_has_full_values(data_versions, capsys):
    code, out = _cli(capsys, "data", "versions", "--json")
    assert code == 0
    listed = json.loads(out)["versions"]
    assert listed[0]["git_rev"] == GIT_REV and listed[0]["sources"] == {"python-stdlib": 1200000, "feedback": 34567}
    assert listed[1]["shards"] == ["data/raw/shard-1.parquet", "data/feedback/s.parquet"]


def test_two_column_tables_fold_long_values_instead_of_cutting_them(eighty, capsys):
    from lmcore.cli._common import print_table

    long_path = "/very/long/path/" + "x" * 150 + "/end"
    print_table("info", ["what", "where / value"], [["home", long_path]])
    out = capsys.readouterr().out
    assert "…" not in out and all(len(ln) <= 80 for ln in out.splitlines())
    body = [ln.strip("│").split("│") for ln in _table_lines(out) if ln.startswith("│")]
    assert "".join(value.strip() for _, value in body) == long_path
