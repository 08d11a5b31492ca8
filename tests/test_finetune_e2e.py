"""Issue 15 end to end: a tiny pretrained base -> `lmops run --base` (SFT) -> champion -> served -> feedback with
corrections over HTTP -> harvest (SFT rows + preference pairs) -> DPO run -> the gate promotes the challenger only
because it prefers the corrections more often than the champion did."""

from __future__ import annotations

import httpx
import pytest
from _base_helpers import make_base
from _serve_helpers import thread_server
from conftest import TINY_PARAMS, make_tiny_workspace

pytestmark = [pytest.mark.model, pytest.mark.slow]

QUESTIONS = [("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."),
             ("Say hello.", "Hello! How can I help you today?"), ("Name a fox.", "The quick brown fox."),
             ("Write add.", "def add(a, b):\n    return a + b"), ("Greet me.", "Hello there."),
             ("What is Paris?", "The capital of France."), ("Two plus two?", "Four.")]
E2E_PARAMS = TINY_PARAMS + """\
gate:
  min_improvement: -1.0
  golden: [{prompt: "Say hello.", completion: "Hello!"}]
  golden_tolerance: 1.0
  min_preference_gain: 0.01
feedback:
  min_new_records: 1
  holdout_fraction: 0.0
dpo:
  max_steps: 30
  lr: 1.0e-3
  beta: 0.5
  batch_size: 4
"""


def test_base_sft_feedback_dpo_gate(prefect_harness, tmp_path, monkeypatch):
    from flows.dpo import dpo_flow
    from flows.training import training_flow
    from lmcore.config import load_params
    from lmcore.data.tokenizer import Tokenizer
    from lmcore.data.versions import DataRegistry
    from lmcore.feedback.harvest import harvest, read_pairs
    from lmcore.model.base import TAG_BASE_HASH, base_hash
    from lmcore.registry.models import fetch_model_dir, list_versions, resolve_alias
    from lmcore.serve.app import create_app
    from lmcore.settings import get_settings

    ws = make_tiny_workspace(tmp_path / "ws", E2E_PARAMS)
    monkeypatch.setenv("LMOPS_WORKSPACE", str(ws))
    monkeypatch.setenv("LMOPS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ws)
    base = make_base(tmp_path / "tiny-llama")

    sft = training_flow(sources=[str(ws / "corpus")], overrides={"model.base": str(base)})  # lmops run --base
    assert sft["gate"]["promoted"] and resolve_alias("tiny-lm", "champion") == "1"
    v1 = list_versions("tiny-lm")[0]
    assert v1["tags"][TAG_BASE_HASH] == base_hash(base) and v1["tags"]["lmops.finetune"] == "full"

    served, _ = fetch_model_dir("models:/tiny-lm@champion")  # the base's end token and chat template registered too
    assert Tokenizer.load(served / "tokenizer.json").eos_token == "<|im_end|>"
    params = load_params(ws / "params.yaml", {"model.base": str(base), "serve.compile_decode": False})
    with thread_server(create_app("models:/tiny-lm@champion", params)) as url:
        model_id = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        for prompt, better in QUESTIONS:  # a chat model is asked as one: its template renders the prompt
            g = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": 6,
                "temperature": 0})
            assert g.status_code == 200, g.text
            r = httpx.post(f"{url}/v1/feedback", json={"generation_id": g.headers["X-Generation-Id"], "rating": -1,
                                                         "correction": better}, timeout=30)
            assert r.status_code == 200, r.text
    harvested = harvest(get_settings(), params)
    assert harvested.pairs == len(QUESTIONS)
    pairs = read_pairs(DataRegistry.open())  # served prompts: through the chat template, each by version 1
    assert {p["model_version"] for p in pairs} == {"1"} and all(p["prompt"].startswith("<|im_start|>") for p in pairs)

    dpo = dpo_flow(params_path=str(ws / "params.yaml"), overrides={"model.base": str(base)})
    gate = dpo["gate"]
    ch, cp = gate["scores"]["challenger_preference_accuracy"], gate["scores"]["champion_preference_accuracy"]
    assert dpo["model_version"] == "2" and gate["checks"]["hf_export_agrees"]
    assert ch > cp and gate["promoted"] and resolve_alias("tiny-lm", "champion") == "2", gate["reason"]
    v2 = list_versions("tiny-lm")[0]
    assert float(v2["tags"]["lmops.gate.challenger_preference_accuracy"]) == pytest.approx(ch, abs=1e-4)
    print(f"\npreference accuracy on the harvested corrections: champion {cp:.2f} -> challenger {ch:.2f}")

