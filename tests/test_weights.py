"""The shared weight helpers: unwrapping compile/DDP wrappers and restoring a tied head."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmcore.model.weights import tie_head, unwrap

pytestmark = pytest.mark.code


def _wrap(inner: torch.nn.Module, attr: str) -> torch.nn.Module:
    outer = torch.nn.Module()
    setattr(outer, attr, inner)
    return outer


def test_unwrap_finds_the_model_under_any_order_of_wrappers():
    model = torch.nn.Linear(2, 2)
    assert unwrap(model) is model
    for attrs in (["_orig_mod"], ["module"], ["_orig_mod", "module"], ["module", "_orig_mod"]):
        wrapped = model
        for a in attrs:
            wrapped = _wrap(wrapped, a)
        assert unwrap(wrapped) is model, attrs


def test_unwrap_of_a_real_compiled_model():
    model = torch.nn.Linear(2, 2)
    assert unwrap(torch.compile(model)) is model


def test_tie_head_restores_the_head_from_the_embedding_only_when_tied():
    embed, stale = torch.ones(3, 2), torch.zeros(3, 2)
    tied, untied = SimpleNamespace(tie_embeddings=True), SimpleNamespace(tie_embeddings=False)
    assert tie_head({"embed.weight": embed}, tied)["lm_head.weight"] is embed
    assert tie_head({"embed.weight": embed, "lm_head.weight": stale}, tied)["lm_head.weight"] is embed
    assert tie_head({"embed.weight": embed, "lm_head.weight": stale}, untied)["lm_head.weight"] is stale
    assert "lm_head.weight" not in tie_head({"embed.weight": embed}, untied)
    assert tie_head({}, tied) == {}  # no embedding: left for the strict load to name
