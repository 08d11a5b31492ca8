"""Connectors: text/Markdown files, folders, JSONL, CSV, Parquet and the built-in ``python-stdlib`` corpus.

Every connector yields ``RawBatch`` chunks of at most ``data.chunk_rows`` rows, so a large input
streams in bounded memory. A connector never judges content (validation does); it only refuses a
*file* it cannot read as its format (``Refused``: empty, binary, missing text column, not
Parquet...) and reports rows it cannot parse (a broken JSONL line) as ``errors`` so that they
are quarantined, never lost. Undecodable bytes are decoded as U+FFFD (``errors="replace"``) so
the UTF-8 expectation quarantines the record.

Text and Markdown files are cut into records at blank-line (paragraph) boundaries, grouped up to
``data.record_chars``. The ``python-stdlib`` corpus is the installed standard library's own
``.py`` source (tests, ``idle_test``, ``site-packages`` left out), cut at top-level definition
boundaries (``ast``), small neighbours grouped; files are taken in sha256-of-path order until
``data.stdlib_max_records`` records, so the choice is deterministic for a Python version.
"""

from __future__ import annotations

import ast
import errno
import fnmatch
import hashlib
import io
import json
import os
import stat
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from lmcore.config import DataParams
from lmcore.errors import LmopsError

FORMATS = ("auto", "text", "jsonl", "csv", "parquet")
BUILTIN_SOURCES = ("python-stdlib",)
DEFAULT_INCLUDE = ("*.txt", "*.md", "*.markdown", "*.rst", "*.py", "*.jsonl", "*.ndjson", "*.csv", "*.parquet")
_EXT_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_FORMAT_SOURCE = {"text": "files", "jsonl": "jsonl", "csv": "csv", "parquet": "parquet"}
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled"}
_BLOCK_BYTES = 8 << 20  # JSONL bytes read at once (bounded memory; the first chunk is ready sooner)
_PARSE_BYTES = 2 << 20  # ...and parsed by Arrow in pieces of this size, in parallel


