"""Shared helpers for the serving tests: tiny random models, and real uvicorn servers on free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

TINY = dict(n_layer=2, n_head=2, n_kv_head=1, d_model=32, block_size=32)


def make_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random-weight byte-level model folder (config.json + model.safetensors + tokenizer.json)."""
    import torch

    from lmcore.data.tokenizer import BYTE_VOCAB, Tokenizer
    from lmcore.model.checkpoint import save_model
    from lmcore.model.transformer import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=BYTE_VOCAB, **{**TINY, **overrides})
    return save_model(folder, Transformer(cfg), Tokenizer.train([], "byte"), {})


@contextlib.contextmanager
def feedback_store(folder: Path):
    """A feedback store (SQLite in ``folder``), closed on exit."""
    from lmcore.feedback.store import FeedbackStore

    store = FeedbackStore(f"sqlite:///{folder / 'feedback.db'}")
    try:
        yield store
    finally:
        store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(base + "/health", timeout=2)
            last = r.json()
            if r.status_code == 200:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server at {base} not ready: {last}")


@contextlib.contextmanager
def thread_server(app, wait: bool = True, params=None):
    """Run a real uvicorn server for ``app`` in a thread on 127.0.0.1; yields the base URL.

    With ``params``, uvicorn is configured as ``lmops serve`` configures it (its slow-client timeouts).
    """
    import uvicorn

    from lmcore.serve.app import uvicorn_config

    port = free_port()
    config = (uvicorn_config(app, params, "127.0.0.1", port) if params is not None
              else uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if wait:
            wait_ready(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def process_server(model: Path, home: Path, *extra: str, env: dict | None = None):
    """``lmops serve`` as a subprocess (the real CLI); yields (base URL, Popen). Stopped by PID."""
    port = free_port()
    lmops = Path(sys.executable).with_name("lmops")
    cmd = [str(lmops), "serve", "--model", str(model), "--port", str(port), *extra]
    full_env = {**os.environ, "LMOPS_HOME": str(home), **(env or {})}
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc=proc)
        yield base, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def parse_sse(text: str) -> list[tuple[str, dict]]:
    import json

    events = []
    for block in text.strip().split("\n\n"):
        ev, data = "message", ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                ev = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
        events.append((ev, json.loads(data) if data else None))
    return events
