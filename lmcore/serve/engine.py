"""The model holder: dynamic batching over one decode loop, and atomic hot swap of versions.

Each loaded model version gets a :class:`Batcher`: one background thread that owns the model.
Every step it admits queued requests into free slots (prefilling each prompt on its own), then
decodes *all* active rows with one step over a :class:`lmcore.model.decode.Decoder`'s slot cache, in
which every row has its own length: the same step, eager or compiled, that ``lmcore.model.generate``
runs for one sequence. Active rows hold the leading slots 0..B-1; when a row finishes, the last
row's cache moves into its slot (one copy per finished request), so a step reads one block of
slots and never gathers. Requests that arrive while others are decoding join at the next step, so
concurrent requests share steps and throughput grows with load.

Compiled decoding: a new batcher decodes eagerly at once, while a background thread compiles the
step (on a CPU ahead of time, 20-30 s the first time a model shape is seen, then loaded from the
lmops home in seconds; on a GPU ``torch.compile``) and switches the decoder over when it is ready.
Both steps read and write the same cache, so rows in flight carry on; a machine that cannot
compile keeps decoding eagerly.

Hot swap: a reload loads the new version beside the old one and replaces the pointer under a
lock. Requests already admitted keep their batcher (the old model) until they finish; the old
batcher then stops and its memory is freed. A version that fails to load changes nothing but
``last_reload_error``.

Shapes: B active rows, S slots, V vocab.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lmcore.data.tokenizer import Tokenizer
from lmcore.errors import LmopsError
from lmcore.machine import release_freed_memory
from lmcore.model.checkpoint import load_model
from lmcore.model.decode import DECODER_SLOTS, Decoder
from lmcore.model.generate import SamplingParams, decode_threads, pick_next, process_threads
from lmcore.model.transformer import Transformer
from lmcore.registry.models import fetch_model_dir, resolve_alias

log = logging.getLogger("lmops.serve")

# an idle batcher gives its cache's memory back once its rows had committed more than this (below it, the
# next requests reuse the committed pages instead of faulting them in again)
IDLE_RELEASE_BYTES = 64 << 20


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    version: str
    name: str
    source: str
    info: dict = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)


def _weights_digest(folder: Path) -> str:
    h = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_version(source: str) -> LoadedModel:
    """``models:/<name>@<alias>`` (through ``lmcore.registry.models``) or a local model folder -> a LoadedModel."""
    info: dict[str, Any] = {}
    if source.startswith("models:/"):
        folder, info = fetch_model_dir(source)
        folder = Path(folder)
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise LmopsError(f"model folder not found: {source}")
    model, tokenizer, meta = load_model(folder)
    for p in model.parameters():
        p.requires_grad_(False)
    version = str(info.get("version") or meta.get("version") or f"local-{_weights_digest(folder)}")
    name = str(info.get("name") or meta.get("name") or folder.name)
    return LoadedModel(model=model, tokenizer=tokenizer, version=version, name=name, source=source, info=info)


# -- one generation request ---------------------------------------------------------------
class RowObserver(Protocol):
    """What the decode thread reports about each row of one model version (``Metrics.for_version``).

    Every request any route submits passes through exactly one batcher, so each is observed once.
    Times are seconds.
    """

    def admitted(self, queue_s: float, prompt_tokens: int) -> None: ...
    def token(self, first: bool, gap_s: float) -> None: ...  # gap: since arrival (first) or the previous token
    def finished(self, reason: str, e2e_s: float) -> None: ...


class _NoObserver:
    def admitted(self, queue_s: float, prompt_tokens: int) -> None:
        pass

    def token(self, first: bool, gap_s: float) -> None:
        pass

    def finished(self, reason: str, e2e_s: float) -> None:
        pass


@dataclass
class Row:
    """One request's state inside a batcher, and the channel back to its asyncio caller."""

    prompt_ids: list[int]
    sp: SamplingParams
    deadline: float
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    gen: torch.Generator | None = None
    slot: int = -1  # its slot in the batcher's decoder: its index among the active rows
    last: int = 0  # last sampled token (input of the next step)
    n_new: int = 0
    cancelled: bool = False
    queued_at: float = field(default_factory=time.perf_counter)  # arrival: queue time and TTFT count from here
    first_token_at: float | None = None
    last_token_at: float = 0.0
    top_logprobs: int | None = None  # None: no log-probabilities; k: the token's and the k most likely
    cancel_reason: str = "cancelled"  # the finish reason a cancelled row reports ("stop": a stop sequence)


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    """On the event loop: hand each event to its row's queue (one loop wake-up per decode step)."""
    for out, event in items:
        out.put_nowait(event)


