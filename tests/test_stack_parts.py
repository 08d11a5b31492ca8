"""The team stack's parts that need no running stack: stale Prefect cache locks, the rendezvous check,
PostgreSQL's folder permissions, the printed environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from flows.doctor import rendezvous_reachable
from flows.stack import export_lines
from flows.tasks import OwnedFileLockManager
from lmcore.errors import LmopsError
from lmcore.postgres import check_traversable
from lmcore.services import free_port

pytestmark = pytest.mark.code

def test_a_lock_whose_owner_died_is_stale_and_a_live_ones_holds(tmp_path):
    m = OwnedFileLockManager(tmp_path)
    assert m.acquire_lock("train-x", holder="run-a")
    other = OwnedFileLockManager(tmp_path)
    assert other.is_locked("train-x") and not other.acquire_lock("train-x", holder="run-c", acquire_timeout=0.3)
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = tmp_path / "train-x.owner"
    host = owner.read_text().split()[0]
    owner.write_text(f"{host} {dead.pid}")  # the run holding it died (its worker was SIGKILLed)
    assert not other.is_locked("train-x")  # removed, not waited for
    assert not (tmp_path / "train-x.lock").exists()
    assert other.acquire_lock("train-x", holder="run-b")
    other.release_lock("train-x", holder="run-b")
    assert not list(tmp_path.iterdir())


def test_rendezvous_check():
    ok, detail = rendezvous_reachable(f"127.0.0.1:{free_port()}")
    assert ok and "free on this machine" in detail
    ok, detail = rendezvous_reachable("no-such-host.invalid:29500")
    assert not ok and "no-such-host.invalid:29500" in detail
    assert not rendezvous_reachable("127.0.0.1:notaport")[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="the check applies when lmops runs as root")
def test_postgres_folder_must_be_reachable_by_the_postgres_user():
    base = Path(tempfile.mkdtemp(prefix="lmops-traverse-", dir="/tmp"))
    try:
        base.chmod(0o711)
        (base / "closed" / "home").mkdir(parents=True)
        (base / "closed").chmod(0o700)
        with pytest.raises(LmopsError, match=f"chmod o\\+x {base / 'closed'}"):
            check_traversable(base / "closed" / "home" / "stack" / "postgres")
        (base / "closed").chmod(0o711)
        check_traversable(base / "closed" / "home" / "stack" / "postgres")
    finally:
        shutil.rmtree(base)


def test_export_lines_quote_values():
    text = export_lines({"A": "http://x:1/api", "B": "postgresql+psycopg://u:p@h:5/db"})
    assert text.splitlines() == ["export A='http://x:1/api'", "export B='postgresql+psycopg://u:p@h:5/db'"]
