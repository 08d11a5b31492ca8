"""A local PostgreSQL cluster under the lmops home: init, start, databases, stop (the team stack's database).

PostgreSQL refuses to run as root, so when lmops runs as root (CI, containers) every server command
runs as the ``postgres`` system user (``runuser``), the data folder is owned by it, and each folder
above it must be traversable by that user. The cluster listens on 127.0.0.1 only (no Unix socket),
with one password-authenticated role, ``lmops``; the password is kept beside the data (mode 0600).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from lmcore.errors import LmopsError

ROLE = "lmops"
SYSTEM_USER = "postgres"


def pg_bin(name: str) -> str:
    """``initdb``/``pg_ctl``: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    if found := shutil.which(name):
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    if not versions:
        raise LmopsError(f"PostgreSQL's {name} is not installed (Debian: apt-get install postgresql)")
    return versions[-1]


def _as_server_user(cmd: list[str]) -> list[str]:
    """Run ``cmd`` as the postgres user when we are root (PostgreSQL will not run as root)."""
    return ["runuser", "-u", SYSTEM_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _give_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam(SYSTEM_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def check_traversable(path: Path) -> None:
    """As root, every folder above ``path`` must let the postgres user through (o+x); say which does not."""
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise LmopsError(f"running as root, but there is no '{SYSTEM_USER}' user to run PostgreSQL as") from None
    for folder in reversed(Path(path).resolve().parents):
        if folder.exists() and not os.stat(folder).st_mode & 0o001:
            raise LmopsError(f"the postgres user cannot reach {path}: {folder} is not traversable "
                             f"(run `chmod o+x {folder}`, or set LMOPS_HOME elsewhere)")


@dataclass(frozen=True)
class Cluster:
    """One PostgreSQL cluster: its data folder and the port it listens on at 127.0.0.1."""

    data: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def password_file(self) -> Path:
        return self.data.parent / "postgres.password"

    @property
    def log(self) -> Path:
        return self.data.parent / "postgres.log"

    def password(self) -> str:
        return self.password_file.read_text().strip()

    def url(self, database: str, driver: str = "psycopg") -> str:
        """SQLAlchemy URL of ``database`` (``driver``: psycopg for MLflow/lmops/Optuna, asyncpg for Prefect)."""
        return f"postgresql+{driver}://{ROLE}:{self.password()}@{self.host}:{self.port}/{database}"

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> None:
        """``initdb`` once: the ``lmops`` role with a random password, scram auth over TCP only."""
        if self.initialized():
            return
        self.data.parent.mkdir(parents=True, exist_ok=True)
        check_traversable(self.data)
        self.data.mkdir(exist_ok=True)
        self.data.chmod(0o700)
        _give_to_server_user(self.data)
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(18) + "\n")
        self.password_file.chmod(0o600)
        pwfile = self.data.parent / ".initdb-pw"
        shutil.copy(self.password_file, pwfile)
        _give_to_server_user(pwfile)
        try:
            _run([pg_bin("initdb"), "-D", str(self.data), "-U", ROLE, f"--pwfile={pwfile}", "-E", "UTF8",
                  "--auth=scram-sha-256", "--no-instructions"], "initdb")
        finally:
            pwfile.unlink(missing_ok=True)

    def pid(self) -> int | None:
        """The postmaster's PID from ``postmaster.pid`` when that process is alive."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def start(self, timeout: float = 60.0) -> int:
        """``pg_ctl start`` on 127.0.0.1:port (no Unix socket); returns the postmaster PID."""
        if (pid := self.pid()) is not None:
            return pid
        self.log.touch()
        _give_to_server_user(self.log)
        opts = f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories=''"
        _run([pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
              "-t", str(int(timeout)), "start"], "pg_ctl start", self.log)
        pid = self.pid()
        if pid is None:
            raise LmopsError(f"PostgreSQL did not start ({self.log})")
        return pid

    def healthy(self) -> bool:
        try:
            with psycopg.connect(self.url("postgres").replace("postgresql+psycopg", "postgresql"), connect_timeout=3):
                return True
        except psycopg.Error:
            return False

    def ensure_databases(self, names: list[str]) -> None:
        """Create each database that is missing (owned by the lmops role)."""
        dsn = self.url("postgres").replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            have = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for name in names:
                if name not in have:
                    conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self, timeout: float = 30.0) -> bool:
        """Fast shutdown by PID (SIGINT to the postmaster), SIGQUIT after ``timeout``; False if it was not up."""
        pid = self.pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while self.pid() is not None:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
                deadline = time.monotonic() + 10
            time.sleep(0.1)
        return True


def _run(cmd: list[str], what: str, log: Path | None = None) -> None:
    proc = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        where = f" (log {log})" if log else ""
        raise LmopsError(f"{what} failed: {detail[0]}{where}")
