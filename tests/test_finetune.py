"""Fine-tuning a pretrained base: loading (logit parity, its tokenizer and chat template), chat data
(GX suite, prompt masks), full fine-tuning and LoRA through peft, merged and exported.

Every base here is a tiny random ``LlamaForCausalLM`` written by ``transformers.save_pretrained``
(no hub): the loading code is the one a hub id goes through once fetched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _base_helpers import make_base
from _lm_helpers import tiny_params

from lmcore.data.chat import chat_text, ingest_chat, parse_chat
from lmcore.data.prepare import prepare_split_texts
from lmcore.data.versions import DataRegistry
from lmcore.errors import LmopsError
from lmcore.model.base import base_hash, load_base
from lmcore.model.checkpoint import load_model, save_model
from lmcore.model.generate import SamplingParams, generate_tokens
from lmcore.model.hf import export_hf
from lmcore.training.loop import Batches, train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CHATS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in [
    ("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."),
    ("Say hello.", "Hello! How can I help you today?"), ("Write add in Python.", "def add(a, b):\n    return a + b"),
]] * 6
MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "Goodbye."}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="module")
def chat_data(base, tmp_path_factory):
    """Prepared chat data (plus one plain document) under the base's own tokenizer."""
    tok = load_base(str(base), verify=False)[1]
    docs = [chat_text(c) for c in CHATS] + ["The quick brown fox jumps over the lazy dog."]
    return prepare_split_texts(docs, docs[:4], tmp_path_factory.mktemp("prep") / "p", tiny_params().tokenizer,
                               tokenizer=tok)


def _params(base, **sets):
    fixed = dict(model__base=str(base), model__block_size=64, train__max_steps=8, train__batch_size=4, train__lr=3e-3,
                 train__warmup_steps=0, train__eval_interval=4, train__checkpoint_interval=4)
    return tiny_params(**{**fixed, **sets})


@pytest.mark.model
def test_base_loads_with_parity_and_its_own_tokenizer(base):
    model, tok, info = load_base(str(base))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)
    assert info.architecture == "LlamaForCausalLM" and info.hash == base_hash(base) and len(info.hash) == 16
    hf_tok = transformers.AutoTokenizer.from_pretrained(base)
    assert tok.eos_token == hf_tok.eos_token == "<|im_end|>" and tok.eos_id == hf_tok.eos_token_id
    ids, mask = tok.encode_chat(MULTI)
    assert ids == hf_tok.apply_chat_template(MULTI, tokenize=True)["input_ids"]
    counted = [i for i, m in zip(ids, mask, strict=True) if m]  # exactly the two assistant turns, with their ends
    assert counted == tok.encode_rendered("Hello there<|im_end|>\n") + tok.encode_rendered("Goodbye.<|im_end|>\n")
    # A served prompt (harvested feedback) was rendered by the template when it was served: it is not
    # templated again; the reply is counted with the turn's end, exactly as in the chat above.
    served = tok.render_chat(MULTI[:2], add_generation_prompt=True)
    ids, mask = tok.encode_served(served, "Hello there")
    assert ids == tok.encode_chat(MULTI[:3])[0] and mask == tok.encode_chat(MULTI[:3])[1]


@pytest.mark.model
def test_bad_bases_fail_in_one_line(base, tmp_path):
    with pytest.raises(LmopsError, match="base model not found"):
        load_base(str(tmp_path / "nowhere"))
    with pytest.raises(LmopsError, match="cannot get base 'no-such-org/no-such-model'"):
        load_base("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1 and not cached
    other = shutil.copytree(base, tmp_path / "mistral")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"],
                                                   "model_type": "mistral"}))
    with pytest.raises(LmopsError, match="unsupported base architecture MistralForCausalLM.*LlamaForCausalLM"):
        load_base(str(other))
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(LmopsError, match="cannot read weights"):
        load_base(str(other))


