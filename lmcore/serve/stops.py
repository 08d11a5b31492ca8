"""Stop sequences over a stream of token records: the one implementation, for every API and for streaming.

Generation ends at the first occurrence of any stop string, which is not part of the output
(OpenAI's convention). A stop string may straddle tokens, so while the text so far ends with
the start of a stop string the tokens that carry it are held back: streamed clients never see
text that a later token turns into a stop. Released text is never revisited: a stop cannot
start inside it, because any text that could still begin one is held.

Records are the server's per-token dicts (``{"id", "text", ...}``); the token in which a stop
begins is released with its text cut there, the tokens after it are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopFilter:
    """Hold back token records that may begin a stop string; cut the output at the first one found."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.pending: list[dict] = []  # records held back, in order
        self.stopped = False

    def push(self, rec: dict) -> list[dict]:
        """Take one token record; return the records that are now safe to hand out (maybe none)."""
        if not self.stops:
            return [rec]
        if self.stopped:
            return []
        self.pending.append(rec)
        return self._release(final=False)

    def finish(self, tail: str) -> tuple[list[dict], str]:
        """At the end of generation: ``tail`` (bytes of a character the last token left unfinished) joins
        the held records. Returns every record still to hand out, and the part of ``tail`` not attached
        to one of them."""
        if self.stopped:
            return [], ""
        if self.pending:
            self.pending[-1] = {**self.pending[-1], "text": self.pending[-1]["text"] + tail}
            return self._release(final=True), ""
        cut = self._first_stop(tail)
        return [], tail if cut is None else tail[:cut]

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return min(hits)
        return None

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the start (not the whole) of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, final: bool) -> list[dict]:
        text = "".join(r["text"] for r in self.pending)
        cut = self._first_stop(text)
        keep = cut if cut is not None else len(text) if final else len(text) - self._held(text)
        out: list[dict] = []
        used = 0
        while self.pending:
            rec = self.pending[0]
            end = used + len(rec["text"])
            if end <= keep:
                out.append(self.pending.pop(0))
                used = end
                continue
            if self.stopped:  # the token the stop begins in keeps the text before it; the rest is dropped
                if keep > used:
                    out.append({**rec, "text": rec["text"][: keep - used]})
                self.pending.clear()
            break
        return out
