"""Text normalisation before validation, so the same text from two places is one record.

The record id is the sha256 of the *cleaned* text: NFC, ``\\r\\n``/``\\r`` -> ``\\n``, trailing
whitespace stripped per line and at the end. Each step is switchable in ``params.yaml``
(``data.normalize_nfc``, ``data.normalize_newlines``, ``data.strip_trailing_whitespace``).
Undecodable input is never repaired silently: connectors decode bytes with ``errors="replace"``
and cleaning turns lone surrogates (e.g. a JSON ``"\\ud800"``) into U+FFFD, so every text is
valid Unicode (storable in Arrow/Parquet) and the UTF-8 expectation quarantines it by that mark.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmcore.config import DataParams

_TRAILING_WS = re.compile(r"[ \t\f\v]+(?=\n)")
_END_WS = " \t\n\r\f\v"  # explicit, so the Python and the Arrow paths strip the very same characters


def make_cleaner(params: DataParams) -> Callable[[str], str]:
    """One function per params, applied to every text (fast paths for ASCII and clean lines)."""
    nfc, newlines, strip = params.normalize_nfc, params.normalize_newlines, params.strip_trailing_whitespace

    def clean(text: str) -> str:
        if not text.isascii():
            text = valid_unicode(text)
        if nfc and not text.isascii():
            text = unicodedata.normalize("NFC", text)
        if newlines and "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if strip:
            text = text.rstrip(_END_WS)
            if " \n" in text or "\t\n" in text or "\f\n" in text or "\v\n" in text:
                text = _TRAILING_WS.sub("", text)
        return text

    return clean


def clean_array(arr: Any, params: DataParams) -> Any:
    """The same cleaning, vectorised on an Arrow string array (C++ kernels; the fast path).

    A step whose trigger bytes (non-ASCII, ``\\r``, whitespace before ``\\n``) occur nowhere in the
    array's data is skipped: one scan of the bytes instead of a kernel pass over every text.
    Returns None when a non-ASCII text needs NFC: Arrow's ``utf8_normalize`` does not compose
    (``e`` + U+0301 stays two code points), so such chunks take the Python path.
    """
    data = string_layout(arr)[1]
    if params.normalize_nfc and data.size and data.max() >= 0x80:
        return None
    if params.normalize_newlines and (data == 0x0D).any():
        arr = pc.replace_substring(pc.replace_substring(arr, "\r\n", "\n"), "\r", "\n")
    if params.strip_trailing_whitespace:
        arr = pc.utf8_rtrim(arr, characters=_END_WS)
        if _space_before_newline(string_layout(arr)[1]):
            arr = pc.replace_substring_regex(arr, "[ \t\f\v]+\n", "\n")
    return arr


def string_layout(arr: Any) -> tuple[Any, Any]:
    """(int64 offsets from 0, UTF-8 bytes) of the texts of an Arrow string array: numpy views, no text copied."""
    n = len(arr)
    if not n:
        return np.zeros(1, np.int64), np.empty(0, np.uint8)
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], width)[arr.offset:arr.offset + n + 1].astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    offsets -= start
    data = np.frombuffer(arr.buffers()[2], np.uint8, end - start, start) if end > start else np.empty(0, np.uint8)
    return offsets, data


def _space_before_newline(data: Any) -> bool:
    """Whether a space, tab, form feed or vertical tab comes right before some ``\\n``."""
    nl = np.flatnonzero(data[1:] == 0x0A)
    return bool(np.isin(data[nl], (0x20, 0x09, 0x0C, 0x0B)).any())


def valid_unicode(text: str) -> str:
    """Lone surrogates -> U+FFFD (they cannot be encoded as UTF-8, hence not stored by Arrow)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def record_id(text: str) -> str:
    """sha256 hex of the cleaned text: the same text is the same record wherever it came from."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
