"""lmops' model checked against a reference nobody here wrote: transformers' LlamaForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch

from lmcore.data.tokenizer import Tokenizer
from lmcore.errors import LmopsError
from lmcore.model.checkpoint import load_model, save_model
from lmcore.model.generate import SamplingParams, generate_tokens
from lmcore.model.hf import export_hf, from_hf_state_dict, hf_config, import_hf, to_hf_state_dict
from lmcore.model.transformer import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.model

CORPUS = ["def main():\n    return 42\n", "Hello, world! Ünïcödé and 日本語 text.", "import os\nprint(os.sep)\n"] * 20


def _model(tie: bool, n_kv_head: int, seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=64, block_size=48,
                      tie_embeddings=tie)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _hf(model: Transformer):
    hf = transformers.LlamaForCausalLM(hf_config(model.cfg)).eval()
    result = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    return hf


@pytest.mark.parametrize(("tie", "n_kv_head"), [(True, 4), (False, 2), (False, 1)])
def test_same_logits_as_transformers(tie, n_kv_head):
    model = _model(tie, n_kv_head)
    hf = _hf(model)
    idx = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        ref = hf(idx).logits
    assert ours.shape == ref.shape == (3, 40, model.cfg.vocab_size)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    if not tie:  # the untied head must really be a separate matrix
        assert not torch.equal(model.lm_head.weight, model.embed.weight)


def test_state_dict_round_trip_is_exact():
    for tie, kv in [(True, 4), (False, 2)]:
        model = _model(tie, kv, seed=3)
        back = Transformer(model.cfg)
        back.load_state_dict(from_hf_state_dict(to_hf_state_dict(model), model.cfg), strict=True)
        for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_cache_decoding_matches_full_forward():
    """Prefill + a chunk + single tokens through the KV cache == one full forward pass."""
    model = _model(False, 2, seed=5)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2, 30)
        parts = [model(idx[:, :11], cache=cache)[0], model(idx[:, 11:19], cache=cache)[0]]
        parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(19, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert cache.pos == 30


def test_export_loads_in_transformers_and_generates_the_same(tmp_path):
    tok = Tokenizer.train(CORPUS, kind="bpe", vocab_size=300)
    model = _model(False, 2, seed=7)
    save_model(tmp_path / "model", model, tok)
    out = export_hf(tmp_path / "model", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.eos_id
    prompt = "def main():"
    assert hf_tok(prompt, add_special_tokens=False)["input_ids"] == tok.encode(prompt)

    ids = tok.encode(prompt)
    sp = SamplingParams(max_new_tokens=20, temperature=0.0, stop_at_eos=False)
    ours = [t for t, _ in generate_tokens(model, ids, sp, tok.eos_id)]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20, min_new_tokens=20,
                          pad_token_id=tok.eos_id)[0, len(ids):].tolist()
    assert ours == ref
    assert hf_tok.decode(ref) == tok.decode(ours)


def test_import_of_export_is_the_same_model(tmp_path):
    tok = Tokenizer.train(CORPUS, kind="byte")
    for tie in (True, False):
        model = _model(tie, 2, seed=11)
        src, hf_dir, back = tmp_path / f"m{tie}", tmp_path / f"hf{tie}", tmp_path / f"back{tie}"
        save_model(src, model, tok)
        import_hf(export_hf(src, hf_dir), back)
        again, tok2, meta = load_model(back)
        assert again.cfg.to_dict() == {**model.cfg.to_dict(), "ffn_hidden": model.cfg.hidden}
        assert tok2.to_str() == tok.to_str() and meta["format"] == "hf-llama"
        for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_refuses_non_empty_output_and_bad_input(tmp_path):
    tok = Tokenizer.train(CORPUS, kind="byte")
    save_model(tmp_path / "model", _model(True, 4), tok)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(LmopsError, match="not empty"):
        export_hf(tmp_path / "model", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    export_hf(tmp_path / "model", tmp_path / "busy", force=True)
    assert not (tmp_path / "busy" / "keep.txt").exists()
    with pytest.raises(LmopsError, match="own source"):
        export_hf(tmp_path / "model", tmp_path / "model", force=True)
    with pytest.raises(LmopsError, match="not a model folder"):
        export_hf(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(LmopsError, match="no config.json"):
        import_hf(tmp_path / "model" / "missing", tmp_path / "imp")
    (tmp_path / "busy" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LmopsError, match="cannot read weights"):
        import_hf(tmp_path / "busy", tmp_path / "imp")
    assert not (tmp_path / "imp").exists()
    cfg = json.loads((tmp_path / "busy" / "config.json").read_text())
    (tmp_path / "busy" / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn"}}))
    with pytest.raises(LmopsError, match="RoPE"):
        import_hf(tmp_path / "busy", tmp_path / "imp")