class Refused(Exception):
    """A whole file that cannot be read as its format; ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class InputFile:
    """One thing to read: a file with its format, or a built-in corpus (``path`` None)."""

    name: str
    fmt: str
    source: str
    path: Path | None = None


@dataclass
class RawBatch:
    """Up to ``chunk_rows`` raw rows. ``uri``/``meta`` are one value for all rows or one per row.

    ``texts`` is a list, or an Arrow string array on the JSONL fast path (cleaned vectorised).
    ``errors[i]`` is not None when row i could not be parsed at all; its ``texts[i]`` then holds
    the raw line (for the quarantine) and it never reaches validation.
    """

    texts: Any
    uri: str | list[str]
    meta: str | list[str]
    nbytes: int
    errors: list[str | None] | None = None
    extra: dict = field(default_factory=dict)


# -- resolving paths --------------------------------------------------------------------------


def _detect(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return _EXT_FORMAT.get(path.suffix.lower(), "text")


def _matches(rel: str, name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(name, g) for g in globs)


def resolve(paths: Iterable[str], fmt: str = "auto", source: str | None = None,
            include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> tuple[list[InputFile], list[str]]:
    """Expand paths (folders recursively, include/exclude globs) into inputs plus per-file refusals.

    A missing path, a symlink loop or an unreadable folder is a refusal naming the path; symlinked
    folders are followed once (a folder already visited is a loop).
    """
    if fmt not in FORMATS:
        raise LmopsError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    inputs: list[InputFile] = []
    refusals: list[str] = []
    for raw in paths:
        if raw in BUILTIN_SOURCES:
            inputs.append(InputFile(name=raw, fmt=raw, source=source or raw))
            continue
        p = Path(raw).expanduser()
        try:
            st = p.stat()
        except OSError as e:
            why = "symlink loop" if e.errno == errno.ELOOP else "no such file or directory"
            if e.errno not in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
                why = e.strerror or str(e)
            refusals.append(f"{raw}: {why}")
            continue
        if os.path.isdir(p):
            _walk(p, fmt, source, include or DEFAULT_INCLUDE, exclude, inputs, refusals)
        elif not _is_regular(st):
            refusals.append(f"{raw}: not a regular file")
        else:
            f = _detect(p, fmt)
            inputs.append(InputFile(name=str(p), fmt=f, source=source or _FORMAT_SOURCE[f], path=p))
    return inputs, refusals


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _walk(top: Path, fmt: str, source: str | None, include: tuple[str, ...], exclude: tuple[str, ...],
          inputs: list[InputFile], refusals: list[str]) -> None:
    seen: set[str] = set()
    found: list[Path] = []

    def onerror(e: OSError) -> None:
        refusals.append(f"{e.filename}: {e.strerror or e}")

    for folder, dirs, files in os.walk(top, followlinks=True, onerror=onerror):
        real = os.path.realpath(folder)
        if real in seen:
            refusals.append(f"{folder}: symlink loop")
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(folder) / name
            rel = str(p.relative_to(top))
            if name.startswith(".") or not _matches(rel, name, include) or _matches(rel, name, exclude):
                continue
            try:
                st = p.stat()
            except OSError as e:
                refusals.append(f"{p}: {'symlink loop' if e.errno == errno.ELOOP else (e.strerror or e)}")
                continue
            if _is_regular(st):
                found.append(p)
    for p in found:
        f = _detect(p, fmt)
        inputs.append(InputFile(name=str(p), fmt=f, source=source or _FORMAT_SOURCE[f], path=p))


# -- reading ------------------------------------------------------------------------------------


def read(inp: InputFile, params: DataParams, text_field: str = "text") -> Iterator[RawBatch]:
    """Raw rows of one input, in chunks; raises ``Refused`` for a file that cannot be read."""
    if inp.fmt == "python-stdlib":
        yield from _chunked(stdlib_records(params.record_chars, params.stdlib_max_records), params.chunk_rows)
        return
    assert inp.path is not None
    try:
        size = inp.path.stat().st_size
    except OSError as e:
        raise Refused(inp.name, e.strerror or str(e)) from None
    if size == 0:
        raise Refused(inp.name, "empty file")
    reader = {"text": _read_text, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[inp.fmt]
    try:
        yield from reader(inp, params, text_field)
    except Refused:
        raise
    except OSError as e:
        raise Refused(inp.name, e.strerror or str(e)) from None


def _uri(path: Path) -> str:
    return path.resolve().as_uri()


def _chunked(records: Iterable[tuple[str, str, str]], chunk_rows: int) -> Iterator[RawBatch]:
    texts: list[str] = []
    uris: list[str] = []
    metas: list[str] = []
    nbytes = 0
    for text, uri, meta in records:
        texts.append(text)
        uris.append(uri)
        metas.append(meta)
        nbytes += len(text)
        if len(texts) >= chunk_rows:
            yield RawBatch(texts, uris, metas, nbytes)
            texts, uris, metas, nbytes = [], [], [], 0
    if texts:
        yield RawBatch(texts, uris, metas, nbytes)


def group_paragraphs(lines: Iterable[str], limit: int, first_line: int = 1) -> Iterator[tuple[str, int, int]]:
    """Cut lines into records at blank lines, grouping paragraphs up to ``limit`` characters.

    Yields ``(text, first_line, last_line)``; a paragraph longer than ``limit`` stays whole.
    """
    cur: list[str] = []
    cur_len = 0
    cur_start = first_line
    par: list[str] = []
    par_len = 0
    par_start = first_line
    lineno = first_line - 1

    def flush_par() -> Iterator[tuple[str, int, int]]:
        nonlocal cur, cur_len, cur_start, par, par_len
        if not par:
            return
        if cur and cur_len + par_len > limit:
            yield "".join(cur), cur_start, par_start - 1
            cur, cur_len = [], 0
        if not cur:
            cur_start = par_start
        cur.extend(par)
        cur_len += par_len
        par, par_len = [], 0

    for line in lines:
        lineno += 1
        if not line.strip():
            yield from flush_par()
            if cur:
                cur.append(line)
                cur_len += len(line)
            continue
        if not par:
            par_start = lineno
        par.append(line)
        par_len += len(line)
    yield from flush_par()
    if cur and "".join(cur).strip():
        yield "".join(cur), cur_start, lineno


def _read_text(inp: InputFile, params: DataParams, text_field: str) -> Iterator[RawBatch]:
    path = inp.path
    assert path is not None
    with open(path, "rb") as fb:
        head = fb.read(8192)
    if b"\x00" in head:
        raise Refused(inp.name, "binary file (NUL bytes), not text")
    uri = _uri(path)
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        records = ((text, f"{uri}#L{a}-{b}", json.dumps({"path": str(path), "lines": [a, b]}))
                   for text, a, b in group_paragraphs(f, params.record_chars))
        any_rows = False
        for batch in _chunked(records, params.chunk_rows):
            any_rows = True
            yield batch
    if not any_rows:
        raise Refused(inp.name, "empty file (only whitespace)")


def _meta_from_rows(rows: list[dict]) -> list[str]:
    return [json.dumps(r, ensure_ascii=False, default=str, sort_keys=True) if r else "{}" for r in rows]


def _blocks(f: Any) -> Iterator[bytes]:
    """Whole lines, about ``_BLOCK_BYTES`` at a time: one read and one cut, never a list of lines."""
    rest = b""
    while data := f.read(_BLOCK_BYTES):
        buf = rest + data if rest else data
        cut = buf.rfind(b"\n") + 1
        if cut:
            yield buf[:cut]
        rest = buf[cut:]
    if rest:
        yield rest


def _parse_jsonl(block: bytes) -> Any:
    """Arrow table of a JSONL block, or None when Arrow cannot take it (the line-by-line path decides).

    Parsed in ``_PARSE_BYTES`` pieces so every core works; a line longer than that is retried as one piece.
    """
    sizes = (_PARSE_BYTES, len(block) + 1) if len(block) > _PARSE_BYTES else (len(block) + 1,)
    for size in sizes:
        try:
            return pj.read_json(io.BytesIO(block), read_options=pj.ReadOptions(block_size=size, use_threads=True),
                                parse_options=pj.ParseOptions(newlines_in_values=False))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeError):
            continue
    return None


class _Rechunk:
    """Regroups Arrow texts parsed block by block into batches of exactly ``rows`` rows (the last shorter).

    A block boundary then costs no extra, smaller chunk downstream (each chunk is one GX run and one
    row group, whatever its size).
    """

    def __init__(self, rows: int, uri: str) -> None:
        self.rows, self.uri = rows, uri
        self.texts: list[Any] = []
        self.metas: list[str | list[str]] = []
        self.n = self.nbytes = 0

    def add(self, texts: Any, meta: str | list[str], nbytes: int) -> Iterator[RawBatch]:
        self.texts.append(texts)
        self.metas.append(meta)
        self.n += len(texts)
        self.nbytes += nbytes
        while self.n >= self.rows:
            yield self._take(self.rows)

    def flush(self) -> Iterator[RawBatch]:
        if self.n:
            yield self._take(self.n)

    def _take(self, k: int) -> RawBatch:
        if len(self.texts) == 1:
            texts = self.texts[0]
        elif len({t.type for t in self.texts}) == 1:
            texts = pa.concat_arrays(self.texts)
        else:
            texts = pa.concat_arrays([t.cast(pa.large_string()) for t in self.texts])
        if all(isinstance(m, str) for m in self.metas) and len(set(self.metas)) == 1:
            meta: str | list[str] = self.metas[0]
        else:
            meta = [x for t, m in zip(self.texts, self.metas, strict=True)
                    for x in ([m] * len(t) if isinstance(m, str) else m)]
        nbytes = self.nbytes * k // self.n
        batch = RawBatch(texts[:k], self.uri, meta if isinstance(meta, str) else meta[:k], nbytes)
        rest = len(texts) - k
        self.texts = [texts[k:]] if rest else []
        self.metas = [meta if isinstance(meta, str) else meta[k:]] if rest else []
        self.n, self.nbytes = rest, self.nbytes - nbytes
        return batch


def _read_jsonl(inp: InputFile, params: DataParams, text_field: str) -> Iterator[RawBatch]:
    path = inp.path
    assert path is not None
    uri = _uri(path)
    lineno = 0
    seen_field = False
    any_rows = False
    chunker = _Rechunk(params.chunk_rows, uri)
    with open(path, "rb") as f:
        for block in _blocks(f):
            start = lineno
            lineno += block.count(b"\n") + (not block.endswith(b"\n"))
            nbytes = len(block)
            if block.isspace():
                continue
            table = _parse_jsonl(block)
            ok = table is not None and text_field in table.column_names
            if ok:
                t = table.schema.field(text_field).type
                ok = pa.types.is_string(t) or pa.types.is_large_string(t)
            if ok:
                seen_field = True
                texts = table.column(text_field).combine_chunks()  # stays Arrow: cleaned vectorised
                rest = table.drop_columns([text_field])
                meta: str | list[str] = _meta_from_rows(rest.to_pylist()) if rest.num_columns else "{}"
                any_rows = any_rows or bool(texts)
                yield from chunker.add(texts, meta, nbytes)
                continue
            yield from chunker.flush()  # rows keep their file order
            lines = block.split(b"\n")
            if block.endswith(b"\n"):
                lines.pop()
            batch, found = _jsonl_lines(lines, start, uri, text_field, nbytes)
            seen_field = seen_field or found
            any_rows = any_rows or bool(batch.texts)
            k = params.chunk_rows
            for i in range(0, len(batch.texts), k):
                part = batch.texts[i:i + k]
                yield RawBatch(part, batch.uri[i:i + k], batch.meta[i:i + k], nbytes * len(part) // len(batch.texts),
                               errors=batch.errors[i:i + k])
    yield from chunker.flush()
    if not any_rows:
        raise Refused(inp.name, "empty file (no JSON lines)")
    if not seen_field:
        raise Refused(inp.name, f"no line has a string field '{text_field}' (use --text-field)")


def _jsonl_lines(lines: list[bytes], start: int, uri: str, text_field: str,
                 nbytes: int) -> tuple[RawBatch, bool]:
    """Slow path for a block arrow could not parse: line by line, broken lines become row errors."""
    texts: list = []
    uris: list[str] = []
    metas: list[str] = []
    errors: list[str | None] = []
    found = False
    for i, raw in enumerate(lines, start=start + 1):
        if not raw.strip():
            continue
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        err = None
        text = line
        meta = "{}"
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                err = f"line {i}: not a JSON object"
            elif not isinstance(obj.get(text_field), str):
                err = f"line {i}: field '{text_field}' missing or not a string"
            else:
                found = True
                text = obj.pop(text_field)
                meta = json.dumps(obj, ensure_ascii=False, default=str, sort_keys=True) if obj else "{}"
        except ValueError as e:
            err = f"line {i}: invalid JSON ({str(e).splitlines()[0]})"
        texts.append(text)
        uris.append(f"{uri}#L{i}")
        metas.append(meta)
        errors.append(err)
    return RawBatch(texts, uris, metas, nbytes, errors=errors), found


def _read_csv(inp: InputFile, params: DataParams, text_field: str) -> Iterator[RawBatch]:
    path = inp.path
    assert path is not None
    uri = _uri(path)
    try:
        reader = pd.read_csv(path, chunksize=params.chunk_rows, dtype=str, keep_default_na=False,
                             encoding="utf-8", encoding_errors="replace")
        first = True
        for chunk in reader:
            if first and text_field not in chunk.columns:
                cols = ", ".join(map(str, chunk.columns[:10]))
                raise Refused(inp.name, f"CSV has no column '{text_field}' (columns: {cols}; use --text-field)")
            first = False
            texts = chunk[text_field].tolist()
            rest = chunk.drop(columns=[text_field])
            meta: str | list[str] = _meta_from_rows(rest.to_dict("records")) if len(rest.columns) else "{}"
            yield RawBatch(texts, uri, meta, sum(len(t) for t in texts))
        if first:
            raise Refused(inp.name, "empty CSV (header only)")
    except pd.errors.EmptyDataError:
        raise Refused(inp.name, "empty file") from None
    except (pd.errors.ParserError, UnicodeError) as e:
        raise Refused(inp.name, f"not a readable CSV ({str(e).splitlines()[0]})") from None


def _read_parquet(inp: InputFile, params: DataParams, text_field: str) -> Iterator[RawBatch]:
    path = inp.path
    assert path is not None
    uri = _uri(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise Refused(inp.name, f"not a Parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise Refused(inp.name, f"Parquet has no column '{text_field}' (columns: {', '.join(names[:10])})")
    for rb in pf.iter_batches(batch_size=params.chunk_rows):
        texts = rb.column(text_field).to_pylist()
        rest = rb.drop_columns([text_field]) if hasattr(rb, "drop_columns") else None
        meta: str | list[str] = _meta_from_rows(rest.to_pylist()) if rest is not None and rest.num_columns else "{}"
        yield RawBatch(texts, uri, meta, rb.nbytes)


# -- the built-in corpus ------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
    """Relative paths of the stdlib's own ``.py`` files (no tests, no site-packages), sorted."""
    root = stdlib_root()
    out: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
        rel_folder = os.path.relpath(folder, root)
        for name in files:
            if name.endswith(".py") and not name.startswith("test_"):
                out.append(os.path.normpath(os.path.join(rel_folder, name)))
    return sorted(out)


