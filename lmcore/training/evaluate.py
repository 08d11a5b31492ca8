"""Score a model on a prepared validation split: loss, perplexity, bits per byte, accuracy, samples.

The windows are contiguous and non-overlapping from the start of the val split (all of it,
or the first ``max_batches * batch_size`` windows, and at most ``max_tokens`` tokens), so a champion
and a challenger always see the same tokens. A window is as long as the one the model was trained in
(``eval.block_size`` to choose another): scoring a fine-tuned base in its whole 8k context costs
quadratic attention and 8k x vocabulary logits per row for no better answer. Bits per byte divide
total nats by the UTF-8 bytes the scored target tokens stand for, so models with different tokenizers
compare fairly; when the model's tokenizer differs from the data's, the validation text is
re-tokenized with the model's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from lmcore.data.prepare import load_prepared, token_byte_lengths, tokenizer_hash
from lmcore.device import pick_device
from lmcore.errors import LmopsError
from lmcore.machine import release_freed_memory
from lmcore.model.checkpoint import load_model
from lmcore.model.generate import SamplingParams, generate_text
from lmcore.model.weights import unwrap
from lmcore.progress import Progress, Say


def _val_ids(tokenizer, data_dir: Path) -> np.ndarray:
    """Val token ids under *this* tokenizer: the prepared file, or the val text re-encoded."""
    data = load_prepared(data_dir)
    if data.meta.get("tokenizer_hash") == tokenizer_hash(tokenizer):
        return np.asarray(data.tokens("val"))
    docs_path = data.dir / "val_docs.jsonl"
    if not docs_path.is_file():
        raise LmopsError(f"model tokenizer differs from the one in {data.dir} and it has no val_docs.jsonl")
    ids: list[int] = []
    with open(docs_path, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    for doc_ids in tokenizer.encode_batch(docs):
        ids.extend(doc_ids)
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int64)


MAX_DEFAULT_WINDOW = 1024  # a model that names no training window is scored in at most this many tokens


def eval_window(net: torch.nn.Module, params=None, trained_window: int | None = None) -> int:
    """Tokens per scored window: ``eval.block_size``, else the window the model trained in (its meta's
    ``window``), else its context up to ``MAX_DEFAULT_WINDOW``; never more than the model's context."""
    context = unwrap(net).cfg.block_size
    asked = getattr(params, "block_size", 0) or trained_window or min(context, MAX_DEFAULT_WINDOW)
    return max(1, min(int(asked), context))


