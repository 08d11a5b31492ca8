"""The ingestion pipeline: read -> clean -> skip known -> validate (GX) -> quarantine / version (DVC).

Streaming: inputs are read in chunks of ``data.chunk_rows``; each chunk is cleaned, validated and
appended to a staged Parquet shard with a ``ParquetWriter``, so memory stays bounded whatever the
input size. Only when the whole batch is read is the shard versioned (``DataRegistry``), so an
interrupted ingest leaves the previous version intact.

Overlap: for files, a reader thread reads, cleans and hashes the next chunk (Arrow kernels and a
``digests.Sha256Worker`` process, so mostly without the GIL) while the calling thread dedupes and
validates the current one, and a writer thread appends the previous one to the shard.

Accounting (``IngestResult``), for every batch::

    rows == accepted + quarantined + skipped_known

``skipped_known`` counts rows whose id (sha256 of the cleaned text) is already in the current
dataset version or already quarantined for a row-level reason: re-ingesting an unchanged source
is then a no-op (no new version, no quarantine flood). A batch with nothing known has
``accepted + quarantined == rows``. A row is ``quarantined`` when it fails an expectation of the
suite or cannot be parsed at all; the quarantine Parquet (``data/quarantine/``) holds the record
and a ``reasons`` column naming the failed expectations. When the share of quarantined rows
among the new ones passes ``data.max_failure_rate`` the batch is refused whole: nothing is
versioned and its passing rows are quarantined too with reason ``batch_refused`` (they are not
treated as known, so a fixed re-ingest accepts them).
"""

from __future__ import annotations

import binascii
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from lmcore.config import DataParams, load_params
from lmcore.data.clean import clean_array, make_cleaner
from lmcore.data.digests import Sha256Worker
from lmcore.data.sources import InputFile, RawBatch, Refused, read, resolve
from lmcore.data.validate import Validator
from lmcore.data.versions import COMPRESSION, DataRegistry, shard_schema
from lmcore.errors import LmopsError
from lmcore.locks import file_lock

if TYPE_CHECKING:
    from concurrent.futures import Future
    from pathlib import Path

    from lmcore.data.digests import Sha256Worker
    from lmcore.data.validate import Validator

REFUSED_REASON = "batch_refused"
T = TypeVar("T")
_END = object()  # end of a prefetched iterator


@dataclass(frozen=True)
class IngestResult:
    """What one ingest did; ``rows == accepted + quarantined + skipped_known`` always holds."""

    rows: int
    accepted: int
    quarantined: int
    version: str | None
    refusals: list[str]
    quarantine_path: str | None
    data_docs: str | None
    skipped_known: int = 0
    batch_refused: bool = False
    failure_rate: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    # seconds per phase: where the time went. For files, read and clean run on the reader thread,
    # beside the others; wait is the time the main loop waited for them.
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ingest(paths: Sequence[str], params: DataParams, *, source: str | None = None, fmt: str = "auto",
           text_field: str = "text", registry: DataRegistry | None = None, progress: bool = True,
           include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
           suite: str = "raw_text") -> IngestResult:
    """Ingest files, folders or built-in corpora (default ``params.sources``) as kind ``raw``.

    Unreadable files are refused by name (``refusals``); if nothing at all is readable this is an
    ``LmopsError`` naming the first problems.
    """
    registry = registry or DataRegistry.open(git_commit=params.git_commit)
    paths = list(paths) or list(params.sources)
    inputs, refusals = resolve(paths, fmt, source, tuple(include or params.include), tuple(exclude or params.exclude))
    if not inputs:
        raise LmopsError("nothing to ingest: " + ("; ".join(refusals[:3]) if refusals else "no matching files"))
    total = 0
    for inp in inputs:
        if inp.path is not None:
            with contextlib.suppress(OSError):
                total += inp.path.stat().st_size

    def chunks() -> Iterator[tuple[InputFile, RawBatch]]:
        for inp in inputs:
            try:
                for rb in read(inp, params, text_field):
                    yield inp, rb
            except Refused as e:
                refusals.append(str(e))

    result = _run(chunks(), kind="raw", suite=suite, params=params, registry=registry, progress=progress,
                  refusals=refusals, total_bytes=total or None, files=len(inputs), prefetch=True)
    if result.rows == 0 and refusals:
        raise LmopsError("nothing ingested: " + "; ".join(refusals[:3]))
    return result


