"""Byte-level BPE (Hugging Face `tokenizers`), saved as one ``tokenizer.json``.

``kind="byte"`` is the same machinery with no merges: 256 byte symbols plus the end-of-text
token, so tiny runs and character-level benchmarks share one file format and one code path.
Either way encode -> decode round-trips any UTF-8 string exactly.

A pretrained base brings its own ``tokenizer.json`` plus a ``tokenizer_config.json`` naming its
end-of-sequence token and chat template (transformers 5 may keep the template in
``chat_template.jinja``): :meth:`Tokenizer.load` reads them, :meth:`Tokenizer.save` writes them back
beside ``tokenizer.json``, so a fine-tuned model stops and formats chats as its base did.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmcore.errors import LmopsError

EOS = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 byte symbols + EOS
TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE = "tokenizer_config.json", "chat_template.jinja"
CHAT_ROLES = ("system", "user", "assistant")
# Without a chat template (lmops' own tokenizer, plain bases) a chat is its text run together, the
# assistant's turn ended by EOS: a single prompt/completion pair reads exactly as served (prompt + completion).
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
                  "{% endif %}{% endfor %}")


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, eos: str = EOS, chat_template: str | None = None,
                 bos: str | None = None):
        self._tok = tok
        tok.encode_special_tokens = True  # user text "<|endoftext|>" stays text, never becomes the EOS id
        eos_id = tok.token_to_id(eos)
        if eos_id is None:
            raise LmopsError(f"tokenizer has no {eos} token")
        self.eos_id: int = eos_id
        self.eos_token, self.bos_token, self.chat_template = eos, bos, chat_template
        self._special: _HFTokenizer | None = None  # a twin that reads special tokens, for rendered chats
        self._turn_end: tuple[tuple, str] | None = None  # (template, eos, bos) -> its turn end, see turn_end

    @classmethod
    def train(cls, texts: Iterable[str], kind: str = "bpe", vocab_size: int = 2048) -> Tokenizer:
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=BYTE_VOCAB if kind == "byte" else vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts if kind != "byte" else iter(()), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise LmopsError(f"tokenizer not found: {path}")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise LmopsError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        return cls(tok, **_read_config(path.parent))

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        return cls(_HFTokenizer.from_str(text))

    def to_str(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | Path) -> Path:
        """``tokenizer.json`` at ``path``, plus ``tokenizer_config.json`` beside it when the eos token,
        a bos token or a chat template differ from lmops' own tokenizer's."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        files = {path: self.to_str()}
        if self.eos_token != EOS or self.bos_token or self.chat_template:
            config = {"eos_token": self.eos_token, "bos_token": self.bos_token, "chat_template": self.chat_template}
            files[path.with_name(TOKENIZER_CONFIG)] = json.dumps(config, indent=2, ensure_ascii=False)
        for target, text in files.items():
            tmp = target.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
        return path

    # ------------------------------------------------------------------------- chats

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Messages as text through the chat template (or :data:`PLAIN_TEMPLATE`), as transformers renders it."""
        try:
            template = _jinja().from_string(self.chat_template or PLAIN_TEMPLATE)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   eos_token=self.eos_token, bos_token=self.bos_token or "")
        except TemplateError as e:
            raise LmopsError(f"chat template failed: {str(e).splitlines()[0]}") from None

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of template output: its special tokens (``<|im_start|>``, eos) become their ids."""
        if self._special is None:
            self._special = _HFTokenizer.from_str(self.to_str())
            self._special.encode_special_tokens = False
        return self._special.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a chat: 1 on the tokens of each assistant turn, 0 on everything else.

        Each turn is tokenized on its own (the text the template adds for it, after the prompt the
        template renders with ``add_generation_prompt``), exactly as the server tokenizes a prompt and
        then generates: what is trained is what is served.
        """
        ids: list[int] = []
        mask: list[int] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render_chat(messages[:i], add_generation_prompt=True)
            full = self.render_chat(messages[: i + 1])
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise LmopsError("chat template does not render a chat as a prefix of its continuation")
            for text, bit in ((prompt[len(done):], 0), (full[len(prompt):], 1)):
                part = self.encode_rendered(text)
                ids += part
                mask += [bit] * len(part)
            done = full
        rest = self.render_chat(messages)[len(done):]
        if rest:
            part = self.encode_rendered(rest)
            ids, mask = ids + part, mask + [0] * len(part)
        return ids, mask

    def turn_end(self) -> str:
        """What the chat template writes after an assistant turn's content (:data:`PLAIN_TEMPLATE`: EOS).

        Rendered once per template (prepare asks for every served document), not once per call."""
        key = (self.chat_template, self.eos_token, self.bos_token)
        if self._turn_end is None or self._turn_end[0] != key:
            mark, msgs = "\ue000", [{"role": "user", "content": "u"}]
            prompt = self.render_chat(msgs, add_generation_prompt=True)
            full = self.render_chat([*msgs, {"role": "assistant", "content": mark}])
            if not full.startswith(prompt) or mark not in full[len(prompt):]:
                raise LmopsError("chat template does not render a chat as a prefix of its continuation")
            self._turn_end = (key, full[len(prompt):].split(mark, 1)[1])
        return self._turn_end[1]

    def encode_served(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of ``completion`` after ``prompt`` exactly as it was served (already rendered
        by the template when the model chats): the prompt masked, the completion and the turn's end counted."""
        head, reply = self.encode_rendered(prompt), self.encode_rendered(completion + self.turn_end())
        return head + reply, [0] * len(head) + [1] * len(reply)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder over this tokenizer (one per generated sequence)."""
        return StreamDecoder(self)

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text pieces as ids arrive, holding back bytes of an unfinished UTF-8 char."""
        dec = self.stream_decoder()
        for i in ids:
            if piece := dec.push(i):
                yield piece
        if tail := dec.flush():
            yield tail


def _jinja() -> ImmutableSandboxedEnvironment:
    """The sandbox transformers renders chat templates in (with its ``raise_exception`` helper)."""

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env


def _read_config(folder: Path) -> dict[str, Any]:
    """eos/bos token and chat template from a folder's tokenizer_config.json (and chat_template.jinja)."""
    out: dict[str, Any] = {}
    cfg_path = folder / TOKENIZER_CONFIG
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise LmopsError(f"cannot read {cfg_path}: {str(e).splitlines()[0]}") from None
        if _token_text(cfg.get("eos_token")):
            out["eos"] = _token_text(cfg["eos_token"])
        out["bos"] = _token_text(cfg.get("bos_token"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        out["chat_template"] = template
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        out["chat_template"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return out


class StreamDecoder:
    """Streaming detokenisation, one id at a time: the only implementation (generate and the server use it).

    ``push`` returns the text an id adds: ``""`` while the bytes so far end inside a multi-byte
    UTF-8 character (they are held back until it completes). ``flush`` returns what is still
    held back at the end (the bytes of a character never finished), after which ``text`` is
    exactly ``tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # the text handed out so far

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self._tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):  # incomplete multi-byte character: wait for more
            return ""
        piece = full[len(self.text):]
        if piece:
            self.text = full
        return piece

    def flush(self) -> str:
        full = self._tokenizer.decode(self.ids)
        tail = full[len(self.text):]
        self.text = full
        return tail
