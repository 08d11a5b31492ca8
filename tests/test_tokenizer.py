"""Tokenizer properties: any UTF-8 text survives encode -> decode, streaming never splits a character."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcore.data.tokenizer import BYTE_VOCAB, EOS, Tokenizer
from lmcore.errors import LmopsError

pytestmark = pytest.mark.code

CORPUS = [
    "def main():\n    return 42\n",
    "The quick brown fox jumps over the lazy dog. 日本語のテキスト。",
    "emoji 🙂🚀 and accents: café, naïve, Ünïcödé\t\r\n",
] * 30

# Any Unicode scalar value except NUL and surrogates (which are not valid UTF-8): letters, CJK,
# emoji, combining marks, control characters, private use.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60)
TRICKY = ["", " ", "\n\n", "🙂", "👩‍👩‍👧", "日本語", "a\u0301", "\x01\x7f\x1b[0m", "\ufeffBOM", "  leading", "e\u200dz",
          "\U0010fffd", "<|endoftext|", "a<|endoftext|>b", "tab\tend\r\n"]

_TOKENIZERS: dict[str, Tokenizer] = {}


def tokenizer(kind: str) -> Tokenizer:
    if kind not in _TOKENIZERS:
        _TOKENIZERS[kind] = Tokenizer.train(CORPUS, kind=kind, vocab_size=400)
    return _TOKENIZERS[kind]


def test_vocab_sizes_and_eos():
    byte, bpe = tokenizer("byte"), tokenizer("bpe")
    assert byte.vocab_size == BYTE_VOCAB
    assert 300 < bpe.vocab_size <= 400
    for tok in (byte, bpe):
        assert tok.eos_id == tok._tok.token_to_id(EOS)
        assert tok.decode([tok.eos_id]) == ""  # special token is skipped in text
    assert len(bpe.encode(CORPUS[0])) < len(byte.encode(CORPUS[0]))  # merges really compress


@pytest.mark.parametrize("kind", ["bpe", "byte"])
@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(kind, text):
    tok = tokenizer(kind)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert "".join(tok.decode_stream(ids)) == text


@pytest.mark.parametrize("kind", ["bpe", "byte"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_round_trip_any_text(kind, text):
    tok = tokenizer(kind)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if kind == "byte":  # one token per UTF-8 byte
        assert len(ids) == len(text.encode("utf-8"))
    pieces = list(tok.decode_stream(ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text
    assert all(p for p in pieces)  # never an empty piece



@pytest.mark.parametrize("kind", ["bpe", "byte"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT, cut=st.integers(min_value=0, max_value=3))
def test_stream_decoder_gives_one_piece_per_id_and_flushes_the_rest(kind, text, cut):
    """The server's per-token texts and decode_stream's pieces come from the same StreamDecoder."""
    tok = tokenizer(kind)
    ids = tok.encode(text)
    ids = ids[: max(len(ids) - cut, 0)] if kind == "byte" else ids  # byte: may end inside a character
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    tail = dec.flush()
    assert "".join(pieces) + tail == dec.text == tok.decode(ids) and dec.ids == ids
    assert [p for p in pieces if p] + ([tail] if tail else []) == list(tok.decode_stream(ids))


def test_stream_decoder_holds_back_an_unfinished_character():
    tok = tokenizer("byte")
    a, e1, e2 = tok.encode("aé")  # "é" is two UTF-8 bytes, one byte token each
    dec = tok.stream_decoder()
    assert [dec.push(a), dec.push(e1), dec.push(e2)] == ["a", "", "é"] and dec.flush() == ""
    dec = tok.stream_decoder()
    assert [dec.push(a), dec.push(e1)] == ["a", ""]
    assert dec.flush() == "\ufffd" and dec.text == "a\ufffd"  # a character never finished is flushed at the end


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=4))
def test_encode_batch_equals_encode(texts):
    tok = tokenizer("bpe")
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_literal_eos_in_text_is_not_the_eos_token(kind):
    tok = tokenizer(kind)
    ids = tok.encode(f"x{EOS}y")
    assert tok.eos_id not in ids  # a prompt cannot inject end-of-text
    assert tok.decode(ids) == f"x{EOS}y"
    assert tok.decode([*tok.encode("x"), tok.eos_id, *tok.encode("y")]) == "xy"  # the real EOS id is skipped


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_save_load_round_trip(tmp_path, kind):
    tok = tokenizer(kind)
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    assert not list(path.parent.glob("*.tmp"))
    for again in (Tokenizer.load(path), Tokenizer.load(path.parent), Tokenizer.from_str(tok.to_str())):
        assert again.vocab_size == tok.vocab_size and again.eos_id == tok.eos_id
        for text in TRICKY + CORPUS[:3]:
            assert again.encode(text) == tok.encode(text)


def test_corrupt_or_missing_tokenizer_is_a_one_line_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    for content in ("{not json", '{"model": {"type": "BPE"}}', ""):
        bad.write_text(content)
        with pytest.raises(LmopsError, match="cannot read tokenizer") as info:
            Tokenizer.load(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(LmopsError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    no_eos = tokenizer("byte").to_str().replace(EOS, "<|other|>")
    bad.write_text(no_eos)
    with pytest.raises(LmopsError, match=re.escape(f"no {EOS} token")):
        Tokenizer.load(bad)
