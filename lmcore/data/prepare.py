"""Text records -> a tokenizer plus train/val token files the training loop can memory-map.

A prepared folder holds ``tokenizer.json``, ``train.bin`` and ``val.bin`` (token ids as
uint16 when the vocabulary fits, else uint32; documents joined by EOS), ``val_docs.jsonl``
(the validation text, so a model with a *different* tokenizer can be scored on exactly the
same bytes) and ``meta.json`` (vocab size, dtype, token and UTF-8 byte counts per split,
dataset version, tokenizer hash). Records are split by a seeded hash of their id, so the
same record always lands in the same split whatever order or batch it arrives in.

Chat records (:mod:`lmcore.data.chat`) are rendered by the tokenizer's chat template; when any
is present, ``train_mask.bin``/``val_mask.bin`` (uint8, one per token) mark the tokens the loss
counts: 1 on assistant turns and plain text, 0 on prompts and template scaffolding. With a
pretrained base (``model.base``) its own tokenizer is used instead of training one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmcore.data.chat import parse_chat
from lmcore.data.clean import record_id
from lmcore.data.served import parse_served
from lmcore.data.tokenizer import Tokenizer
from lmcore.data.versions import TEXT_KINDS
from lmcore.errors import LmopsError
from lmcore.model.base import base_tokenizer
from lmcore.model.checkpoint import atomic_dir, commit_dir
from lmcore.settings import get_settings

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".json", ".jsonl", ".csv", ".tsv", ".yaml", ".yml",
                 ".toml", ".cfg", ".ini", ".html", ".xml", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs",
                 ".sh", ".sql", ".tex")
CHUNK_CHARS = 4096  # files are cut at blank lines into records of about this size
META = "meta.json"


@dataclass(frozen=True)
class PreparedData:
    dir: Path
    train_tokens: int
    val_tokens: int
    vocab_size: int
    dtype: str
    dataset_version: str | None

    @property
    def meta(self) -> dict:
        return json.loads((self.dir / META).read_text())

    def tokens(self, split: str) -> np.memmap:
        """Read-only memmap of one split's token ids."""
        n = self.train_tokens if split == "train" else self.val_tokens
        if n == 0:
            return np.zeros(0, dtype=self.dtype)  # type: ignore[return-value]
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r", shape=(n,))

    def loss_mask(self, split: str) -> np.memmap | None:
        """Read-only memmap of one split's loss mask (1 = a target the loss counts); None: every token counts."""
        n = self.train_tokens if split == "train" else self.val_tokens
        path = self.dir / f"{split}_mask.bin"
        if n == 0 or not path.is_file():
            return None
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(n,))


