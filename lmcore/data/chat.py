"""Instruction and chat records: JSONL lines of ``prompt``/``completion`` or ``messages``, one record each.

Why one canonical text: the data registry holds one ``text`` per record (hashed into its id,
validated, versioned), and a chat must stay a chat until a tokenizer's own chat template renders
it at prepare time (the same data fine-tunes bases with different templates). So a chat record's
text is the JSON ``{"messages": [{"role": ..., "content": ...}, ...]}`` written by
:func:`chat_text`, and :func:`parse_chat` recognises exactly that form. ``expectations/chat.json``
checks the shapes (roles, a non-empty final assistant turn, length), and a line that is not a chat
at all is kept as its raw text, so that suite quarantines it with a reason instead of losing it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmcore.data.ingest import ingest_records
from lmcore.errors import LmopsError

CHAT_PREFIX = '{"messages": ['
KIND = "chat"  # the data registry's shard kind of chat records


def chat_text(messages: list[dict[str, str]]) -> str:
    """The canonical record text of a chat (role before content, one line, UTF-8 kept)."""
    return json.dumps({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]},
                      ensure_ascii=False)


def parse_chat(text: str) -> list[dict[str, str]] | None:
    """The messages of a canonical chat record; None for any other text (plain text stays plain)."""
    if not text.startswith(CHAT_PREFIX):
        return None
    try:
        obj = json.loads(text)
        messages = obj["messages"]
        if chat_text(messages) != text:
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return messages


def to_messages(obj: Any) -> list[dict[str, str]] | None:
    """``{"prompt", "completion"[, "system"]}`` or ``{"messages": [...]}`` as messages; None if neither shape.

    Roles and emptiness are not judged here but by the GX suite, so its reasons name them.
    """
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("messages"), list):
        msgs = obj["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in msgs):
            return None
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(obj.get("prompt"), str):
        msgs = [{"role": "system", "content": obj["system"]}] if isinstance(obj.get("system"), str) else []
        msgs.append({"role": "user", "content": obj["prompt"]})
        if isinstance(obj.get("completion"), str):
            msgs.append({"role": "assistant", "content": obj["completion"]})
        return msgs
    return None


def chat_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records for ``ingest_records`` from a JSONL file: a chat's canonical text, or the raw line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise LmopsError(f"cannot read {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            msgs = to_messages(json.loads(line))
        except ValueError:
            msgs = None
        yield {"text": chat_text(msgs) if msgs is not None else line, "source": "jsonl",
               "uri": f"{path.resolve().as_uri()}#L{n}", "meta": {"format": KIND}}


def ingest_chat(paths: list[str], params: Any, registry: Any = None) -> Any:
    """Validate (``expectations/chat.json``) and version chat JSONL files as the registry's ``chat`` kind."""
    if not paths:
        raise LmopsError("give the chat JSONL files to ingest")
    records = (r for p in paths for r in chat_records(p))
    return ingest_records(records, kind=KIND, suite=KIND, params=params, registry=registry, source="jsonl")