def ingest_records(df_or_iter: Any, kind: str, suite: str, params: DataParams | None = None, *,
                   registry: DataRegistry | None = None, source: str | None = None,
                   progress: bool = False) -> IngestResult:
    """Validate and version records that are already in memory (the feedback harvester's path).

    ``df_or_iter`` is a DataFrame, or an iterable of DataFrames or dicts, with a ``text`` column
    and optionally ``source``, ``uri``, ``meta`` (dict or JSON string) and ``created_at``. Rows
    are cleaned and given ids exactly like ingested files, then validated against
    ``expectations/<suite>.json`` and versioned as ``data/<kind>/``.
    """
    if params is None:
        params = load_params().data
    registry = registry or DataRegistry.open(git_commit=params.git_commit)
    default_source = source or kind

    def frames() -> Iterator[Any]:
        if isinstance(df_or_iter, pd.DataFrame):
            yield df_or_iter
            return
        buf: list[dict] = []
        for item in df_or_iter:
            if isinstance(item, pd.DataFrame):
                yield item
            elif isinstance(item, dict):
                buf.append(item)
                if len(buf) >= params.chunk_rows:
                    yield pd.DataFrame(buf)
                    buf = []
            else:
                raise LmopsError(f"ingest_records takes DataFrames or dicts, not {type(item).__name__}")
        if buf:
            yield pd.DataFrame(buf)

    def chunks() -> Iterator[tuple[InputFile, RawBatch]]:
        inp = InputFile(name=f"<{kind} records>", fmt="records", source=default_source)
        for df in frames():
            if "text" not in df.columns:
                raise LmopsError(f"{kind} records need a 'text' column (got: {', '.join(map(str, df.columns))})")
            for start in range(0, len(df), params.chunk_rows):
                part = df.iloc[start:start + params.chunk_rows]
                n = len(part)
                meta = part["meta"].map(_meta_str).tolist() if "meta" in part else "{}"
                extra = {}
                if "source" in part:
                    extra["source"] = part["source"].fillna(default_source).astype(str).tolist()
                if "created_at" in part:
                    extra["created_at"] = pd.to_datetime(part["created_at"], utc=True, errors="coerce")
                uri = part["uri"].fillna("").astype(str).tolist() if "uri" in part else f"{kind}:"
                yield inp, RawBatch(part["text"].tolist(), uri, meta, n, extra=extra)

    return _run(chunks(), kind=kind, suite=suite, params=params, registry=registry, progress=progress,
                refusals=[], total_bytes=None, files=0, prefetch=False)


def _meta_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and v != v):
        return "{}"
    return json.dumps(v, ensure_ascii=False, default=str, sort_keys=True)


def expectation_params(params: DataParams) -> dict[str, Any]:
    """Values for the ``$PARAMETER`` references of the suites."""
    return {
        "min_chars": params.min_chars,
        "max_chars": params.max_chars,
        "allowed_sources": list(params.allowed_sources),
        "created_after": pd.Timestamp("1970-01-01", tz="UTC"),
        "created_before": pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=1),
    }


class _Progress:
    """A rows+bytes bar on a TTY (tqdm), nothing otherwise."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="ingest", leave=False, file=sys.stderr)

    def update(self, nbytes: int, rows: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix(rows=rows, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hex_ids(digests: bytes) -> Any:
    """The hex ids of concatenated 32-byte sha256 digests, as an Arrow-backed string Series (one hexlify)."""
    n = len(digests) // 32
    offsets = np.arange(0, 64 * (n + 1), 64, dtype=np.int64)
    ids = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(binascii.hexlify(digests)))
    return pd.Series(pd.array(ids, dtype="str"))


def _const(value: str, n: int) -> Any:
    """A string column of one value, Arrow-backed (cheap to validate and to write back to Parquet)."""
    return pd.Series(pd.array(pa.repeat(pa.scalar(value, pa.large_string()), n), dtype="str"))


def _as_arrow(texts: Any) -> Any:
    """An Arrow string array of the raw texts, or None (non-strings, or not representable)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if isinstance(texts, pa.Array):
        return texts if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type) else None
    try:
        arr = pa.array(texts, type=pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeError, TypeError):
        return None
    return arr if arr.null_count == 0 else None