class _Outbox:
    """Events of one decode step, grouped by the callers' event loops and sent with one call each.

    A wake-up per event (``call_soon_threadsafe`` writes the loop's self-pipe) cost the decode thread
    and the event loop more than the step itself at 16 rows.
    """

    def __init__(self) -> None:
        self.by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Row, tuple]]] = {}

    def put(self, row: Row, event: tuple) -> None:
        self.by_loop.setdefault(row.loop, []).append((row, event))

    def flush(self) -> None:
        for loop, items in self.by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(row.out, event) for row, event in items])
            except RuntimeError:  # the callers' loop is gone (client left, server stopping)
                for row, _ in items:
                    row.cancelled = True
        self.by_loop = {}


def _logprobs(row: Row, logits: torch.Tensor, token: int) -> tuple:
    """``((logprob, [(id, logprob), ...]),)`` of the model's own distribution, only for a row that asked."""
    if row.top_logprobs is None:
        return ()
    lp = torch.log_softmax(logits[0].float(), dim=-1)
    top: list = []
    if row.top_logprobs:
        values, ids = torch.topk(lp, min(row.top_logprobs, lp.numel()))
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return ((float(lp[token]), top),)


@contextmanager
def _all_threads() -> Iterator[None]:
    """Run a prefill on the process's thread count, not the decode step's.

    Why: the probe may decode on 1 thread (a matrix-vector step gains little from more on a small
    model), while a prefill is matrix-matrix work that scales with the cores: on 1 of 2 threads a
    200-token prompt's first token took 2x one forward pass of the model.
    """
    want, now = process_threads(), torch.get_num_threads()
    if want == now:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(now)


