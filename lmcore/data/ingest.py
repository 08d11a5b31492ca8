"""The ingestion pipeline: read -> clean -> skip known -> validate (GX) -> quarantine / version (DVC).

Streaming: inputs are read in chunks of ``data.chunk_rows``; each chunk is cleaned, validated and
appended to a staged Parquet shard with a ``ParquetWriter``, so memory stays bounded whatever the
input size. Only when the whole batch is read is the shard versioned (``DataRegistry``), so an
interrupted ingest leaves the previous version intact.

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

import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from lmcore.config import DataParams
from lmcore.data.registry import DataRegistry, shard_schema
from lmcore.data.sources import InputFile, RawBatch, Refused, read, resolve
from lmcore.errors import LmopsError

REFUSED_REASON = "batch_refused"


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
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: where the time went

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

    result = _run(chunks(), kind="raw", suite=suite, params=params, registry=registry,
                  progress=progress, refusals=refusals, total_bytes=total or None, files=len(inputs))
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
    import pandas as pd

    if params is None:
        from lmcore.config import load_params

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
                refusals=[], total_bytes=None, files=0)


def _meta_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and v != v):
        return "{}"
    return json.dumps(v, ensure_ascii=False, default=str, sort_keys=True)


def expectation_params(params: DataParams) -> dict[str, Any]:
    """Values for the ``$PARAMETER`` references of the suites."""
    import pandas as pd

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
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="ingest", leave=False, file=sys.stderr)

    def update(self, nbytes: int, rows: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix(rows=rows, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hex_ids(cleaned: Any) -> Any:
    """sha256 hex of every text of an Arrow array: one digest call per row, hex-encoded vectorised."""
    from hashlib import sha256

    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(cleaned)
    blobs = pc.cast(cleaned, pa.large_binary()).to_pylist()
    raw = np.frombuffer(b"".join([sha256(b).digest() for b in blobs]), dtype=np.uint8).reshape(n, 32)
    hexchars = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    out = np.empty((n, 64), dtype=np.uint8)
    out[:, 0::2] = hexchars[raw >> 4]
    out[:, 1::2] = hexchars[raw & 15]
    offsets = np.arange(0, 64 * (n + 1), 64, dtype=np.int64)
    ids = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out.tobytes()))
    return pd.Series(pd.array(ids, dtype="str"))


def _const(value: str, n: int) -> Any:
    """A string column of one value, Arrow-backed (cheap to validate and to write back to Parquet)."""
    import pandas as pd
    import pyarrow as pa

    return pd.Series(pd.array(pa.array([value] * n, pa.large_string()), dtype="str"))


def _as_arrow(texts: Any) -> Any:
    """An Arrow string array of the raw texts, or None (non-strings, or not representable)."""
    import pyarrow as pa

    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if isinstance(texts, pa.Array):
        return texts if pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type) else None
    try:
        arr = pa.array(texts, type=pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeError, TypeError):
        return None
    return arr if arr.null_count == 0 else None


def _frame(inp: InputFile, rb: RawBatch, clean: Any, now: Any, params: DataParams) -> tuple[Any, Any]:
    """Raw rows -> (record frame with the helper column, per-row parse errors or None).

    Cleaning runs vectorised on Arrow when it can (same rules as ``clean.make_cleaner``), else per
    text in Python; the id is the sha256 of the cleaned text either way.
    """
    from hashlib import sha256

    import numpy as np
    import pandas as pd

    from lmcore.data.clean import clean_array

    text_col = id_col = None
    arr = _as_arrow(rb.texts)
    if arr is not None:
        cleaned = clean_array(arr, params)
        if cleaned is not None:
            text_col = pd.Series(pd.array(cleaned, dtype="str"))
            id_col = _hex_ids(cleaned)
    if text_col is None:
        texts = [clean(t) if isinstance(t, str) else None for t in rb.texts]
        text_col = pd.Series(texts, dtype="str")
        id_col = pd.Series([sha256(t.encode()).hexdigest() if t is not None else None for t in texts], dtype="str")
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
    return df, (np.array([e is not None for e in errors]) if errors else None)


def _run(chunks: Iterable[tuple[InputFile, RawBatch]], *, registry: DataRegistry, **kwargs: Any) -> IngestResult:
    """One ingest at a time per lmops home: deduplication against known ids must see every
    earlier batch, and GX/DVC set-up must not race with another run's."""
    from lmcore.locks import file_lock

    registry.home.mkdir(parents=True, exist_ok=True)
    with file_lock(registry.home / "locks" / "ingest.lock", timeout_s=3600):
        return _run_locked(chunks, registry=registry, **kwargs)