@pytest.mark.data
def test_chat_jsonl_is_validated_and_versioned(tiny_workspace):
    good = [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}."} for i in range(6)]
    lines = [json.dumps(g) for g in good] + [
        json.dumps({"messages": MULTI}),
        json.dumps({"messages": [{"role": "robot", "content": "beep boop"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"prompt": "A prompt with no completion at all"}),
        json.dumps({"prompt": "A prompt whose completion is empty", "completion": ""}),
        '{"prompt": "broken json',
        json.dumps({"text": "plain text is not a chat record"}),
    ]
    path = tiny_workspace / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    r = ingest_chat([str(path)], tiny_params().data)
    assert (r.rows, r.accepted, r.quarantined) == (12, 7, 5)
    q = pd.read_parquet(r.quarantine_path)
    why = {int(u.rsplit("#L", 1)[1]): set(str(x).split("; ")) for u, x in zip(q["uri"], q["reasons"], strict=True)}
    match, no_match = "expect_column_values_to_match_regex(text)", "expect_column_values_to_not_match_regex(text)"
    assert set(why) == {8, 9, 10, 11, 12}  # the five bad lines, each kept with its reasons
    assert no_match in why[8]  # the robot role
    assert why[9] == why[11] == why[12] == {match}  # no completion; not JSON; not a chat shape
    assert no_match in why[10]  # an empty completion
    texts = [t for _, t, _ in DataRegistry.open().iter_records()]
    assert sorted(parse_chat(t)[-1]["content"] for t in texts) == sorted([g["completion"] for g in good] + ["Goodbye."])


@pytest.mark.data
def test_prepare_masks_prompts(chat_data, base):
    meta = chat_data.meta
    assert meta["loss_mask"] and 0 < meta["train_target_tokens"] < meta["train_tokens"]
    ids, mask = np.asarray(chat_data.tokens("train")), np.asarray(chat_data.loss_mask("train"))
    assert int(mask.sum()) == meta["train_target_tokens"]
    tok = load_base(str(base), verify=False)[1]
    first, first_mask = tok.encode_chat(CHATS[0])
    if ids[: len(first)].tolist() == first:  # the first training document is the first chat
        assert mask[: len(first)].tolist() == first_mask
    b = Batches(ids, 16, 8, 0, torch.device("cpu"), mask)
    x, y = b.get(3)
    assert ((y >= 0).sum(dim=1) > 0).all()  # every row has a target the loss counts
    rows = b.starts[np.random.default_rng([0, 0, 3, 0]).integers(0, len(b.starts), size=8)]
    want = torch.from_numpy(ids[rows[:, None] + np.arange(1, 17)].astype(np.int64))
    want[torch.from_numpy(mask[rows[:, None] + np.arange(1, 17)] == 0)] = -1
    assert torch.equal(y, want)


@pytest.mark.model
def test_full_finetune_exports_to_transformers(base, chat_data, tmp_path):
    p = _params(base)
    res = train(chat_data.dir, tmp_path / "run", p.model, p.train, progress=False)
    model, tok, meta = load_model(res.model_dir)
    start = load_base(str(base), verify=False)[0]
    assert meta["base"]["hash"] == base_hash(base) and meta["finetune"] == "full"
    assert not torch.equal(model.embed.weight, start.embed.weight)  # every weight trains
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    out = export_hf(res.model_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = hf_tok.apply_chat_template(CHATS[1][:1], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt == tok.encode_rendered(tok.render_chat(CHATS[1][:1], add_generation_prompt=True))
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    ours = [t for t, _ in generate_tokens(model, prompt, sp, tok.eos_id)]
    ref = list(prompt)
    with torch.no_grad():  # greedy by hand: generate() would hold back eos under min_new_tokens
        for _ in range(12):
            ref.append(int(hf(torch.tensor([ref])).logits[0, -1].argmax()))
    assert ours == ref[len(prompt):]


@pytest.mark.model
def test_lora_trains_adapters_only_and_merges(base, chat_data, tmp_path):
    p = _params(base, train__lora_r=4, train__lora_alpha=8.0, train__lr=2e-2)
    res = train(chat_data.dir, tmp_path / "run", p.model, p.train, progress=False)
    merged, _, meta = load_model(res.model_dir)
    assert meta["finetune"] == "lora"
    start = load_base(str(base), verify=False)[0]
    assert torch.equal(merged.embed.weight, start.embed.weight)  # frozen: only the adapters trained
    assert not torch.equal(merged.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight)  # adapters merged in
    adapter = res.out_dir / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(base)
    assert sorted(cfg["target_modules"]) == sorted(p.train.lora_targets)
    # peft's own model with the saved adapter computes what the merged weights compute
    from safetensors.torch import load_file

    from lmcore.training.lora import add_lora

    with_adapter = add_lora(start, p.train)
    peft.set_peft_model_state_dict(with_adapter, load_file(str(adapter / "adapter_model.safetensors")))
    idx = torch.randint(0, merged.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(with_adapter.eval()(idx)[0], merged(idx)[0], atol=1e-5, rtol=0)



@pytest.mark.model
def test_an_adapter_only_version_is_small_and_fetches_as_the_merged_model(base, chat_data, tmp_path, monkeypatch):
    """registry.adapter_only: the registered artifact holds the adapter, not the weights; fetching it
    merges the adapter onto the same base again, and a base whose files changed is refused in one line."""
    from _registry_helpers import make_home

    from lmcore.registry.models import fetch_model_dir, log_model, register_version
    from lmcore.registry.tracking import RunTracker, get_client

    monkeypatch.setenv("LMOPS_HOME", str(make_home(tmp_path / "home", tmp_path)))
    own_base = tmp_path / "base"
    shutil.copytree(base, own_base)  # this test edits its base below
    p = _params(own_base, train__lora_r=4, train__lora_alpha=8.0, train__lr=2e-2)
    res = train(chat_data.dir, tmp_path / "run", p.model, p.train, progress=False)
    tracker = RunTracker.start("adapters", "lora", params={}, tags={}, system_metrics=False)
    uri = log_model(tracker, res.model_dir, res.out_dir / "adapter")
    version = register_version(uri, "lora-lm", {}, tracker.run_id)
    tracker.finish("FINISHED")
    logged = get_client().list_artifacts(tracker.run_id, "model/artifacts/model_dir")
    names = {Path(a.path).name: a.file_size for a in logged}
    assert "model.safetensors" not in names and "adapter_model.safetensors" in names
    assert names["adapter_model.safetensors"] < (res.model_dir / "model.safetensors").stat().st_size / 4

    folder, _ = fetch_model_dir(f"models:/lora-lm/{version}")
    fetched, tok, meta = load_model(folder)
    merged, _, _ = load_model(res.model_dir)
    idx = torch.randint(0, merged.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fetched(idx)[0], merged(idx)[0], atol=1e-5, rtol=0)
    assert meta["finetune"] == "lora" and meta["base"]["spec"] == str(own_base) and tok.chat_template

    shutil.rmtree(folder)  # fetched again after the base changed: refused, nothing half-written
    with torch.no_grad():
        weights = own_base / "model.safetensors"
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        first = next(iter(state))
        state[first] = state[first] + 1.0
        save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(LmopsError, match="hash") as err:
        fetch_model_dir(f"models:/lora-lm/{version}")
    assert len(str(err.value).splitlines()) == 1 and not folder.exists()

@pytest.mark.model
def test_a_plain_base_without_endoftext_trains_and_registers_its_end_token(tmp_path):
    """A TinyLlama-style base: ``</s>`` ends text, no chat template, no ``<|endoftext|>``."""
    base = make_base(tmp_path / "plain", chat=False, eos="</s>")
    _, tok, _ = load_base(str(base))
    assert tok.eos_token == "</s>" and tok.chat_template is None
    ids, mask = tok.encode_chat(CHATS[0])  # no template: prompt, then the completion and </s>, which alone count
    assert tok.decode(ids) == "What is the capital of France?Paris." and ids[-1] == tok.eos_id
    assert [i for i, m in zip(ids, mask, strict=True) if m] == tok.encode("Paris.") + [tok.eos_id]
    data = prepare_split_texts(["The quick brown fox jumps over the lazy dog. " * 8] * 4, ["Hello there. " * 8],
                               tmp_path / "prep", tiny_params().tokenizer, tokenizer=tok)
    assert not data.meta["loss_mask"] and data.meta["eos_id"] == tok.eos_id
    p = _params(base, train__max_steps=2)
    res = train(data.dir, tmp_path / "run", p.model, p.train, progress=False)
    model, again, _ = load_model(res.model_dir)
    assert again.eos_token == "</s>" and again.eos_id == tok.eos_id
    assert transformers.AutoTokenizer.from_pretrained(export_hf(res.model_dir, tmp_path / "hf")).eos_token == "</s>"


@pytest.mark.code
def test_a_failing_chat_template_is_one_line(base):
    tok = load_base(str(base), verify=False)[1]
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}" \
                        "{% endif %}{{ messages[0]['content'] }}"
    with pytest.raises(LmopsError, match="^chat template failed: System role not supported$"):
        tok.encode_chat(MULTI)
    tok.chat_template = "{{ messages[0]['content'] "  # unterminated
    with pytest.raises(LmopsError, match="^chat template failed"):
        tok.render_chat(MULTI)


@pytest.mark.model
def test_a_llama3_rope_base_matches_transformers_and_exports(tmp_path):
    """Llama-3.1/3.2 bases scale RoPE frequencies ("llama3" rope type): read, checked and exported with it."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    base = make_base(tmp_path / "llama3", rope=rope, tie=True)
    model, tok, _ = load_base(str(base))  # the parity check on load already compares with transformers
    assert model.cfg.rope_llama3 == (8.0, 1.0, 4.0, 32.0)
    idx = torch.randint(0, model.cfg.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    plain = load_base(str(base), verify=False)[0]
    with torch.no_grad():  # positions past the original context really rotate differently
        ref = transformers.AutoModelForCausalLM.from_pretrained(base).eval()(idx).logits
        torch.testing.assert_close(model(idx)[0], ref, atol=1e-4, rtol=0)
    save_model(tmp_path / "m", plain, tok)
    again = transformers.AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "m", tmp_path / "hf")).eval()
    assert again.config.rope_parameters["rope_type"] == "llama3"
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, ref, atol=1e-4, rtol=0)
    assert load_model(tmp_path / "m")[0].cfg == model.cfg  # and through lmops' own config.json