@dataclass
class _Chunk:
    """One input chunk made into records: the frame, its parse errors and its dedupe keys."""

    rb: RawBatch
    df: Any  # the record frame (shard schema columns)
    parse_err: Any  # bool per row (row could not be parsed at all), or None
    keys: Any  # the sha256 digest per row (numpy, None where the text is null): the in-batch duplicate keys


def _prepare(chunks: Iterable[tuple[InputFile, RawBatch]], params: DataParams,
             tm: Counter[str]) -> Generator[_Chunk, None, None]:
    """Clean and hash every chunk (may run on the reader thread); seconds go to ``tm`` read / clean."""
    clean = make_cleaner(params)
    now = pd.Timestamp.now(tz="UTC").floor("us")
    it = iter(chunks)
    with Sha256Worker() as worker:
        while True:
            t0 = time.perf_counter()
            item = next(it, None)
            t1 = time.perf_counter()
            tm["read"] += t1 - t0
            if item is None:
                return
            chunk = _frame(*item, clean, now, params, worker)
            tm["clean"] += time.perf_counter() - t1
            yield chunk


def _frame(inp: InputFile, rb: RawBatch, clean: Callable[[str], str], now: Any, params: DataParams,
           worker: Sha256Worker) -> _Chunk:
    """Raw rows -> records: cleaned text, its sha256 (id and dedupe key), source, uri, created_at, meta.

    Cleaning runs vectorised on Arrow when it can (same rules as ``clean.make_cleaner``) and the
    ``worker`` (``digests.Sha256Worker``) hashes the cleaned texts; else both run per text here.
    """
    text_col = None
    arr = _as_arrow(rb.texts)
    if arr is not None and arr.null_count == 0:
        cleaned = clean_array(arr, params)
        if cleaned is not None:
            text_col = pd.Series(pd.array(cleaned, dtype="str"))
            digests = worker.digests(cleaned)
            id_col = _hex_ids(digests)
            keys = np.frombuffer(digests, dtype="V32")
    if text_col is None:  # per text; an Arrow array lands here when it holds nulls (JSON ``"text": null``)
        raw = arr.to_pylist() if arr is not None else rb.texts
        texts = [clean(t) if isinstance(t, str) else None for t in raw]
        text_col = pd.Series(texts, dtype="str")
        keys = np.empty(len(texts), dtype=object)
        keys[:] = [sha256(t.encode()).digest() if t is not None else None for t in texts]
        id_col = pd.Series([k.hex() if k is not None else None for k in keys], dtype="str")
    errors = rb.errors
    n = len(text_col)
    src = rb.extra.get("source")
    created = rb.extra.get("created_at")
    df = pd.DataFrame({
        "id": id_col,
        "text": text_col,
        "source": pd.Series(src, dtype="str") if src is not None else _const(inp.source, n),
        "uri": pd.Series(rb.uri, dtype="str") if isinstance(rb.uri, list) else _const(rb.uri, n),
        "created_at": (pd.Series(np.asarray(created), dtype="datetime64[us, UTC]") if created is not None
                       else pd.Series(now, index=pd.RangeIndex(n), dtype="datetime64[us, UTC]")),
        "meta": pd.Series(rb.meta, dtype="str") if isinstance(rb.meta, list) else _const(rb.meta, n),
    })
    return _Chunk(rb, df, np.array([e is not None for e in errors]) if errors else None, keys)


