"""Load benchmark of `lmops serve`: throughput and latency at concurrency 1 and 16, the dynamic
batching speedup (same server with max_batch=1 as the reference), and a 5,000-POST feedback
burst at concurrency 32 whose rows are counted in the DB afterwards (feedback_lost must be 0).

Requests stream (server-sent events), so each one gives its time to first token (TTFT) and its
inter-token latencies (ITL, the gaps between token arrivals) as well as its latency. Clients are
asyncio tasks on one event loop (``httpx.AsyncClient``; keep-alive). ``--api openai`` adds the same
load through ``/v1/completions`` with the official ``openai.AsyncOpenAI`` client at concurrency 1
and 16, and the OpenAI layer's cost: 1 - its req/s over the native endpoint's at c16 (the native
phase is run before and after it, against drift; target <= 5%). Each phase starts once the server
decodes with its compiled step (``/health``'s ``compiled_decode``; it compiles in the background
after start-up), and the wait is reported.

Model: random weights, 4 layers x 4 heads x d_model 128, block 128, byte-level tokenizer.
Servers are real `lmops serve` subprocesses on 127.0.0.1; every loop is bounded.
Usage: python bench/serve_load.py [--seconds 8] [--tokens 32] [--feedback 5000] [--api native|openai] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
from _common import cpu_header, with_cpu

from lmcore.services import stop_group, wait_http

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(folder: Path) -> Path:
    import torch

    from lmcore.data.tokenizer import BYTE_VOCAB, Tokenizer
    from lmcore.model.checkpoint import save_model
    from lmcore.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=BYTE_VOCAB, n_layer=4, n_head=4, n_kv_head=4, d_model=128, block_size=128)
    return save_model(folder, Transformer(cfg), Tokenizer.train([], "byte"), {})


class Server:
    def __init__(self, model: Path, home: Path, max_batch: int):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [str(Path(sys.executable).with_name("lmops")), "serve", "--model", str(model), "--port",
               str(self.port), "-S", f"serve.max_batch={max_batch}", "-S", "serve.poll_interval_s=0",
               "-S", "serve.max_concurrent=64"]
        env = {**os.environ, "LMOPS_HOME": str(home), "LMOPS_WORKSPACE": str(ROOT)}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)  # its own group: stop() ends its children too
        wait_http(self.base + "/health", 120, self.proc)

    def wait_compiled(self, limit_s: float = 600) -> float | None:
        """Seconds until the server decodes with its compiled step; None for a server without one."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit_s:
            health = httpx.get(self.base + "/health", timeout=5).json()
            if health.get("compiled_decode", None) is None:
                return None
            if health["compiled_decode"]:
                return round(time.monotonic() - t0, 1)
            time.sleep(0.5)
        raise SystemExit(f"the compiled decode step was not ready within {limit_s:.0f} s")

    def stop(self) -> None:
        stop_group(self.proc.pid, 20)  # the server and its decode-step compile child
        self.proc.wait()


async def _native_request(c: httpx.AsyncClient, base: str, body: dict) -> tuple[bool, list[float]]:
    """One streamed ``/v1/generate``: whether it ended with ``done``, and when each token arrived."""
    times: list[float] = []
    done = False
    async with c.stream("POST", base + "/v1/generate", json=body) as r:
        async for line in r.aiter_lines():
            if line == "event: token":
                times.append(time.perf_counter())
            done = done or line == "event: done"
    return r.status_code == 200 and done, times


