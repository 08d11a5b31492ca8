"""DPO after SFT: the loss equals TRL's ``DPOTrainer`` loss on the same batch and weights, and a DPO run
makes the model prefer the chosen completions (reference log-probabilities taken once, before training)."""

from __future__ import annotations

import pytest
import torch
from _base_helpers import make_base
from _lm_helpers import tiny_params

from lmcore.model.base import load_base
from lmcore.model.checkpoint import load_model, save_model
from lmcore.model.hf import export_hf
from lmcore.training.dpo import dpo_loss, encode_pairs, preference_scores, reference_logps, sequence_logps, train_dpo

pytestmark = pytest.mark.model
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
         {"prompt": "Say hello.", "chosen": "Hello! How can I help you today?", "rejected": "No."},
         {"prompt": "Two plus two?", "chosen": "Four.", "rejected": "Five, obviously."},
         {"prompt": "Write add in Python.", "chosen": "def add(a, b):\n    return a + b", "rejected": "I can't."}]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny chat base as the SFT model (an lmops model folder) and its HF folder."""
    root = tmp_path_factory.mktemp("dpo")
    base = make_base(root / "base")
    model, tok, _ = load_base(str(base), verify=False)
    return base, save_model(root / "sft", model, tok)


def test_dpo_loss_matches_trl(sft, tmp_path):
    base, sft_dir = sft
    ref, tok, _ = load_model(sft_dir)
    policy, _, _ = load_model(sft_dir)
    with torch.no_grad():  # a policy that has moved away from its reference
        g = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    chats = [{**p, "prompt": [{"role": "user", "content": p["prompt"]}]} for p in PAIRS]  # TRL's conversational form
    batch = encode_pairs(tok, chats, 256)
    served = [{**p, "prompt": tok.render_chat(c["prompt"], add_generation_prompt=True)} for p, c in
              zip(PAIRS, chats, strict=True)]
    assert torch.equal(encode_pairs(tok, served, 256).ids, batch.ids)  # harvested: the prompt as it was served
    ours, _ = dpo_loss(sequence_logps(policy, batch), reference_logps(ref, batch), beta=0.1)

    save_model(tmp_path / "policy", policy, tok)
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "policy", tmp_path / "hf"))
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(base)
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in PAIRS]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), beta=0.1,
                         loss_type=["sigmoid"], report_to="none", use_cpu=True, bf16=False, max_length=None)
    trainer = trl.DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, processing_class=transformers.
                             AutoTokenizer.from_pretrained(base), train_dataset=datasets.Dataset.from_list(rows))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    hf_policy.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, inputs)
    assert abs(float(ours) - 0.6931) > 1e-3  # not the trivial log 2 of a policy equal to its reference
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_dpo_run_prefers_the_chosen(sft, tmp_path, lora_r):
    _, sft_dir = sft
    dp = tiny_params(dpo__max_steps=25, dpo__lr=3e-3 if lora_r else 1e-3, dpo__batch_size=4, dpo__beta=0.5,
                     dpo__lora_r=lora_r, dpo__lora_alpha=8.0).dpo
    res = train_dpo(sft_dir, PAIRS, dp, tmp_path / "out", meta={"dataset_version": "test"})
    assert res.final_loss < res.first_loss
    assert res.before["preference_accuracy"] < 1.0 == res.after["preference_accuracy"]
    assert res.after["preference_margin"] > res.before["preference_margin"]
    model, tok, meta = load_model(res.model_dir)  # merged, an ordinary model folder
    assert meta["dpo"]["steps"] == 25 and meta["dataset_version"] == "test"
    assert preference_scores(model, tok, PAIRS) == res.after


def test_gate_rule_4_weighs_golden_and_preferences():
    from lmcore.registry.gate import decide

    ok = {"non_empty_text": True, "hf_export_agrees": True}
    base = dict(checks=ok, challenger_bpb=1.0, champion_bpb=1.1, min_improvement=0.0, golden_tolerance=0.05)
    better = {"challenger_preference_accuracy": 0.75, "champion_preference_accuracy": 0.5,
              "challenger_golden_loglik": -2.02, "champion_golden_loglik": -2.0}
    assert decide(2, 1, scores=better, min_preference_gain=0.2, **base).promoted
    d = decide(2, 1, scores={**better, "challenger_preference_accuracy": 0.5}, min_preference_gain=0.01, **base)
    assert not d.promoted and "harvested preferences" in d.reason and d.scores["champion_preference_accuracy"] == 0.5
    d = decide(2, 1, scores={**better, "challenger_golden_loglik": -2.2}, **base)
    assert not d.promoted and "golden prompts regress" in d.reason
    assert not decide(2, 1, **{**base, "checks": {**ok, "hf_export_agrees": False}}).promoted
    assert decide(2, None, scores={"challenger_preference_accuracy": 0.0}, **{**base, "champion_bpb": None}).promoted
    # Held-out pairs (never trained on) decide once there are enough of them; the trained-on share cannot.
    learnt = {**better, "challenger_preference_accuracy": 1.0, "challenger_heldout_preference_accuracy": 0.4,
              "champion_heldout_preference_accuracy": 0.5, "challenger_heldout_pairs": 12.0,
              "champion_heldout_pairs": 12.0}
    d = decide(2, 1, scores=learnt, min_heldout_pairs=10, **base)
    assert not d.promoted and "of 12 held-out pairs" in d.reason
    d = decide(2, 1, scores=learnt, min_heldout_pairs=20, **base)  # too few held out: all pairs, said so
    assert d.promoted and "all pairs (DPO may have trained on some) in 100%" in d.reason


def test_hf_export_check_and_user_scores(sft):
    from lmcore.registry.gate import hf_export_agrees, user_scores

    _, sft_dir = sft
    assert hf_export_agrees(sft_dir, "Say hello.")
    model, tok, _ = load_model(sft_dir)
    s = user_scores(model, tok, ({"prompt": "Say hello.", "completion": "Hello!"},), PAIRS)
    assert s["preference_accuracy"] == preference_scores(model, tok, PAIRS)["preference_accuracy"]
    assert s["golden_loglik"] < 0 and set(s) == {"golden_loglik", "preference_accuracy", "preference_margin"}
    split = [{**p, "split": "holdout" if i % 2 else "train"} for i, p in enumerate(PAIRS)]
    s = user_scores(model, tok, (), split)
    assert s["heldout_pairs"] == 2 and s["heldout_preference_accuracy"] == preference_scores(
        model, tok, split[1::2])["preference_accuracy"]