def _duplicates(keys: list[bytes | None], seen: set[bytes]) -> Any:
    """Per row: was its key read before in this batch (an earlier chunk or an earlier row)? Adds the keys to ``seen``.

    Set operations in C when no row is a duplicate (the common case), the row-by-row pass otherwise.
    """
    if None not in keys and seen.isdisjoint(keys):
        size = len(seen)
        seen.update(keys)
        if len(seen) - size == len(keys):
            return np.zeros(len(keys), bool)
        seen.difference_update(keys)  # disjoint before: this restores it exactly
    seen_add = seen.add
    return np.fromiter((k is not None and (k in seen or bool(seen_add(k))) for k in keys), bool, len(keys))


class _Prefetch(Generic[T]):
    """Iterates ``items`` one ahead on a thread, starting at construction: reading, Arrow's JSON
    parsing and waiting for the hashing worker run without the GIL, so they overlap the set-up
    and the validation of the previous chunk on the calling thread."""

    def __init__(self, items: Generator[T, None, None]) -> None:
        self.items = items
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lmops-ingest-read")
        self.ahead = self.pool.submit(next, items, _END)

    def __iter__(self) -> _Prefetch[T]:
        return self

    def __next__(self) -> T:
        item = self.ahead.result()
        if item is _END:
            raise StopIteration
        self.ahead = self.pool.submit(next, self.items, _END)
        return item

    def close(self) -> None:
        """Stop: ``items`` is closed on the reader thread once a read in flight is done."""
        self.pool.submit(self.items.close)
        self.pool.shutdown(wait=True)


class _Writes:
    """Parquet writes on one background thread, one table in flight: Arrow encodes and compresses without
    the GIL, so writing a chunk overlaps cleaning and validating the next one."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lmops-ingest-write")
        self.last: Future | None = None

    def write(self, writer: Any, table: Any) -> None:
        self.wait()
        self.last = self.pool.submit(writer.write_table, table)

    def wait(self) -> None:
        """Until the write in flight is done; raises its error."""
        last, self.last = self.last, None
        if last is not None:
            last.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _run(chunks: Iterator[tuple[InputFile, RawBatch]], *, registry: DataRegistry, **kwargs: Any) -> IngestResult:
    """One ingest at a time per lmops home: deduplication against known ids must see every
    earlier batch, and GX/DVC set-up must not race with another run's."""
    registry.home.mkdir(parents=True, exist_ok=True)
    with file_lock(registry.home / "locks" / "ingest.lock", timeout_s=3600):
        return _run_locked(chunks, registry=registry, **kwargs)


def _run_locked(chunks: Iterator[tuple[InputFile, RawBatch]], *, kind: str, suite: str, params: DataParams,
                registry: DataRegistry, progress: bool, refusals: list[str], total_bytes: int | None,
                files: int, prefetch: bool) -> IngestResult:
    """The pipeline. With ``prefetch`` (our own file readers, safe on any thread) chunks are read,
    cleaned and hashed on a reader thread while this one validates and writes the previous chunk;
    the time it waits for them is ``wait``. Otherwise (caller's iterables) they run inline here."""
    t0 = time.perf_counter()
    b = _Batch(registry, params, kind, suite, tick=t0)
    bar = _Progress(progress, total_bytes)
    prep_tm: Counter[str] = Counter()
    prepared = _prepare(chunks, params, prep_tm)
    items: _Prefetch[_Chunk] | Generator[_Chunk, None, None] = _Prefetch(prepared) if prefetch else prepared
    try:
        b.start()  # (with prefetch, the first chunk is being read meanwhile)
        for chunk in items:
            b.lap("wait" if prefetch else None)
            validated = b.take(chunk)
            bar.update(chunk.rb.nbytes, b.rows)
            if validated:
                b.lap("write")
        docs = b.validator.build_docs() if b.validator is not None else None  # (the last chunk is written meanwhile)
        b.lap("data_docs")
        refused, failure_rate = b.settle()
        version = b.version(failure_rate) if b.accepted and not refused else None
        qpath = b.keep_quarantine()
    finally:
        items.close()
        bar.close()
        b.close()
    b.lap("finish")
    b.tm.update(prep_tm)
    assert b.accepted + b.quarantined + b.skipped == b.rows, "ingest accounting broken"
    return IngestResult(rows=b.rows, accepted=b.accepted, quarantined=b.quarantined, version=version,
                        refusals=list(refusals), quarantine_path=qpath, data_docs=docs, skipped_known=b.skipped,
                        batch_refused=refused, failure_rate=round(failure_rate, 6), reasons=dict(b.reasons),
                        files=files, bytes=b.nbytes, seconds=round(time.perf_counter() - t0, 3),
                        timings={k: round(v, 3) for k, v in b.tm.items()})