def _chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut at blank lines into pieces of at least ``size`` chars; their concatenation is ``text``."""
    buf: list[str] = []
    n = 0
    for para in text.split("\n\n"):
        buf.append(para)
        n += len(para) + 2
        if n >= size:
            yield "\n\n".join(buf) + "\n\n"
            buf, n = [], 0
    if buf:
        tail = "\n\n".join(buf)
        if tail.strip():
            yield tail


def read_text_source(path: Path) -> Iterator[tuple[str, str]]:
    """(id, text) records from a text file or a folder of text files (recursive, sorted, hidden skipped).

    Files are cut at blank lines into records of about ``CHUNK_CHARS`` characters so a single
    file still yields a train and a validation split.
    """
    path = Path(path)
    if not path.exists():
        raise LmopsError(f"corpus not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise LmopsError(f"corpus folder {path} holds no text files ({', '.join(TEXT_SUFFIXES[:5])}, ...)")
    else:
        files = [path]
    found = False
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise LmopsError(f"cannot read {f}: {e.strerror}") from None
        for chunk in _chunks(text):
            if chunk.strip():
                found = True
                yield record_id(chunk), chunk
    if not found:
        raise LmopsError(f"corpus is empty: {path}")


def _split_score(seed: int, rid: str) -> float:
    h = hashlib.sha256(f"{seed}:{rid}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _split(records: list[tuple], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/val split by hash; both splits non-empty whenever the text allows.

    A record may carry a third field, a split hint from the data registry: feedback marked
    ``holdout`` always goes to validation (so the gate sees whether users' corrections were
    learnt), ``negative`` is kept out of both (evaluation material, never trained on), and
    ``train`` always trains.
    """
    if not records:
        raise LmopsError("corpus is empty: no records to prepare")
    hinted = {"train": [], "holdout": []}
    plain = []
    for rid, text, *hint in records:
        split = hint[0] if hint else None
        if split in hinted:
            hinted[split].append(text)
        elif split != "negative":
            plain.append((rid, text))
    if not plain:
        raise LmopsError("corpus is empty: no records to prepare")
    scored = sorted(((_split_score(seed, rid), text) for rid, text in plain), key=lambda st: st[0])
    train = [t for s, t in scored if s >= val_fraction]
    val = [t for s, t in scored if s < val_fraction]
    if len(scored) >= 2:
        if not val:
            val = [train.pop(0)]  # smallest score: the record closest to the val side
        if not train:
            train = [val.pop()]
        return train + hinted["train"], val + hinted["holdout"]
    # one record: cut it at the line boundary nearest (1 - val_fraction) of its length
    text = scored[0][1]
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
    if cut <= 0:
        cut = int(len(text) * (1 - val_fraction))
    train, val = [text[:cut]], [text[cut:]]
    if not train[0] or not val[0]:
        raise LmopsError("corpus is too small to split into train and validation text")
    return train, val


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (byte-level BPE: one symbol = one byte; specials 0)."""
    spec = json.loads(tokenizer.to_str())
    out = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for tok, i in spec["model"]["vocab"].items():
        if i < len(out):
            out[i] = len(tok)
    for added in spec.get("added_tokens", []):
        if added["id"] < len(out):
            out[added["id"]] = 0
    return out


def is_plain(doc: str) -> bool:
    """Whether a document is plain text (all of it trained on), not a chat or a served completion."""
    return parse_chat(doc) is None and parse_served(doc) is None


def doc_text(doc: str, tokenizer: Tokenizer | None = None) -> str:
    """What a document reads as: plain text itself, a chat rendered (by ``tokenizer``'s template, else plainly),
    a served completion as its prompt and completion (and the turn's end)."""
    if (served := parse_served(doc)) is not None:
        return served[0] + served[1] + (tokenizer.turn_end() if tokenizer is not None else "")
    msgs = parse_chat(doc)
    if msgs is None:
        return doc
    return tokenizer.render_chat(msgs) if tokenizer is not None else "".join(m["content"] for m in msgs)


def encode_doc(tokenizer: Tokenizer, doc: str) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one document: a chat by its template and a served completion after its prompt
    (prompts masked); plain text + EOS all counted."""
    if (served := parse_served(doc)) is not None:
        return tokenizer.encode_served(*served)
    msgs = parse_chat(doc)
    if msgs is not None:
        return tokenizer.encode_chat(msgs)
    ids = [*tokenizer.encode(doc), tokenizer.eos_id]
    return ids, [1] * len(ids)


def _encode_docs(tokenizer, docs: list[str], path: Path, dtype: str, masked: bool) -> tuple[int, int]:
    """Write documents as token ids (plain text ended by EOS), and their loss mask when ``masked``.

    Returns (tokens, target tokens)."""
    n = targets = 0
    mask_path = path.with_name(path.stem + "_mask.bin")
    with open(path, "wb") as f, (open(mask_path, "wb") if masked else open(os.devnull, "wb")) as fm:
        for start in range(0, len(docs), 256):
            batch = docs[start : start + 256]
            plain = [d for d in batch if is_plain(d)]
            encoded = dict(zip(plain, tokenizer.encode_batch(plain), strict=True))
            for doc in batch:
                ids, mask = (([*encoded[doc], tokenizer.eos_id], None) if doc in encoded
                             else encode_doc(tokenizer, doc))
                arr = np.asarray(ids, dtype=dtype)
                arr.tofile(f)
                m = np.ones(arr.size, dtype=np.uint8) if mask is None else np.asarray(mask, dtype=np.uint8)
                m.tofile(fm)
                n += arr.size
                targets += int(m.sum())
    return n, targets


def prepare_dataset(records: Iterable[tuple], out_dir: Path, tok, prep,
                    dataset_version: str | None = None, tokenizer: Tokenizer | None = None,
                    extra: dict | None = None) -> PreparedData:
    """Split records by seeded id hash, train the tokenizer on the train split, write it all atomically.

    ``records`` are ``(id, text)`` or ``(id, text, split_hint)`` (see ``_split``).

    ``tok`` is a ``TokenizerParams`` and ``prep`` a ``PrepareParams``; ``tokenizer`` (a base's) is used
    instead of training one. The output folder only appears once complete.
    """
    recs = [r for r in records if r[1] and r[1].strip()]
    if not recs:
        raise LmopsError("corpus is empty: no non-blank text to prepare")
    train_docs, val_docs = _split(recs, prep.val_fraction, prep.seed)
    extra = {"val_fraction": prep.val_fraction, "seed": prep.seed, **(extra or {})}
    return prepare_split_texts(train_docs, val_docs, out_dir, tok, dataset_version, extra, tokenizer)


def prepare_split_texts(train_docs: list[str], val_docs: list[str], out_dir: Path, tok,
                        dataset_version: str | None = None, extra: dict | None = None,
                        tokenizer: Tokenizer | None = None) -> PreparedData:
    """Write a prepared folder from an explicit split (benchmarks use first 90% / last 10%)."""
    if not train_docs or not val_docs:
        raise LmopsError("corpus is too small to split into train and validation text")
    if tokenizer is None:
        tokenizer = Tokenizer.train((doc_text(d) for d in train_docs), tok.kind, tok.vocab_size)
    masked = not all(is_plain(d) for d in (*train_docs, *val_docs))
    dtype = "uint16" if tokenizer.vocab_size <= 65536 else "uint32"
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_dir(out_dir)
    try:
        tokenizer.save(tmp / "tokenizer.json")
        n_train, t_train = _encode_docs(tokenizer, train_docs, tmp / "train.bin", dtype, masked)
        if masked and t_train == 0:
            raise LmopsError("the chat data has no assistant turns in its training split: nothing to learn from "
                             "(each chat needs a completion or an assistant message)")
        n_val, t_val = _encode_docs(tokenizer, val_docs, tmp / "val.bin", dtype, masked)
        val_texts = [doc_text(d, tokenizer) for d in val_docs]
        with open(tmp / "val_docs.jsonl", "w", encoding="utf-8") as f:
            for d in val_texts:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        meta = {
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "train_bytes": sum(len(doc_text(d, tokenizer).encode("utf-8")) for d in train_docs),
            "val_bytes": sum(len(d.encode("utf-8")) for d in val_texts),
            "train_docs": len(train_docs),
            "val_docs": len(val_docs),
            "dataset_version": dataset_version,
            "tokenizer_kind": tok.kind,
            "tokenizer_hash": tokenizer_hash(tokenizer),
            "eos_id": tokenizer.eos_id,
            "loss_mask": masked,
            "train_target_tokens": t_train,
            "val_target_tokens": t_val,
            **(extra or {}),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, out_dir)
    return load_prepared(out_dir)


def params_tokenizer(params) -> Tokenizer | None:
    """The base's own tokenizer when the params name one (``model.base``); None: prepare trains one."""
    return base_tokenizer(params.model.base) if params.model.base else None


FINETUNE_KINDS = ("chat", "feedback")  # what a base with chat data fine-tunes on (see training_kinds)


def training_kinds(version, params, sources_named: bool = False) -> tuple[str, ...]:
    """The record kinds of dataset ``version`` (a ``DatasetVersion``) that SFT trains on.

    A pretrained base with chat data in the registry learns from the chats (and harvested feedback),
    not from whatever raw text the registry also holds: a chat model fine-tuned on the default corpus
    (the standard library's source) learns to write Python, not to answer. ``sources_named``: the
    user named the sources of this run (``--source``), so every text kind counts.
    """
    if params.model.base and not sources_named and version.rows_by_kind.get("chat"):
        return FINETUNE_KINDS
    return TEXT_KINDS


def prepare_key(dataset_version: str, params, kinds: tuple[str, ...] = TEXT_KINDS) -> str:
    """Names the prepared data of a dataset version under the prepare + tokenizer params (and a base's
    tokenizer, and the record kinds when not all): the one content key the training flow's cache, the
    optimizer sweep and the output folders share."""
    payload = f"prepare|{dataset_version}|{params.slice_hash('prepare', 'tokenizer')}"
    if params.model.base:
        payload += f"|base-tokenizer={tokenizer_hash(base_tokenizer(params.model.base))}"
    if tuple(kinds) != TEXT_KINDS:
        payload += f"|kinds={','.join(kinds)}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def training_data_line(folder: Path) -> str:
    """What a run trains on, in one line: record kinds, documents and tokens (and those the loss counts)."""
    meta = load_prepared(folder).meta
    kinds = " + ".join(meta.get("kinds") or TEXT_KINDS)
    counted = f" ({meta['train_target_tokens']:,} in the loss)" if meta.get("loss_mask") else ""
    return (f"training on {kinds}: {meta['train_docs']:,} documents, {meta['train_tokens']:,} tokens{counted}; "
            f"validation {meta['val_docs']:,} documents, {meta['val_tokens']:,} tokens")


def prepared_dir(dataset_version: str, params, kinds: tuple[str, ...] = TEXT_KINDS) -> Path:
    """Where the prepared data of a dataset version (of those record kinds) lives under the lmops home."""
    return get_settings().runs_dir / "prepared" / prepare_key(dataset_version, params, kinds)


def load_prepared(dir: Path) -> PreparedData:
    """Open a prepared folder; one-line error when it is missing or incomplete."""
    dir = Path(dir)
    meta_path = dir / META
    if not meta_path.is_file():
        raise LmopsError(f"no prepared data in {dir} (missing {META}; run `lmops train --data PATH`)")
    try:
        meta = json.loads(meta_path.read_text())
        data = PreparedData(dir=dir, train_tokens=int(meta["train_tokens"]), val_tokens=int(meta["val_tokens"]),
                            vocab_size=int(meta["vocab_size"]), dtype=str(meta["dtype"]),
                            dataset_version=meta.get("dataset_version"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise LmopsError(f"corrupt prepared-data meta {meta_path}: {e}") from None
    itemsize = np.dtype(data.dtype).itemsize
    for split, n in (("train", data.train_tokens), ("val", data.val_tokens)):
        f = dir / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != n * itemsize:
            raise LmopsError(f"prepared data in {dir} is incomplete: {f.name} does not hold {n} tokens")
    if not (dir / "tokenizer.json").is_file():
        raise LmopsError(f"prepared data in {dir} has no tokenizer.json")
    return data