def _pick_rows(rows: list[Row], logits: torch.Tensor) -> list[tuple[int, float]]:
    """(token, probability) of each row from logits (B, V): one batched pick per group of rows with the
    same temperature, top-k and top-p, each row drawing from its own generator (``pick_next``)."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.sp.temperature, row.sp.top_k, row.sp.top_p), []).append(i)
    picked: list[tuple[int, float]] = [(0, 0.0)] * len(rows)
    for idx in groups.values():
        sel = logits if len(idx) == len(rows) else logits[idx]  # the usual case, every row alike: no gather
        ids, probs = pick_next(sel, rows[idx[0]].sp, [rows[i].gen for i in idx])
        for i, t, p in zip(idx, ids.tolist(), probs.tolist(), strict=True):
            picked[i] = (t, p)
    return picked


class Batcher:
    """The decode loop of one model version: admit, prefill, decode all rows together."""

    def __init__(self, lm: LoadedModel, max_batch: int, max_new_tokens: int, batch_window_ms: float,
                 on_batch=None, compiled: bool = True, observer: RowObserver | None = None,
                 max_prompt_tokens: int | None = None):
        self.lm = lm
        self.max_batch = max_batch
        self.window = batch_window_ms / 1000.0
        # what a request can use: its prompt (the last max_prompt_tokens, at most the model's context) and
        # max_new_tokens; not the model's whole context per slot (8,192 positions x 16 slots: 6 GB for 135M)
        block = lm.model.cfg.block_size
        self.prompt_limit = min(block, max_prompt_tokens) if max_prompt_tokens else block
        self.max_len = self.prompt_limit + max_new_tokens
        # the cache's length rounded as lmcore.model.generate rounds it: one compiled step serves both;
        # its memory is committed as rows fill it (lmcore.model.decode.ReservedCache)
        self.decoder = Decoder(lm.model, -(-self.max_len // DECODER_SLOTS) * DECODER_SLOTS, slots=max_batch)
        self.compiled = compiled
        self.compile_done = threading.Event()  # set once the compiled step is in use, or has failed
        # set once the decode thread has its thread count: in a fresh home that runs the decode probe
        # (seconds on a busy host), which the engine waits for before it reports ready
        self.threads_chosen = threading.Event()
        self.pending: queue.Queue[Row] = queue.Queue()
        self.active: list[Row] = []  # active[i].slot == i
        self.admitting: list[Row] = []  # rows being prefilled
        self.crashed = False
        self.on_batch = on_batch or (lambda n: None)
        self.observer = observer or _NoObserver()
        self.outbox = _Outbox()  # touched by the decode thread only
        self._retired = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"decode-{lm.version}", daemon=True)
        self._thread.start()

    # -- called from the event loop ----------------------------------------------------------
    def submit(self, row: Row) -> None:
        if self._retired.is_set():
            raise LmopsError("model version is being replaced; retry")
        row.prompt_ids = row.prompt_ids[-self.prompt_limit:] or [self.lm.tokenizer.eos_id]
        if row.sp.seed is not None and row.sp.temperature > 0:
            row.gen = torch.Generator(device=self.lm.model.embed.weight.device)
            row.gen.manual_seed(row.sp.seed)
        self.pending.put(row)

    def retire(self) -> None:
        """Stop taking requests; the thread ends once its admitted rows are finished."""
        self._retired.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._retired.set()
        self._stopped.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def load(self) -> int:
        return len(self.active) + self.pending.qsize()

    def counts(self) -> tuple[int, int]:
        """(running, waiting): rows decoding now, rows queued for a slot."""
        return len(self.active), self.pending.qsize()

    # -- the decode thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            with decode_threads(self.lm.model.embed.weight.device, self.lm.model.cfg):
                self.threads_chosen.set()
                self._decode()
        finally:
            self.threads_chosen.set()  # also when choosing failed: submit() restarts a dead decode thread

    def _decode(self) -> None:
        if self.compiled:  # compiled for the thread count this thread decodes on
            threading.Thread(target=self._compile, args=(self.decoder, torch.get_num_threads()),
                             name=f"compile-{self.lm.version}", daemon=True).start()
        else:
            self.compile_done.set()
        self._loop()

    def _compile(self, decoder: Decoder, threads: int) -> None:
        """Switch the decoder to the compiled step once it is built; on failure keep decoding eagerly."""
        try:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            decoder.compile()
            log.info("version %s decodes with the compiled step (ready in %.1f s)", self.lm.version,
                     time.perf_counter() - t0)
        except Exception as e:
            log.warning("compiled decoding unavailable for version %s, decoding eagerly: %s", self.lm.version,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
        finally:
            self.compile_done.set()

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                if not self.active:
                    if self._retired.is_set() and self.pending.empty():
                        break
                    if self.decoder.cache.committed_bytes() > IDLE_RELEASE_BYTES:
                        self.decoder.release()  # idle: resident memory back to the model's own
                        release_freed_memory()  # and the batch's prefill activations, which malloc keeps in its heap
                    try:
                        first = self.pending.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    if self.window > 0 and self.max_batch > 1:
                        time.sleep(self.window)  # let concurrent arrivals share the first steps
                    self._admit_pending(first)
                else:
                    self._admit_pending()
                if self.active:
                    self._step()
        except Exception as e:  # never leave callers waiting forever
            self.crashed = True  # from now on the engine hands new rows to a fresh loop
            log.exception("decode loop for version %s crashed", self.lm.version)
            held = self.active + self.admitting
            for row in held + self._drain():
                self.outbox.put(row, ("error", f"internal error in the decode loop: {e}"))
        finally:
            for row in self._drain():
                self.outbox.put(row, ("error", "server is shutting down"))
            self.outbox.flush()
            self.decoder = None  # frees the cache (a compile still running holds it until it ends)

    def _drain(self) -> list[Row]:
        out = []
        while True:
            try:
                out.append(self.pending.get_nowait())
            except queue.Empty:
                return out

    def _admit_pending(self, first: Row | None = None) -> None:
        """Admit ``first`` and the queued rows that fit: prefilled together, one forward pass for all."""
        rows = [first] if first is not None else []
        while len(self.active) + len(rows) < self.max_batch:
            try:
                rows.append(self.pending.get_nowait())
            except queue.Empty:
                break
        if rows:
            self._admit(rows)

    @torch.inference_mode()
    def _admit(self, rows: list[Row]) -> None:
        """Prefill prompts into the first free slots and sample each one's first token."""
        now = time.perf_counter()
        for row in rows:
            if row.cancelled:
                self.observer.finished("cancelled", now - row.queued_at)
        rows = [r for r in rows if not r.cancelled]
        if not rows:
            return
        for row in rows:
            self.observer.admitted(now - row.queued_at, len(row.prompt_ids))
        self.admitting = rows  # in neither queue while they prefill: a crash must still answer them
        first = len(self.active)
        with _all_threads():
            logits = self.decoder.prefill_many([r.prompt_ids for r in rows], first)  # (n, V)
        for k, row in enumerate(rows):
            row.slot = first + k
            self.active.append(row)
        self.admitting = []
        for k, (row, (token, prob)) in enumerate(zip(rows, _pick_rows(rows, logits), strict=True)):
            self._accept(row, token, prob, logits[k : k + 1])  # k, not row.slot: a finished row moves the last
        self.outbox.flush()

    def _accept(self, row: Row, token: int, prob: float, logits: torch.Tensor) -> None:
        """Emit one row's sampled token (logits (1, V): its distribution), retire the row if done."""
        eos = self.lm.tokenizer.eos_id
        now = time.perf_counter()
        if row.first_token_at is None:
            row.first_token_at = now
        done_reason = None
        if row.sp.stop_at_eos and token == eos:
            done_reason = "eos"
        else:
            first = row.n_new == 0
            self.observer.token(first, now - (row.queued_at if first else row.last_token_at))
            row.last_token_at = now
            row.n_new += 1
            row.last = token
            self.outbox.put(row, ("token", token, prob, *_logprobs(row, logits, token)))
            if row.n_new >= row.sp.max_new_tokens or self.decoder.cache.lens[row.slot] + 1 >= self.max_len:
                done_reason = "length"
        if done_reason is None and time.monotonic() > row.deadline:
            done_reason = "timeout"
        if done_reason is None and row.cancelled:
            done_reason = row.cancel_reason
        if done_reason is not None:
            self._finish(row, done_reason)

    def _finish(self, row: Row, reason: str) -> None:
        """Free the row's slot: the last active row moves into it, so rows keep the leading slots."""
        last = self.active.pop()
        if last is not row:
            self.decoder.move(last.slot, row.slot)
            last.slot = row.slot
            self.active[row.slot] = last
        self.observer.finished(reason, time.perf_counter() - row.queued_at)
        self.outbox.put(row, ("done", reason))

    @torch.inference_mode()
    def _step(self) -> None:
        rows = list(self.active)  # rows[i] holds slot i
        tokens = torch.tensor([r.last for r in rows], dtype=torch.long, device=self.lm.model.embed.weight.device)
        logits = self.decoder.step(tokens)  # (B, V)
        self.on_batch(len(rows))
        picked = _pick_rows(rows, logits)
        for i, row in enumerate(rows):
            self._accept(row, *picked[i], logits[i : i + 1])
        self.outbox.flush()


