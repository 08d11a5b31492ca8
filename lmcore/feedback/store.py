"""The feedback store: every generation and every rating, durable before it is acknowledged.

One SQLAlchemy URL (``settings.feedback_db``) selects the backend, so SQLite on a laptop and
PostgreSQL for a team run the same code. On SQLite the file is in WAL mode with
``synchronous=FULL``: a commit returns only after the WAL is fsynced, so an acknowledged row
survives a server crash *and* a power cut (NORMAL would survive a killed process but could
lose the last commits on power loss). The fsync cost is amortised by group commit: one writer
thread drains every queued write into a single transaction, and each caller waits on its own
future until that transaction has committed. Many concurrent POSTs therefore cost one fsync
per batch, not one per row.

Harvesting claims rows by advancing a watermark (the last feedback ``seq`` handed out) with a
compare-and-set ``UPDATE`` in the same transaction that records the claimed batch, so two
harvests at once never receive the same rows, on any backend.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from lmcore.errors import LmopsError
from lmcore.settings import get_settings

log = logging.getLogger("lmops.feedback")

_STATE_NAME = "feedback"
_MAX_GROUP = 512  # writes per group-commit transaction


class UnknownGeneration(LmopsError):
    """Feedback names a generation id the store has never logged."""


@dataclass(frozen=True)
class FeedbackRow:
    """One feedback row joined with the generation it rates."""

    seq: int
    generation_id: str
    rating: int
    correction: str | None
    comment: str | None
    created_at: float
    prompt: str
    completion: str
    model_version: str


@dataclass(frozen=True)
class Claim:
    batch_id: int
    lo: int  # exclusive
    hi: int  # inclusive
    rows: list[FeedbackRow]


def _tables(metadata):
    generations = sa.Table(
        "generations", metadata,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("model_version", sa.String(200), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("completion", sa.Text, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
    )
    feedback = sa.Table(
        "feedback", metadata,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("generation_id", sa.String(64), nullable=False, index=True),
        sa.Column("rating", sa.Integer, nullable=False),
        sa.Column("correction", sa.Text, nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sqlite_autoincrement=True,  # seq never reused: the watermark relies on it only growing
    )
    state = sa.Table(
        "harvest_state", metadata,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("watermark", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    batches = sa.Table(
        "harvest_batches", metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("lo", sa.Integer, nullable=False),
        sa.Column("hi", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),  # claimed | done | failed
        sa.Column("version", sa.String(200), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
    )
    return generations, feedback, state, batches


def _sqlite_engine(url: str):
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # take transaction control away from pysqlite
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):  # IMMEDIATE: take the write lock up front, so read->write upgrades never deadlock
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class FeedbackStore:
    """Generations, feedback and the harvest watermark behind one SQLAlchemy URL."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite"):
            path = sa.engine.make_url(url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = _sqlite_engine(url)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        md = sa.MetaData()
        self.generations, self.feedback, self.state, self.batches = _tables(md)
        try:
            md.create_all(self.engine)
            with self.engine.begin() as conn:
                if conn.execute(sa.select(self.state.c.name).where(self.state.c.name == _STATE_NAME)).first() is None:
                    conn.execute(self.state.insert().values(name=_STATE_NAME, watermark=0, updated_at=time.time()))
        except sa.exc.IntegrityError:
            pass  # another process created the state row first
        except sa.exc.SQLAlchemyError as e:
            raise LmopsError(f"cannot open feedback store {url}: {str(e).splitlines()[0]}") from None
        self._queue: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(cls, settings=None) -> FeedbackStore:
        return cls((settings or get_settings()).feedback_db)

    # -- writes (group commit) ------------------------------------------------------------
    def _submit(self, kind: str, payload: dict) -> Future:
        if self._closed:
            raise LmopsError("feedback store is closed")
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="feedback-writer", daemon=True)
                self._writer.start()
        fut: Future = Future()
        self._queue.put((kind, payload, fut))
        return fut

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            group = [item]
            while len(group) < _MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this group, then stop
                    break
                group.append(nxt)
            results: list[Any] = []
            try:
                with self.engine.begin() as conn:
                    for kind, payload, _ in group:
                        if kind == "generation":
                            conn.execute(self.generations.insert().values(**payload))
                            results.append(payload["id"])
                            continue
                        gid = payload["generation_id"]
                        known = conn.execute(
                            sa.select(self.generations.c.id).where(self.generations.c.id == gid)
                        ).first()
                        if known is None:
                            results.append(UnknownGeneration(f"unknown generation_id '{gid}'"))
                            continue
                        res = conn.execute(self.feedback.insert().values(**payload))
                        results.append(int(res.inserted_primary_key[0]))
            except Exception as e:  # the whole group failed: nobody is acknowledged
                log.error("feedback store write failed: %s", e)
                err = LmopsError(f"feedback store write failed: {str(e).splitlines()[0]}")
                for _, _, fut in group:
                    fut.set_exception(err)
                continue
            for (_, _, fut), res in zip(group, results, strict=True):
                if isinstance(res, Exception):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def log_generation_async(
        self, *, id: str, model_version: str, prompt: str, completion: str, params: dict,
        latency_ms: float, prompt_tokens: int, completion_tokens: int,
    ) -> Future:
        """Queue a generation row; the future resolves once it is committed."""
        return self._submit("generation", dict(
            id=id, created_at=time.time(), model_version=model_version, prompt=prompt, completion=completion,
            params=json.dumps(params, sort_keys=True), latency_ms=float(latency_ms),
            prompt_tokens=int(prompt_tokens), completion_tokens=int(completion_tokens),
        ))

    def add_feedback_async(
        self, generation_id: str, rating: int, correction: str | None = None, comment: str | None = None
    ) -> Future:
        """Queue a feedback row; the future resolves to its ``seq`` once committed
        (or raises :class:`UnknownGeneration`)."""
        if rating not in (-1, 1):
            raise LmopsError(f"rating must be +1 or -1 (got {rating!r})")
        return self._submit("feedback", dict(
            generation_id=generation_id, rating=int(rating), correction=correction, comment=comment,
            created_at=time.time(),
        ))

    def log_generation(self, **kw) -> str:
        return self.log_generation_async(**kw).result()

    def add_feedback(self, generation_id: str, rating: int, correction: str | None = None,
                     comment: str | None = None) -> int:
        return self.add_feedback_async(generation_id, rating, correction, comment).result()

    # -- reads ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            g = conn.execute(sa.select(sa.func.count()).select_from(self.generations)).scalar_one()
            f = conn.execute(sa.select(sa.func.count()).select_from(self.feedback)).scalar_one()
        return {"generations": int(g), "feedback": int(f)}

    def get_generation(self, generation_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.generations).where(self.generations.c.id == generation_id)).first()
        return dict(row._mapping) if row is not None else None

    def feedback_for(self, generation_id: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(self.feedback).where(self.feedback.c.generation_id == generation_id)
                .order_by(self.feedback.c.seq)
            ).all()
        return [dict(r._mapping) for r in rows]

    def recent_generations(self, since: float, limit: int) -> list[dict]:
        """Generations logged at or after ``since`` (epoch seconds), newest first, at most ``limit``."""
        g = self.generations
        q = (sa.select(g.c.id, g.c.created_at, g.c.model_version, g.c.prompt, g.c.latency_ms, g.c.prompt_tokens,
                       g.c.completion_tokens)
             .where(g.c.created_at >= since).order_by(g.c.created_at.desc()).limit(limit))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def feedback_since(self, since: float) -> list[dict]:
        """Feedback given at or after ``since``: rating, correction and the rated generation's model version."""
        f, g = self.feedback, self.generations
        q = (sa.select(f.c.rating, f.c.correction, f.c.created_at, g.c.model_version)
             .join(g, g.c.id == f.c.generation_id).where(f.c.created_at >= since).order_by(f.c.seq))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def watermark(self) -> int:
        with self.engine.connect() as conn:
            wm = conn.execute(sa.select(self.state.c.watermark).where(self.state.c.name == _STATE_NAME)).scalar()
        return int(wm or 0)

    def pending(self) -> int:
        """Feedback rows past the watermark (not yet claimed by a harvest)."""
        wm = self.watermark()
        with self.engine.connect() as conn:
            n = conn.execute(
                sa.select(sa.func.count()).select_from(self.feedback).where(self.feedback.c.seq > wm)
            ).scalar_one()
        return int(n)

    # -- harvest claims -------------------------------------------------------------------
    def claim(self) -> Claim | None:
        """Claim the next rows for a harvest: a failed batch first, else every row past the watermark.

        The watermark moves by compare-and-set in the same transaction that records the batch, so
        a concurrent claimer either sees the new watermark or loses the race and claims nothing.
        """
        b, st = self.batches, self.state
        with self.engine.begin() as conn:
            failed = conn.execute(
                sa.select(b.c.id, b.c.lo, b.c.hi).where(b.c.status == "failed").order_by(b.c.id).limit(1)
            ).first()
            if failed is not None:
                upd = conn.execute(
                    b.update().where(b.c.id == failed.id, b.c.status == "failed").values(status="claimed", error=None)
                )
                if upd.rowcount == 1:
                    batch_id, lo, hi = failed.id, failed.lo, failed.hi
                else:
                    return None
            else:
                lo = int(conn.execute(sa.select(st.c.watermark).where(st.c.name == _STATE_NAME)).scalar_one())
                hi = conn.execute(sa.select(sa.func.max(self.feedback.c.seq))).scalar()
                if hi is None or int(hi) <= lo:
                    return None
                hi = int(hi)
                upd = conn.execute(
                    st.update().where(st.c.name == _STATE_NAME, st.c.watermark == lo)
                    .values(watermark=hi, updated_at=time.time())
                )
                if upd.rowcount != 1:  # another harvest moved it first
                    return None
                res = conn.execute(b.insert().values(lo=lo, hi=hi, status="claimed", created_at=time.time()))
                batch_id = int(res.inserted_primary_key[0])
            rows = self._rows_between(conn, lo, hi)
        return Claim(batch_id=int(batch_id), lo=int(lo), hi=int(hi), rows=rows)

    def _rows_between(self, conn, lo: int, hi: int) -> list[FeedbackRow]:
        f, g = self.feedback, self.generations
        q = (
            sa.select(f.c.seq, f.c.generation_id, f.c.rating, f.c.correction, f.c.comment, f.c.created_at,
                      g.c.prompt, g.c.completion, g.c.model_version)
            .join(g, g.c.id == f.c.generation_id)
            .where(f.c.seq > lo, f.c.seq <= hi)
            .order_by(f.c.seq)
        )
        return [FeedbackRow(**dict(r._mapping)) for r in conn.execute(q)]

    def finish_claim(self, batch_id: int, version: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.batches.update().where(self.batches.c.id == batch_id)
                         .values(status="done", version=version, finished_at=time.time()))

    def fail_claim(self, batch_id: int, error: str) -> None:
        """Give a claimed batch back: the next harvest retries it before anything newer."""
        with self.engine.begin() as conn:
            conn.execute(self.batches.update().where(self.batches.c.id == batch_id)
                         .values(status="failed", error=error[:2000], finished_at=time.time()))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=30)
        self.engine.dispose()