async def _openai_request(c: openai.AsyncOpenAI, model: str, body: dict) -> tuple[bool, list[float]]:
    """The same request through ``/v1/completions`` with the official client (``ignore_eos``: vLLM's extension)."""
    times: list[float] = []
    finished = False
    try:
        stream = await c.completions.create(model=model, prompt=body["prompt"], max_tokens=body["max_new_tokens"],
                                            temperature=body["temperature"], seed=body["seed"], stream=True,
                                            extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
            finished = finished or bool(chunk.choices and chunk.choices[0].finish_reason)
    except openai.APIError:
        return False, times
    return finished, times


def load(base: str, concurrency: int, seconds: float, tokens: int, api: str = "native") -> dict:
    """``concurrency`` clients generating fixed-length completions for ``seconds`` (bounded), streamed through
    the native API (``httpx.AsyncClient``) or (``api="openai"``) the OpenAI-compatible one with the official
    ``openai.AsyncOpenAI`` client. Both are asyncio clients on one event loop that keep their connections
    alive: the sync ``openai`` client drops its connection after every stream (it stops reading at
    ``[DONE]``, before the body's end), which would charge a TCP connection per request to the OpenAI side."""
    lat: list[float] = []
    ttft: list[float] = []
    itl: list[float] = []
    errors = [0]

    async def client(k: int, stop_at: float) -> None:
        if api == "openai":
            c = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
            model = (await c.models.list()).data[0].id
            send = lambda body: _openai_request(c, model, body)  # noqa: E731
        else:
            c = httpx.AsyncClient(timeout=120)
            send = lambda body: _native_request(c, base, body)  # noqa: E731
        async with c:
            for i in range(100_000):
                if time.monotonic() >= stop_at:
                    return
                t = time.perf_counter()
                body = {"prompt": f"client {k} request {i}: ", "max_new_tokens": tokens, "ignore_eos": True,
                        "temperature": 0.8, "seed": i, "stream": True}
                ok, times = await send(body)
                dt = time.perf_counter() - t
                if ok and times:
                    lat.append(dt)
                    ttft.append(times[0] - t)
                    itl.extend(b - a for a, b in zip(times, times[1:], strict=False))
                else:
                    errors[0] += 1

    async def run() -> None:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(client(k, stop_at) for k in range(concurrency)))

    t0 = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t0
    n = len(lat)
    return {"api": api, "requests": n, "errors": errors[0], "rps": round(n / wall, 2),
            "tokens_per_s": round(n * tokens / wall, 1),
            "p50_ms": _percentile_ms(lat, 0.5), "p99_ms": _percentile_ms(lat, 0.99),
            "ttft_p50_ms": _percentile_ms(ttft, 0.5), "ttft_p99_ms": _percentile_ms(ttft, 0.99),
            "itl_p50_ms": _percentile_ms(itl, 0.5), "itl_p99_ms": _percentile_ms(itl, 0.99)}


def _percentile_ms(seconds: list[float], q: float) -> float | None:
    if not seconds:
        return None
    xs = sorted(seconds)
    return round(1000 * (statistics.median(xs) if q == 0.5 else xs[min(len(xs) - 1, int(q * len(xs)))]), 1)


