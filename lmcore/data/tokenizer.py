"""Byte-level BPE (Hugging Face `tokenizers`), saved as one ``tokenizer.json``.

``kind="byte"`` is the same machinery with no merges: 256 byte symbols plus the end-of-text
token, so tiny runs and character-level benchmarks share one file format and one code path.
Either way encode -> decode round-trips any UTF-8 string exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmcore.errors import LmopsError

EOS = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 byte symbols + EOS


class Tokenizer:
    def __init__(self, tok: _HFTokenizer):
        self._tok = tok
        tok.encode_special_tokens = True  # user text "<|endoftext|>" stays text, never becomes the EOS id
        eos = tok.token_to_id(EOS)
        if eos is None:
            raise LmopsError(f"tokenizer has no {EOS} token")
        self.eos_id: int = eos

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
            return cls(_HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise LmopsError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        return cls(_HFTokenizer.from_str(text))

    def to_str(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_str(), encoding="utf-8")
        tmp.replace(path)
        return path

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
