"""Prefect's local API on a first run: its database made first, its start-up failures in one line.

With no PREFECT_API_URL every flow starts Prefect's ephemeral API server in a subprocess and
waits `server.ephemeral.startup_timeout_seconds` for it to answer. In a fresh PREFECT_HOME that
server first creates its SQLite database (every migration: ~30 s of a ~45 s first start on a slow
2-core machine), so the first `lmops run` of a clone could time out. Here the database is created
in-process beforehand, as its own announced step, leaving the server only its ordinary start;
a start that still times out becomes one `error:` line saying what to do, not a traceback.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import prefect
import prefect.settings
from sqlalchemy.engine import make_url

from lmcore.errors import LmopsError
from lmcore.locks import file_lock

# The start of the RuntimeError that prefect.server.api.server.SubprocessASGIServer.start raises.
EPHEMERAL_TIMEOUT_MESSAGE = "Timed out while attempting to connect to ephemeral Prefect API server"
TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ephemeral_database_path() -> Path | None:
    """The SQLite file the ephemeral API server will use, or None when there is no such file to prepare.

    None when PREFECT_API_URL points at a server (it owns its database), or the database is not a
    SQLite file (a server database is migrated by whoever runs it; in-memory SQLite dies with it).
    """
    settings = prefect.settings.get_current_settings()
    if settings.api.url:
        return None
    url = make_url(prefect.settings.PREFECT_API_DATABASE_CONNECTION_URL.value())
    if url.get_backend_name() != "sqlite" or not url.database or "memory" in url.database:
        return None
    return Path(url.database)


def _applied_revisions(path: Path) -> set[str]:
    """Alembic revisions recorded in the database; empty when the file or its version table is missing."""
    if not path.is_file():
        return set()
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as conn:
            return {row[0] for row in conn.execute("SELECT version_num FROM alembic_version")}
    except sqlite3.Error:
        return set()


def _head_revisions() -> set[str]:
    """The revisions the installed Prefect migrates its SQLite database to (~0.1 s, Prefect's server imported)."""
    from alembic.script import ScriptDirectory  # lazy: Prefect's server modules, only to create the database
    from prefect.server.database import provide_database_interface

    # lazy: Prefect's server modules, only to create the database
    from prefect.server.database.alembic_commands import alembic_config

    config = alembic_config()
    # Prefect's alembic env.py picks the versions folder of the dialect the same way.
    config.set_main_option("version_locations", str(provide_database_interface().orm.versions_dir))
    return set(ScriptDirectory.from_config(config).get_heads())


def _migrate() -> None:
    """What the ephemeral server would do on start (`prefect server database upgrade -y`), in this process."""
    # lazy: Prefect's server modules, only to create the database
    from prefect.server.database import provide_database_interface

    async def upgrade() -> None:
        db = provide_database_interface()
        try:
            await db.create_db()
        finally:
            await (await db.engine()).dispose()  # no pooled aiosqlite threads outlive the event loop

    asyncio.run(upgrade())


def prepare_prefect_database(echo: Callable[[str], None] = _stderr) -> float | None:
    """Create or upgrade the ephemeral API's SQLite database before a flow starts that server.

    Returns the seconds the migrations took, or None when there was nothing to do (a server is
    configured, the database is not a local SQLite file, or it is already at Prefect's head
    revision: ~0.2 s). Holds a file lock so two first runs at once migrate once.
    """
    path = ephemeral_database_path()
    if path is None:
        return None

    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.parent / f".{path.name}.lmops-migrate.lock"):
        applied = _applied_revisions(path)
        if applied and applied == _head_revisions():
            return None
        if applied:
            echo(f"upgrading Prefect's local database {path} to Prefect {prefect.__version__} ...")
        else:
            echo("preparing Prefect's local database (first run only, ~10-45 s) ...")
        t0 = time.monotonic()
        try:
            _migrate()
        except Exception as e:  # a disk, permission or lock problem the user has to fix
            raise LmopsError(f"could not create Prefect's database {path}: {type(e).__name__}: {e}") from e
        return time.monotonic() - t0


def startup_timeout_s() -> int:
    """How long Prefect waits for its ephemeral API server (setting server.ephemeral.startup_timeout_seconds)."""
    return prefect.settings.get_current_settings().server.ephemeral.startup_timeout_seconds


@contextmanager
def prefect_start_errors() -> Iterator[None]:
    """Turn the ephemeral API server's start-up timeout into an LmopsError (one `error:` line, exit 1)."""
    try:
        yield
    except RuntimeError as e:
        if not str(e).startswith(EPHEMERAL_TIMEOUT_MESSAGE):
            raise
        raise LmopsError(
            f"Prefect's local API server did not start within {startup_timeout_s()} s (a busy or slow machine "
            f"can take longer): run the command again, or raise {TIMEOUT_ENV} (now {startup_timeout_s()}), "
            "or point PREFECT_API_URL at a running Prefect server"
        ) from None
