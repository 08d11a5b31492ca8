"""Preparation: text sources -> tokenizer + token memmaps + meta, deterministic and atomic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _lm_helpers import tiny_params, write_corpus

from lmcore.data.prepare import (
    load_prepared,
    prepare_dataset,
    prepare_split_texts,
    read_text_source,
    record_id,
    token_byte_lengths,
)
from lmcore.data.tokenizer import Tokenizer
from lmcore.errors import LmopsError

pytestmark = pytest.mark.data


def test_read_text_source_file_and_folder(tmp_path):
    corpus = write_corpus(tmp_path / "c", n_files=3)
    (corpus / "sub").mkdir()
    (corpus / "sub" / "code.py").write_text("def f():\n    return 1\n")
    (corpus / "image.png").write_bytes(b"\x89PNG")
    (corpus / ".hidden.txt").write_text("secret")
    recs = list(read_text_source(corpus))
    texts = "".join(t for _, t in recs)
    assert "def f():" in texts and "PNG" not in texts and "secret" not in texts
    assert all(rid == record_id(t) for rid, t in recs)
    one = list(read_text_source(corpus / "doc0.txt"))
    assert "".join(t for _, t in one) == (corpus / "doc0.txt").read_text()  # chunks concatenate back


def test_read_text_source_chunks_a_big_file(tmp_path):
    f = tmp_path / "big.txt"
    f.write_text("\n\n".join(f"paragraph {i} " * 20 for i in range(200)))
    recs = list(read_text_source(f))
    assert len(recs) > 5 and "".join(t for _, t in recs) == f.read_text()


@pytest.mark.parametrize("kind", ["missing", "empty_file", "blank_file", "empty_folder"])
def test_read_text_source_refuses_nothing(tmp_path, kind):
    path = tmp_path / "x.txt"
    if kind == "empty_file":
        path.write_text("")
    elif kind == "blank_file":
        path.write_text("  \n\n \n")
    elif kind == "empty_folder":
        path = tmp_path / "folder"
        path.mkdir()
    with pytest.raises(LmopsError, match="corpus|no text files"):
        list(read_text_source(path))


def test_prepare_writes_consistent_files(tmp_path):
    p = tiny_params(tokenizer__kind="bpe", tokenizer__vocab_size=300, prepare__val_fraction=0.3)
    recs = list(read_text_source(write_corpus(tmp_path / "c", n_files=8)))
    data = prepare_dataset(recs, tmp_path / "prep", p.tokenizer, p.prepare, dataset_version="v7")
    meta = json.loads((data.dir / "meta.json").read_text())
    assert data.dtype == "uint16" == meta["dtype"] and data.dataset_version == "v7"
    assert data.train_tokens > 0 and data.val_tokens > 0
    assert (data.dir / "train.bin").stat().st_size == 2 * data.train_tokens
    tok = Tokenizer.load(data.dir / "tokenizer.json")
    assert tok.vocab_size == data.vocab_size == meta["vocab_size"]
    # documents are joined by EOS and decode back to exactly the input text
    train_ids = np.asarray(data.tokens("train"))
    assert train_ids[-1] == tok.eos_id and (train_ids == tok.eos_id).sum() == meta["train_docs"]
    val_ids = np.asarray(data.tokens("val"))
    all_text = {t for _, t in recs}
    val_docs = [tok.decode(d) for d in np.split(val_ids, np.where(val_ids == tok.eos_id)[0] + 1) if len(d)]
    assert set(val_docs) <= all_text
    assert sum(len(d.encode()) for d in val_docs) == meta["val_bytes"]
    # byte lengths per token add up to the bytes of the text
    assert int(token_byte_lengths(tok)[val_ids].sum()) == meta["val_bytes"]
    assert not list(tmp_path.glob(".prep*")), "temporary folders must be gone"


def test_split_is_deterministic_and_order_free(tmp_path):
    p = tiny_params(prepare__val_fraction=0.3)
    recs = list(read_text_source(write_corpus(tmp_path / "c", n_files=10)))
    a = prepare_dataset(recs, tmp_path / "a", p.tokenizer, p.prepare)
    b = prepare_dataset(list(reversed(recs)), tmp_path / "b", p.tokenizer, p.prepare)
    assert a.meta["val_bytes"] == b.meta["val_bytes"] and a.meta["val_docs"] == b.meta["val_docs"]
    lines = [sorted((x.dir / "val_docs.jsonl").read_text().splitlines()) for x in (a, b)]
    assert lines[0] == lines[1]
    c = prepare_dataset(recs, tmp_path / "c2", p.tokenizer, tiny_params(prepare__seed=99).prepare)
    assert c.train_tokens + c.val_tokens == a.train_tokens + a.val_tokens


def test_single_record_still_gets_both_splits(tmp_path):
    p = tiny_params()
    data = prepare_dataset([("x", "line one\nline two\nline three\nline four\n")], tmp_path / "p",
                           p.tokenizer, p.prepare)
    assert data.train_tokens > 0 and data.val_tokens > 0


def test_prepare_refuses_empty_records(tmp_path):
    p = tiny_params()
    with pytest.raises(LmopsError, match="empty"):
        prepare_dataset([("a", "   "), ("b", "")], tmp_path / "p", p.tokenizer, p.prepare)
    assert not (tmp_path / "p").exists()


def test_load_prepared_detects_incomplete(tmp_path):
    p = tiny_params()
    data = prepare_split_texts(["hello world " * 20], ["bye " * 10], tmp_path / "p", p.tokenizer)
    assert data.val_tokens == 41 and data.meta["val_bytes"] == 40  # byte-level: one token per byte + EOS
    with open(data.dir / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(LmopsError, match="incomplete"):
        load_prepared(data.dir)
    with pytest.raises(LmopsError, match="no prepared data"):
        load_prepared(tmp_path / "nothing")


def test_feedback_split_hints_route_records(tmp_path):
    """Held-out feedback is validated on, negatives are never trained on, thumbs-up always trains."""
    from lmcore.config import PrepareParams, TokenizerParams

    recs = [(f"r{i}", f"plain record number {i}\n" * 5) for i in range(30)]
    recs += [("h1", "HELD OUT CORRECTION", "holdout"), ("n1", "NEGATIVE EXAMPLE", "negative"),
             ("t1", "THUMBS UP TEXT", "train")]
    out = tmp_path / "prepared"
    data = prepare_dataset(recs, out, TokenizerParams(kind="byte", vocab_size=257), PrepareParams(val_fraction=0.2))
    val_docs = [json.loads(line) for line in (out / "val_docs.jsonl").read_text().splitlines()]
    train_ids = np.fromfile(out / "train.bin", dtype=data.dtype).tolist()
    train_text = Tokenizer.load(out / "tokenizer.json").decode(train_ids)
    assert "HELD OUT CORRECTION" in val_docs and "HELD OUT CORRECTION" not in train_text
    assert "THUMBS UP TEXT" in train_text and "THUMBS UP TEXT" not in val_docs
    assert "NEGATIVE EXAMPLE" not in train_text and "NEGATIVE EXAMPLE" not in val_docs
    assert data.meta["train_docs"] + data.meta["val_docs"] == 32