def _run_locked(chunks: Iterable[tuple[InputFile, RawBatch]], *, kind: str, suite: str, params: DataParams,
                registry: DataRegistry, progress: bool, refusals: list[str], total_bytes: int | None,
                files: int) -> IngestResult:
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmcore.data.clean import make_cleaner
    from lmcore.data.validate import Validator

    t0 = time.perf_counter()
    registry.ensure_initialized()
    tm: Counter[str] = Counter()
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now_ = time.perf_counter()
        tm[name] += now_ - tick
        tick = now_

    known = registry.known_ids()
    validator: Validator | None = None  # built on first use: a no-op re-ingest never imports GX
    clean = make_cleaner(params)
    now = pd.Timestamp.now(tz="UTC").floor("us")
    batch_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    schema = shard_schema()
    qschema = schema.append(pa.field("reasons", pa.string())).append(pa.field("batch", pa.string()))
    staged = registry.staging_path()
    qstaged = registry.staging_path(".quarantine.parquet")
    writer = qwriter = None
    seen: set[str] = set()
    rows = accepted = quarantined = skipped = nbytes = 0
    reasons: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    bar = _Progress(progress, total_bytes)
    cols = list(schema.names)

    def quarantine(df: Any, why: Any) -> None:
        nonlocal qwriter
        q = df[cols].copy()
        q["reasons"] = why if isinstance(why, str) else pd.Series(why, index=df.index, dtype="str")
        q["batch"] = batch_id
        table = pa.Table.from_pandas(q, schema=qschema, preserve_index=False)
        if qwriter is None:
            qwriter = pq.ParquetWriter(qstaged, qschema)
        qwriter.write_table(table)

    try:
        lap("setup")
        for inp, rb in chunks:
            lap("read")
            df, parse_err = _frame(inp, rb, clean, now, params)
            lap("clean")
            rows += len(df)
            nbytes += rb.nbytes
            if known and len(df):  # ids already versioned or quarantined: a re-ingest is a no-op
                is_known = np.fromiter((i in known for i in df["id"]), bool, len(df))
                if is_known.any():
                    skipped += int(is_known.sum())
                    df = df[~is_known]
                    if parse_err is not None:
                        keep = ~is_known
                        rb.errors = [e for e, k in zip(rb.errors, keep, strict=True) if k]
                        parse_err = parse_err[keep]
            if parse_err is not None and parse_err.any():
                errs = pd.Series([e for e in rb.errors if e is not None], dtype="str")
                bad = df[parse_err]
                quarantine(bad, ("unparseable: " + errs.str.replace(r"^line \d+: ", "", regex=True)).tolist())
                quarantined += len(bad)
                reasons["unparseable"] += len(bad)
                df = df[~parse_err]
            if not len(df):
                bar.update(rb.nbytes, rows)
                continue
            # one pass: a row is a duplicate when its id was read before in this batch (any chunk)
            seen_add = seen.add
            id_list = df["id"].tolist()
            dup = np.fromiter((i is not None and (i in seen or bool(seen_add(i))) for i in id_list), bool,
                              len(id_list))
            df = df.reset_index(drop=True)
            df["duplicate"] = dup
            lap("dedupe")
            if validator is None:
                validator = Validator(suite, expectation_params(params), registry.home, registry.workspace)
                lap("setup")
            outcome = validator.validate(df)
            lap("validate")
            bad = outcome.bad.to_numpy()
            for label, n in outcome.failed.items():
                reasons[label] += n
            if bad.any():
                quarantine(df[bad], outcome.reasons[bad].tolist())
                quarantined += int(bad.sum())
            good = df[~bad]
            if len(good):
                if writer is None:
                    writer = pq.ParquetWriter(staged, schema)
                writer.write_table(pa.Table.from_pandas(good[cols], schema=schema, preserve_index=False))
                accepted += len(good)
                sources.update(good["source"].astype(str).value_counts().to_dict())
            bar.update(rb.nbytes, rows)
            lap("write")
        eligible = rows - skipped
        failure_rate = quarantined / eligible if eligible else 0.0
        refused = eligible > 0 and failure_rate > params.max_failure_rate
        if writer is not None:
            writer.close()
            writer = None
        if refused and accepted:
            for rbatch in pq.ParquetFile(staged).iter_batches(batch_size=params.chunk_rows):
                quarantine(rbatch.to_pandas(), REFUSED_REASON)
            quarantined += accepted
            reasons[REFUSED_REASON] += accepted
            accepted = 0
        if qwriter is not None:
            qwriter.close()
            qwriter = None
        version = None
        if accepted and not refused:
            stats = {"accepted": accepted, "quarantined": quarantined, "skipped_known": skipped,
                     "sources": dict(sources), "rows_read": rows, "suite": suite, "batch": batch_id,
                     "failure_rate": round(failure_rate, 6)}
            lap("write")
            version = registry.add_shard_file(staged, kind, stats).id
            lap("version")
        qpath = None
        if quarantined:
            registry.quarantine_dir.mkdir(parents=True, exist_ok=True)
            dest = registry.quarantine_dir / f"{batch_id}-{kind}.parquet"
            os.replace(qstaged, dest)
            qpath = str(dest)
    finally:
        bar.close()
        for w in (writer, qwriter):
            if w is not None:
                w.close()
        for p in (staged, qstaged):
            if p.exists():
                p.unlink()
    lap("finish")
    docs = validator.build_docs() if validator is not None else None
    lap("data_docs")
    assert accepted + quarantined + skipped == rows, "ingest accounting broken"
    return IngestResult(rows=rows, accepted=accepted, quarantined=quarantined, version=version,
                        refusals=list(refusals), quarantine_path=qpath, data_docs=docs, skipped_known=skipped,
                        batch_refused=refused, failure_rate=round(failure_rate, 6), reasons=dict(reasons),
                        files=files, bytes=nbytes, seconds=round(time.perf_counter() - t0, 3),
                        timings={k: round(v, 3) for k, v in tm.items()})