@dataclass
class _Batch:
    """One ingest batch as it runs: the staged shard and quarantine files (written on the ``_Writes``
    thread), the ids seen so far, the running counts and the seconds per phase."""

    registry: DataRegistry
    params: DataParams
    kind: str
    suite: str
    tick: float  # when the current phase began (``lap``)
    tm: Counter[str] = field(default_factory=Counter)
    batch_id: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ"))
    rows: int = 0
    accepted: int = 0
    quarantined: int = 0
    skipped: int = 0
    nbytes: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    seen: set[bytes] = field(default_factory=set)  # sha256 digests of the rows read so far
    known: Any = None  # ids already versioned or quarantined (``start``)
    validator: Validator | None = None
    writer: Any = None  # ParquetWriter of the staged shard, from the first accepted row
    qwriter: Any = None  # ParquetWriter of the staged quarantine, from the first quarantined row
    schema: Any = field(init=False)  # the shard's Arrow schema; ``qschema`` adds reasons and batch
    qschema: Any = field(init=False)
    cols: list[str] = field(init=False)
    staged: Path = field(init=False)  # the shard being written, until ``version`` adds it to the registry
    qstaged: Path = field(init=False)  # the quarantine being written, until ``keep_quarantine`` moves it
    writes: _Writes = field(init=False)

    def __post_init__(self) -> None:
        self.schema = shard_schema()
        self.qschema = self.schema.append(pa.field("reasons", pa.string())).append(pa.field("batch", pa.string()))
        self.cols = list(self.schema.names)
        self.staged = self.registry.staging_path()
        self.qstaged = self.registry.staging_path(".quarantine.parquet")
        self.writes = _Writes()

    def lap(self, name: str | None) -> None:
        """Charge the time since the last lap to ``name`` (None: it is counted by ``_prepare``)."""
        now = time.perf_counter()
        if name is not None:
            self.tm[name] += now - self.tick
        self.tick = now

    def start(self) -> None:
        """The registry set up and its known ids read; the validator built now when every row will need it."""
        self.registry.ensure_initialized()
        self.known = self.registry.known_ids()
        if not self.known:  # every row will be validated: build the validator while the first chunk is read
            self.validator = self._new_validator()
        self.lap("setup")

    def _new_validator(self) -> Validator:
        return Validator(self.suite, expectation_params(self.params), self.registry.home, self.registry.workspace)

    def take(self, chunk: _Chunk) -> bool:
        """Count a chunk; skip its known rows, quarantine its unparseable ones, validate the rest and
        write them (failing rows to the quarantine). False when no row was left to validate."""
        rb, df, parse_err, keys = chunk.rb, chunk.df, chunk.parse_err, chunk.keys
        self.rows += len(df)
        self.nbytes += rb.nbytes
        if self.known and len(df):  # ids already versioned or quarantined: a re-ingest is a no-op
            df, keys, parse_err = self._skip_known(rb, df, keys, parse_err)
        if parse_err is not None and parse_err.any():
            df, keys = self._quarantine_unparseable(rb, df, keys, parse_err)
        if not len(df):
            return False
        df = df.reset_index(drop=True)
        df["duplicate"] = _duplicates(keys.tolist(), self.seen)
        self.lap("dedupe")
        if self.validator is None:  # on first use: a no-op re-ingest never imports GX
            self.validator = self._new_validator()
            self.lap("setup")
        outcome = self.validator.validate(df)
        self.lap("validate")
        bad = outcome.bad.to_numpy()
        for label, n in outcome.failed.items():
            self.reasons[label] += n
        if bad.any():
            self.quarantine(df[bad], outcome.reasons[bad].tolist())
            self.quarantined += int(bad.sum())
        good = df[~bad] if bad.any() else df
        if len(good):
            self._accept(good)
        return True

    def _skip_known(self, rb: RawBatch, df: Any, keys: Any, parse_err: Any) -> tuple[Any, Any, Any]:
        is_known = np.fromiter((i in self.known for i in df["id"]), bool, len(df))
        if is_known.any():
            self.skipped += int(is_known.sum())
            df, keys = df[~is_known], keys[~is_known]
            if parse_err is not None:
                keep = ~is_known
                rb.errors = [e for e, k in zip(rb.errors, keep, strict=True) if k]
                parse_err = parse_err[keep]
        return df, keys, parse_err

    def _quarantine_unparseable(self, rb: RawBatch, df: Any, keys: Any, parse_err: Any) -> tuple[Any, Any]:
        errs = pd.Series([e for e in rb.errors if e is not None], dtype="str")
        bad = df[parse_err]
        self.quarantine(bad, ("unparseable: " + errs.str.replace(r"^line \d+: ", "", regex=True)).tolist())
        self.quarantined += len(bad)
        self.reasons["unparseable"] += len(bad)
        return df[~parse_err], keys[~parse_err]

    def _accept(self, good: Any) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.staged, self.schema, compression=COMPRESSION)
        self.writes.write(self.writer, pa.Table.from_pandas(good[self.cols], schema=self.schema,
                                                            preserve_index=False))
        self.accepted += len(good)
        self.sources.update(good["source"].astype(str).value_counts().to_dict())

    def quarantine(self, df: Any, why: Any) -> None:
        """Append rows to the staged quarantine with their reasons (one string, or one per row)."""
        q = df[self.cols].copy()
        q["reasons"] = why if isinstance(why, str) else pd.Series(why, index=df.index, dtype="str")
        q["batch"] = self.batch_id
        table = pa.Table.from_pandas(q, schema=self.qschema, preserve_index=False)
        if self.qwriter is None:
            self.qwriter = pq.ParquetWriter(self.qstaged, self.qschema, compression=COMPRESSION)
        self.writes.write(self.qwriter, table)

    def settle(self) -> tuple[bool, float]:
        """Finish both staged files; past ``data.max_failure_rate`` the accepted rows join the quarantine
        (reason ``batch_refused``). Returns (refused, failure rate among the new rows)."""
        eligible = self.rows - self.skipped
        failure_rate = self.quarantined / eligible if eligible else 0.0
        refused = eligible > 0 and failure_rate > self.params.max_failure_rate
        self.writes.wait()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if refused and self.accepted:
            for rbatch in pq.ParquetFile(self.staged).iter_batches(batch_size=self.params.chunk_rows):
                self.quarantine(rbatch.to_pandas(), REFUSED_REASON)
            self.quarantined += self.accepted
            self.reasons[REFUSED_REASON] += self.accepted
            self.accepted = 0
        self.writes.wait()
        if self.qwriter is not None:
            self.qwriter.close()
            self.qwriter = None
        return refused, failure_rate

    def version(self, failure_rate: float) -> str:
        """Version the staged shard (DVC); returns the new dataset version id."""
        stats = {"accepted": self.accepted, "quarantined": self.quarantined, "skipped_known": self.skipped,
                 "sources": dict(self.sources), "rows_read": self.rows, "suite": self.suite, "batch": self.batch_id,
                 "failure_rate": round(failure_rate, 6)}
        self.lap("write")
        version = self.registry.add_shard_file(self.staged, self.kind, stats).id
        self.lap("version")
        return version

    def keep_quarantine(self) -> str | None:
        """Move the staged quarantine into ``data/quarantine/``; its path, or None when no row was quarantined."""
        if not self.quarantined:
            return None
        self.registry.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dest = self.registry.quarantine_dir / f"{self.batch_id}-{self.kind}.parquet"
        os.replace(self.qstaged, dest)
        return str(dest)

    def close(self) -> None:
        """Stop the writer thread, close open writers and remove what is left staged (always runs)."""
        self.writes.close()
        for w in (self.writer, self.qwriter):
            if w is not None:
                w.close()
        for p in (self.staged, self.qstaged):
            if p.exists():
                p.unlink()