def _n_windows(n_ids: int, block: int, batch_size: int, max_batches: int, max_tokens: int) -> int:
    n = math.ceil((n_ids - 1) / block)
    if max_batches > 0:
        n = min(n, max_batches * batch_size)
    if max_tokens > 0:
        n = min(n, max(1, max_tokens // block))
    return n


def scored_windows(n_ids: int, block: int, params) -> int:
    """How many windows :func:`evaluate_model` scores of a val split of ``n_ids`` tokens (``EvalParams``)."""
    return _n_windows(n_ids, block, params.batch_size, params.max_batches, params.max_tokens)


@torch.no_grad()
def score_tokens(model: torch.nn.Module, ids: np.ndarray, byte_len: np.ndarray, block: int, batch_size: int,
                 max_batches: int, device: torch.device, max_tokens: int = 0, progress: Progress | None = None) -> dict:
    """Total nats, correct top-1 predictions, tokens and bytes over contiguous windows of ``ids``."""
    n_windows = _n_windows(len(ids), block, batch_size, max_batches, max_tokens)
    nats, correct, count, nbytes = 0.0, 0, 0, 0
    for w0 in range(0, n_windows, batch_size):
        ws = range(w0, min(w0 + batch_size, n_windows))
        full = [w for w in ws if (w + 1) * block + 1 <= len(ids)]
        groups = [full] + [[w] for w in ws if w not in full]  # the one short tail window runs alone
        for g in groups:
            if not g:
                continue
            T = min(block, len(ids) - 1 - g[0] * block)
            win = np.stack([ids[w * block : w * block + T + 1] for w in g]).astype(np.int64)  # (b, T+1)
            x = torch.from_numpy(win[:, :-1]).to(device)  # (b, T)
            y = torch.from_numpy(win[:, 1:]).to(device)
            logits, _ = model(x)  # (b, T, V)
            logp = torch.log_softmax(logits.float(), dim=-1)
            nats -= float(logp.gather(-1, y[..., None]).sum())
            correct += int((logits.argmax(-1) == y).sum())
            count += y.numel()
            nbytes += int(byte_len[win[:, 1:]].sum())
            if progress is not None:
                progress.update(len(g))
    return {"nats": nats, "correct": correct, "tokens": count, "bytes": nbytes}


def _bpb(nats: float, nbytes: int) -> float:
    """Total nats over the UTF-8 bytes the scored target tokens stand for, in bits."""
    return nats / (math.log(2) * max(nbytes, 1))


def bits_per_byte(model: torch.nn.Module, tokenizer, texts: list[str], max_tokens: int = 20_000) -> float:
    """Bits per UTF-8 byte of ``texts`` (each ended by EOS; the first ``max_tokens`` targets).

    The same windows and byte accounting as :func:`evaluate_model` (:func:`score_tokens` over
    non-overlapping block-size windows, bytes from ``token_byte_lengths``), one window per forward
    pass: an int8-dynamic model quantizes activations per call, so batching windows would change
    its numbers. ``lmcore.optimize.quantize`` compares fp32 and int8 with it.
    """
    ids: list[int] = []
    for t in texts:
        ids.extend([*tokenizer.encode(t), tokenizer.eos_id])
        if len(ids) > max_tokens:
            break
    arr = np.asarray(ids[: max_tokens + 1], dtype=np.int64)
    if len(arr) < 2:
        raise LmopsError("not enough text to measure bits per byte")
    net = unwrap(model)
    device = next(net.parameters()).device
    s = score_tokens(net, arr, token_byte_lengths(tokenizer), eval_window(net), 1, 0, device)
    return _bpb(s["nats"], s["bytes"])


def evaluate_model(model: torch.nn.Module, tokenizer, data_dir: Path, params, device: str | torch.device = "auto",
                   trained_window: int | None = None, say: Say | None = None) -> dict:
    """Metrics of an in-memory model (eval ``params`` = ``EvalParams``) on ``data_dir``'s val split, in
    windows of :func:`eval_window` (``trained_window``: the model folder's meta ``window``); progress on
    the terminal, and to ``say`` (a log) with its ETA."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    net = unwrap(model)
    was_training = net.training
    net.to(dev).eval()
    ids = _val_ids(tokenizer, Path(data_dir))
    if len(ids) < 2:
        raise LmopsError(f"validation split in {data_dir} has fewer than 2 tokens: nothing to evaluate")
    if int(ids.max()) >= net.cfg.vocab_size:
        raise LmopsError(f"validation tokens in {data_dir} exceed the model vocabulary ({net.cfg.vocab_size})")
    byte_len = token_byte_lengths(tokenizer)
    window = eval_window(net, params, trained_window)
    n_windows = scored_windows(len(ids), window, params)
    with Progress(n_windows + params.n_samples, "evaluate", "window", say) as progress:
        s = score_tokens(net, ids, byte_len, window, params.batch_size, params.max_batches, dev, params.max_tokens,
                         progress)
        val_loss = s["nats"] / s["tokens"]
        prompts = list(params.prompts) or [""]
        samples = []
        for i in range(params.n_samples):
            prompt = prompts[i % len(prompts)]
            sp = SamplingParams(max_new_tokens=params.sample_max_new_tokens, temperature=params.temperature,
                                top_k=params.top_k, top_p=params.top_p, seed=params.seed + i)
            samples.append({"prompt": prompt, "completion": generate_text(net, tokenizer, prompt, sp)})
            progress.update()
    net.train(was_training)
    return {
        "val_loss": val_loss,
        "perplexity": math.exp(min(val_loss, 700.0)),
        "bits_per_byte": _bpb(s["nats"], s["bytes"]),
        "accuracy": s["correct"] / s["tokens"],
        "tokens": s["tokens"],
        "bytes": s["bytes"],
        "window": window,
        "samples": samples,
    }


def evaluate(model_dir: Path, data_dir: Path, params, out_path: Path | None = None, device: str = "auto",
             say: Say | None = None) -> dict:
    """Load a model folder and score it on ``data_dir``; the metrics JSON goes to ``out_path`` if given."""
    dev = pick_device(device)
    model, tokenizer, meta = load_model(model_dir, dev)
    metrics = evaluate_model(model, tokenizer, data_dir, params, dev, trained_window=meta.get("window"), say=say)
    del model
    release_freed_memory()
    metrics.update(model_dir=str(model_dir), data_dir=str(data_dir), dataset_version=meta.get("dataset_version"))
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(out_path)
    return metrics
