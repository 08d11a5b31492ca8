"""The feedback store: group-committed writes, joins by generation id, watermark claims, crash durability."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _serve_helpers import make_model, process_server

from lmcore.errors import LmopsError
from lmcore.feedback.store import FeedbackStore, UnknownGeneration

pytestmark = pytest.mark.data


def _gen(store: FeedbackStore, gid: str, prompt: str = "p", completion: str = "c") -> None:
    store.log_generation(id=gid, model_version="1", prompt=prompt, completion=completion, params={"t": 0},
                         latency_ms=1.0, prompt_tokens=1, completion_tokens=1)


@pytest.fixture()
def store(tmp_path):
    s = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    yield s
    s.close()


def test_sqlite_is_wal_with_full_sync(store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_feedback_joins_generation_and_rejects_unknown_ids(store):
    _gen(store, "g1", "prompt", "completion")
    seq = store.add_feedback("g1", 1)
    store.add_feedback("g1", -1, correction="better", comment="why")
    with pytest.raises(UnknownGeneration, match="unknown generation_id 'nope'"):
        store.add_feedback("nope", 1)
    with pytest.raises(LmopsError, match="rating"):
        store.add_feedback("g1", 5)
    assert [r["rating"] for r in store.feedback_for("g1")] == [1, -1] and seq >= 1
    assert store.counts() == {"generations": 1, "feedback": 2}


def test_concurrent_writers_are_group_committed_and_all_acknowledged(store):
    _gen(store, "g")
    with ThreadPoolExecutor(32) as pool:
        seqs = list(pool.map(lambda i: store.add_feedback("g", 1 if i % 2 else -1), range(400)))
    assert len(set(seqs)) == 400 and store.counts()["feedback"] == 400


def test_a_failed_group_acknowledges_nobody(store, tmp_path):
    _gen(store, "g")
    fut = store.log_generation_async(id="g", model_version="1", prompt="p", completion="c", params={},
                                     latency_ms=1, prompt_tokens=1, completion_tokens=1)  # duplicate id
    with pytest.raises(LmopsError, match="write failed"):
        fut.result()
    assert store.counts()["generations"] == 1


def test_two_concurrent_claims_never_share_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    writer = FeedbackStore(url)
    _gen(writer, "g")
    for i in range(50):
        writer.add_feedback("g", 1 if i % 2 else -1)
    stores = [FeedbackStore(url) for _ in range(4)]  # separate engines, like separate processes
    barrier = threading.Barrier(4)
    claims = []

    def claim(s):
        barrier.wait()
        claims.append(s.claim())

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [c for c in claims if c is not None]
    assert len(got) == 1 and [r.seq for r in got[0].rows] == list(range(1, 51))
    assert writer.watermark() == 50 and writer.claim() is None and writer.pending() == 0
    # a failed batch is handed out again (before anything newer), a finished one never
    writer.add_feedback("g", 1)
    writer.fail_claim(got[0].batch_id, "ingest broke")
    again = writer.claim()
    assert again.batch_id == got[0].batch_id and len(again.rows) == 50
    writer.finish_claim(again.batch_id, "v1")
    newer = writer.claim()
    assert [r.seq for r in newer.rows] == [51] and writer.claim() is None
    for s in (writer, *stores):
        s.close()


@pytest.mark.slow
def test_acknowledged_feedback_survives_sigkill_under_load(tmp_path):
    """Kill -9 the real server while 16 threads post feedback: every 200 is in the DB afterwards."""
    model = make_model(tmp_path / "m")
    home = tmp_path / "home"
    with process_server(model, home, "-S", "serve.poll_interval_s=0") as (base, proc):
        gids = [httpx.post(base + "/v1/generate", json={"prompt": f"p{i}", "max_new_tokens": 2}).json()
                ["generation_id"] for i in range(4)]
        acked: list[int] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(k: int) -> None:
            with httpx.Client(timeout=10) as c:
                i = 0
                while not stop.is_set() and i < 2000:  # bounded
                    i += 1
                    try:
                        r = c.post(base + "/v1/feedback", json={"generation_id": gids[(k + i) % 4], "rating": 1})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        with lock:
                            acked.append(r.json()["feedback_id"])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(acked) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join()
    assert len(acked) >= 300
    store = FeedbackStore(f"sqlite:///{home / 'feedback.db'}")
    with store.engine.connect() as conn:
        seqs = {r[0] for r in conn.exec_driver_sql("SELECT seq FROM feedback")}
    store.close()
    assert set(acked) <= seqs, f"{len(set(acked) - seqs)} acknowledged rows lost"
    assert len(seqs) >= len(acked)