def feedback_burst(base: str, total: int, concurrency: int) -> dict:
    gids = [httpx.post(base + "/v1/generate", json={"prompt": f"fb{i}", "max_new_tokens": 2}, timeout=60).json()
            ["generation_id"] for i in range(8)]
    acked: list[int] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                r = c.post(base + "/v1/feedback", json={"generation_id": gids[i % 8], "rating": 1 if i % 3 else -1})
                with lock:
                    if r.status_code == 200:
                        acked.append(r.json()["feedback_id"])
                    else:
                        errors[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"posts": total, "acked": len(acked), "errors": errors[0], "posts_per_s": round(total / wall, 1),
            "wall_s": round(wall, 2), "ids": acked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="duration of each load phase")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per completion (fixed: ignore_eos)")
    ap.add_argument("--feedback", type=int, default=5000, help="feedback POSTs in the burst")
    ap.add_argument("--api", choices=("native", "openai"), default="native",
                    help="openai: also load /v1/completions through the openai client and report its cost")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("LMOPS_DECODE_THREADS", "1")
    cpu_header()
    out: dict = {"model": "random 4x4x128, block 128, byte-level", "tokens_per_request": args.tokens}
    with tempfile.TemporaryDirectory(prefix="lmops-bench-serve-") as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model")
        ref = Server(model, tmp / "home-unbatched", max_batch=1)
        try:
            out["compile_wait_s"] = {"unbatched": ref.wait_compiled()}
            load(ref.base, 2, 1.0, args.tokens)  # warm-up
            out["unbatched_c16"] = load(ref.base, 16, args.seconds, args.tokens)
        finally:
            ref.stop()
        srv = Server(model, tmp / "home-batched", max_batch=16)
        try:
            out["compile_wait_s"]["batched"] = srv.wait_compiled()
            load(srv.base, 2, 1.0, args.tokens)
            out["batched_c1"] = load(srv.base, 1, args.seconds, args.tokens)
            out["batched_c16"] = load(srv.base, 16, args.seconds, args.tokens)
            if args.api == "openai":
                load(srv.base, 2, 1.0, args.tokens, "openai")
                out["openai_c1"] = load(srv.base, 1, args.seconds, args.tokens, "openai")
                out["openai_c16"] = load(srv.base, 16, args.seconds, args.tokens, "openai")
                out["batched_c16_after"] = load(srv.base, 16, args.seconds, args.tokens)
            fb = feedback_burst(srv.base, args.feedback, 32)
        finally:
            srv.stop()
        with sqlite3.connect(tmp / "home-batched" / "feedback.db") as db:
            stored = {r[0] for r in db.execute("SELECT seq FROM feedback")}
        ids = fb.pop("ids")
        fb["rows_in_db"] = len(stored)
        out["feedback"] = fb
        out["feedback_lost"] = len(set(ids) - stored)
    out["batching_speedup"] = round(out["batched_c16"]["rps"] / max(out["unbatched_c16"]["rps"], 1e-9), 2)
    out["throughput_c16_over_c1"] = round(out["batched_c16"]["rps"] / max(out["batched_c1"]["rps"], 1e-9), 2)
    if args.api == "openai":
        native = (out["batched_c16"]["rps"] + out["batched_c16_after"]["rps"]) / 2
        out["openai_cost_c16"] = round(1 - out["openai_c16"]["rps"] / max(native, 1e-9), 4)
        out["openai_cost_c1"] = round(1 - out["openai_c1"]["rps"] / max(out["batched_c1"]["rps"], 1e-9), 4)
    for name in ("batched_c1", "batched_c16", "unbatched_c16", "openai_c1", "openai_c16", "batched_c16_after"):
        if name not in out:
            continue
        r = out[name]
        print(f"{name:17s} {r['rps']:8.2f} req/s  {r['tokens_per_s']:8.1f} tok/s  p50 {r['p50_ms']} ms  "
              f"p99 {r['p99_ms']} ms  TTFT p50 {r['ttft_p50_ms']} ms  p99 {r['ttft_p99_ms']} ms  "
              f"ITL p50 {r['itl_p50_ms']} ms  p99 {r['itl_p99_ms']} ms  errors {r['errors']}")
    if args.api == "openai":
        print(f"OpenAI layer cost vs native req/s: c16 {100 * out['openai_cost_c16']:.1f}% (target <= 5%), "
              f"c1 {100 * out['openai_cost_c1']:.1f}%")
    print(f"waited for the compiled decode step (s): {out['compile_wait_s']}")
    print(f"batching_speedup (batched / unbatched at c16): {out['batching_speedup']}x  (target >= 3)")
    f = out["feedback"]
    print(f"feedback burst: {f['posts']} POSTs at c32 in {f['wall_s']} s ({f['posts_per_s']}/s), "
          f"acked {f['acked']}, rows in DB {f['rows_in_db']}, feedback_lost {out['feedback_lost']}")
    if args.json:
        print(json.dumps(with_cpu(out)))


if __name__ == "__main__":
    main()
