"""Evaluation: exact loss/perplexity/bits-per-byte/accuracy on fixed windows, seeded samples, JSON out."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _lm_helpers import tiny_params, write_corpus

from lmcore.data.prepare import prepare_dataset, read_text_source
from lmcore.errors import LmopsError
from lmcore.model.checkpoint import load_model
from lmcore.training.evaluate import evaluate, evaluate_model
from lmcore.training.loop import train

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("ev")
    p = tiny_params(prepare__val_fraction=0.3, train__max_steps=20, train__eval_interval=0)
    corpus = write_corpus(base / "corpus", n_files=8)
    data = prepare_dataset(read_text_source(corpus), base / "data", p.tokenizer, p.prepare, "v1")
    r = train(data.dir, base / "run", p.model, p.train, progress=False)
    bpe = tiny_params(prepare__val_fraction=0.3, tokenizer__kind="bpe", tokenizer__vocab_size=400)
    bpe_data = prepare_dataset(read_text_source(corpus), base / "bpe", bpe.tokenizer, bpe.prepare)
    return r.model_dir, data, bpe_data


def test_metrics_are_consistent_and_written(trained, tmp_path):
    model_dir, data, _ = trained
    p = tiny_params(eval__max_batches=0)
    m = evaluate(model_dir, data.dir, p.eval, out_path=tmp_path / "m.json", device="cpu")
    assert json.loads((tmp_path / "m.json").read_text())["val_loss"] == m["val_loss"]
    assert m["tokens"] == data.val_tokens - 1  # the whole split, every target once
    assert m["bytes"] == data.meta["val_bytes"] - 1  # byte-level: the first byte is never a target
    assert m["perplexity"] == pytest.approx(math.exp(m["val_loss"]))
    assert m["bits_per_byte"] == pytest.approx(m["val_loss"] * m["tokens"] / (math.log(2) * m["bytes"]))
    assert 0.0 < m["accuracy"] < 1.0 and m["val_loss"] < math.log(257)
    assert len(m["samples"]) == 2 and m["samples"][0]["prompt"] == p.eval.prompts[0]
    again = evaluate(model_dir, data.dir, p.eval, device="cpu")
    assert again["samples"] == m["samples"] and again["val_loss"] == m["val_loss"]


def test_max_batches_takes_the_same_leading_windows(trained):
    model_dir, data, _ = trained
    one = tiny_params(eval__max_batches=1, eval__n_samples=0).eval
    m = evaluate(model_dir, data.dir, one, device="cpu")
    assert m["tokens"] == 8 * 32 and m["samples"] == []


def test_evaluation_tells_a_log_how_far_it_is(trained):
    model_dir, data, _ = trained
    said: list[str] = []
    m = evaluate(model_dir, data.dir, tiny_params(eval__max_batches=1, eval__n_samples=1,
                                                  eval__sample_max_new_tokens=4).eval, device="cpu", say=said.append)
    assert m["tokens"] == 8 * 32  # one batch of 8 windows of 32 tokens, then one sample
    assert said[-1].startswith("evaluate: 9/9 windows") and "ETA 0 s" in said[-1]


def test_uniform_model_scores_exactly_log_vocab(trained):
    model_dir, data, _ = trained
    model, tok, _ = load_model(model_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: all logits 0 -> uniform over 257 tokens
    m = evaluate_model(model, tok, data.dir, tiny_params(eval__max_batches=0, eval__n_samples=0).eval, "cpu")
    assert m["val_loss"] == pytest.approx(math.log(257), rel=1e-6)
    assert m["bits_per_byte"] == pytest.approx(math.log2(257) * m["tokens"] / m["bytes"], rel=1e-6)
    val = np.asarray(data.tokens("val"))[1:]
    assert m["accuracy"] == pytest.approx(float((val == 0).mean()))  # argmax of ties = id 0


def test_other_tokenizer_is_scored_on_the_same_bytes(trained):
    model_dir, _, bpe_data = trained
    m = evaluate(model_dir, bpe_data.dir, tiny_params(eval__max_batches=0, eval__n_samples=0).eval, device="cpu")
    assert m["bytes"] == bpe_data.meta["val_bytes"] - 1


def test_bad_inputs(trained, tmp_path):
    model_dir, data, _ = trained
    with pytest.raises(LmopsError, match="no prepared data"):
        evaluate(model_dir, tmp_path / "nope", tiny_params().eval)
    with pytest.raises(LmopsError, match="not a model folder"):
        evaluate(tmp_path, data.dir, tiny_params().eval)


def test_text_bits_per_byte_is_evaluate_models_measure(trained):
    """One bits-per-byte: the text-level measure (int8 comparisons) equals evaluate's on the same tokens."""
    from lmcore.optimize.quantize import bits_per_byte as quantize_bpb
    from lmcore.training.evaluate import bits_per_byte

    model_dir, data, _ = trained
    model, tok, _ = load_model(model_dir)
    m = evaluate_model(model, tok, data.dir, tiny_params(eval__max_batches=0, eval__n_samples=0).eval, "cpu")
    docs = [json.loads(line) for line in (data.dir / "val_docs.jsonl").read_text().splitlines() if line.strip()]
    bpb = bits_per_byte(model, tok, docs, max_tokens=10**9)
    assert bpb == pytest.approx(m["bits_per_byte"], rel=1e-5) and quantize_bpb is bits_per_byte
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile wraps it in
    assert bits_per_byte(wrapped, tok, docs[:2], max_tokens=100) == bits_per_byte(model, tok, docs[:2], 100)
    with pytest.raises(LmopsError, match="not enough text"):
        bits_per_byte(model, tok, [], max_tokens=100)