class Engine:
    """The model currently served, plus reload (hot swap) and alias polling."""

    def __init__(self, source: str, *, max_batch: int = 16, max_new_tokens: int = 256,
                 batch_window_ms: float = 5.0, on_batch=None, compiled: bool = True,
                 observe: Callable[[LoadedModel], RowObserver] | None = None, max_prompt_tokens: int | None = None):
        self.source = source
        self.max_prompt_tokens = max_prompt_tokens  # prompts keep their last this many tokens (None: the context)
        self.compiled = compiled  # decode with the compiled step once it is built (see the module doc)
        self.max_batch, self.max_new_tokens, self.batch_window_ms = max_batch, max_new_tokens, batch_window_ms
        self.on_batch = on_batch
        self.observe = observe  # a RowObserver per loaded version (its metrics labels)
        self.current: Batcher | None = None
        self.retired: list[Batcher] = []
        self.last_reload_error: str | None = None
        self.last_reload_at: float | None = None
        self.loading = False
        self.swaps = 0
        self.restarts = 0  # decode loops restarted after a crash
        self._swap_lock = threading.Lock()  # pointer swap
        self._reload_lock = threading.Lock()  # one reload at a time
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self.on_swap = None  # callback(old_version, new_version)

    @property
    def ready(self) -> bool:
        return self.current is not None

    @property
    def version(self) -> str | None:
        return self.current.lm.version if self.current else None

    def reload(self, source: str | None = None) -> dict:
        """Load ``source`` (default: the served URI) beside the current model, then swap atomically.

        Returns ``{"ok", "version", "previous", "swapped", "error"}``; never raises for a bad version.
        """
        with self._reload_lock:
            source = source or self.source
            previous = self.version
            self.loading = True
            try:
                lm = load_version(source)
            except Exception as e:  # keep serving the old model
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                self.last_reload_error = f"{source}: {msg}"
                self.last_reload_at = time.time()
                log.error("reload of %s failed, still serving %s: %s", source, previous, msg)
                return {"ok": False, "version": previous, "previous": previous, "swapped": False,
                        "error": self.last_reload_error}
            finally:
                self.loading = False
            self.last_reload_at = time.time()
            self.last_reload_error = None
            if previous is not None and lm.version == previous and self.source == source:
                return {"ok": True, "version": previous, "previous": previous, "swapped": False, "error": None}
            batcher = self._batcher(lm)
            batcher.threads_chosen.wait()  # not inside the first request after /health said ready
            # what loading (the state dict beside the model) and a first decode probe (quantized copies of the
            # model) freed stays in malloc's heap otherwise: 200 MB of a fresh home's 135M model
            release_freed_memory()
            with self._swap_lock:
                old, self.current = self.current, batcher
                self.source = source
            if old is not None:
                old.retire()
                self.retired = [b for b in self.retired if b.alive] + [old]
            self.swaps += 1
            log.info("now serving %s version %s (was %s)", lm.name, lm.version, previous)
            if self.on_swap:
                self.on_swap(previous, lm.version)
            return {"ok": True, "version": lm.version, "previous": previous, "swapped": True, "error": None}

    def submit(self, row: Row, prompt: str | None = None, rendered: bool = False) -> LoadedModel:
        """Hand a row to the current batcher; returns the model version it will run on.

        With ``prompt``, it is encoded by that same version's tokenizer (a swap cannot slip
        between encoding and admission); ``rendered``: chat-template output, whose special tokens
        become their ids.
        """
        with self._swap_lock:
            batcher = self.current
            if batcher is None:
                raise LmopsError("no model loaded yet")
            if (batcher.crashed or not batcher.alive) and not self._stop.is_set():
                # its decode loop crashed, failing the rows it held: a fresh loop on the same model
                log.error("decode loop of version %s had stopped; restarting it", batcher.lm.version)
                batcher = self.current = self._batcher(batcher.lm)
                self.restarts += 1
            if prompt is not None:
                tok = batcher.lm.tokenizer
                row.prompt_ids = tok.encode_rendered(prompt) if rendered else tok.encode(prompt)
            batcher.submit(row)
        return batcher.lm

    def _batcher(self, lm: LoadedModel) -> Batcher:
        return Batcher(lm, self.max_batch, self.max_new_tokens, self.batch_window_ms, self.on_batch, self.compiled,
                       self.observe(lm) if self.observe else None, self.max_prompt_tokens)

    def start_polling(self, interval_s: float) -> None:
        """Poll the registry alias every ``interval_s`` and reload when it points elsewhere."""
        if interval_s <= 0 or not self.source.startswith("models:/") or "@" not in self.source:
            return
        self._poller = threading.Thread(target=self._poll, args=(interval_s,), name="alias-poller", daemon=True)
        self._poller.start()

    def _poll(self, interval_s: float) -> None:
        name, _, alias = self.source[len("models:/"):].partition("@")
        while not self._stop.wait(interval_s):
            try:
                target = resolve_alias(name, alias)
            except Exception as e:
                log.warning("polling %s failed: %s", self.source, str(e).splitlines()[0] if str(e) else e)
                continue
            if target is not None and str(target) != self.version:
                log.info("alias %s@%s moved to version %s: reloading", name, alias, target)
                self.reload()

    def loads(self) -> list[tuple[LoadedModel, int, int]]:
        """(model, running, waiting) of the served version and of retired ones still draining."""
        batchers = [self.current, *self.retired]
        return [(b.lm, *b.counts()) for b in batchers if b is not None and (b is self.current or b.alive)]

    def stop(self) -> None:
        self._stop.set()
        for b in [self.current, *self.retired]:
            if b is not None:
                b.stop()

    def health(self) -> dict:
        lm = self.current.lm if self.current else None
        return {
            "status": "ok" if lm else "loading",
            "ready": lm is not None,
            "model_name": lm.name if lm else None,
            "model_version": lm.version if lm else None,
            "model_source": self.source,
            "loaded_at": lm.loaded_at if lm else None,
            "loading": self.loading,
            "swaps": self.swaps,
            "decode_restarts": self.restarts,
            "retired_draining": sum(1 for b in self.retired if b.alive),
            "last_reload_error": self.last_reload_error,
            "last_reload_at": self.last_reload_at,
            "active_rows": self.current.load() if self.current else 0,
            "compiled_decode": bool(getattr(getattr(self.current, "decoder", None), "compiled", False)),
        }