def _segments(source: str) -> list[tuple[int, int]]:
    """Top-level statement line ranges (decorators and leading comments included), 1-based inclusive."""
    lines = source.count("\n") + 1
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return [(1, lines)]
    starts = []
    for node in tree.body:
        s = node.lineno
        for d in getattr(node, "decorator_list", ()):
            s = min(s, d.lineno)
        starts.append(s)
    if not starts:
        return [(1, lines)]
    starts[0] = 1
    ends = [s - 1 for s in starts[1:]] + [lines]
    return list(zip(starts, ends, strict=True))


def stdlib_records(record_chars: int = 2000, max_records: int = 0) -> Iterator[tuple[str, str, str]]:
    """``(text, uri, meta)`` of the stdlib corpus, deterministic for a Python version."""
    root = stdlib_root()
    version = ".".join(map(str, sys.version_info[:3]))
    files = sorted(stdlib_files(), key=lambda r: hashlib.sha256(r.encode()).hexdigest())
    n = 0
    for rel in files:
        try:
            source = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines = source.splitlines(keepends=True)
        for text, a, b in _group_segments(lines, _segments(source), record_chars):
            yield (text, f"python-stdlib:{rel}#L{a}-{b}",
                   json.dumps({"path": rel, "lines": [a, b], "python": version}))
            n += 1
            if max_records and n >= max_records:
                return


def _group_segments(lines: list[str], segments: list[tuple[int, int]],
                    limit: int) -> Iterator[tuple[str, int, int]]:
    """Merge neighbouring small segments up to ``limit`` chars; split big ones at blank lines."""
    pieces: list[tuple[str, int, int]] = []
    for a, b in segments:
        text = "".join(lines[a - 1:b])
        if len(text) > limit:
            pieces.extend(group_paragraphs(lines[a - 1:b], limit, first_line=a))
        elif text.strip():
            pieces.append((text, a, b))
    cur: list[str] = []
    cur_len, cur_a, cur_b = 0, 0, 0
    for text, a, b in pieces:
        if cur and cur_len + len(text) > limit:
            yield "".join(cur), cur_a, cur_b
            cur, cur_len = [], 0
        if not cur:
            cur_a = a
        cur.append(text)
        cur_len += len(text)
        cur_b = b
    if cur:
        yield "".join(cur), cur_a, cur_b
