"""Served records: a completion after the exact prompt text a model was given (harvested feedback).

Why its own document form: a feedback record's text is the served prompt followed by the
correction (or the liked completion). Trained as plain text, the prompt's tokens would count in
the loss; templated as a chat, a chat model's prompt (already rendered by its template when it was
served) would be templated twice. A served document keeps the boundary instead: the prompt is
tokenized as it was served and masked, the completion and the template's end of turn count
(:meth:`lmcore.data.tokenizer.Tokenizer.encode_served`). The registry keeps the record's text
unchanged and the boundary in its meta (``prompt_chars``); :func:`served_text` is the in-memory
form ``prepare`` reads, never a stored one.
"""

from __future__ import annotations

import json

SERVED_PREFIX = '{"served_prompt": '


def served_text(prompt: str, completion: str) -> str:
    """The document form of a prompt (as served) and its completion."""
    return json.dumps({"served_prompt": prompt, "completion": completion}, ensure_ascii=False)


def parse_served(text: str) -> tuple[str, str] | None:
    """(prompt, completion) of a :func:`served_text` document; None for any other text."""
    if not text.startswith(SERVED_PREFIX):
        return None
    try:
        obj = json.loads(text)
        pair = obj["served_prompt"], obj["completion"]
    except (ValueError, KeyError, TypeError):
        return None
    return pair if served_text(*pair) == text else None


def split_served(text: str, meta: dict) -> str:
    """A feedback record as a served document when its meta holds a valid prompt boundary, else as is."""
    cut = meta.get("prompt_chars")
    if isinstance(cut, int) and 0 < cut < len(text):
        return served_text(text[:cut], text[cut:])
    return text
