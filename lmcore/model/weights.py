"""Two facts about a model's weights that every reader and writer of them shares.

* :func:`unwrap`: the model itself under ``torch.compile`` (``_orig_mod``) and DDP (``module``)
  wrappers, in whatever order and depth they were applied (training compiles a DDP model).
* :func:`tie_head`: a tied model's ``lm_head.weight`` *is* ``embed.weight``; files leave the
  duplicate out (safetensors refuses shared storage), so a loader puts it back from the embedding.

No imports from the rest of lmcore, so the model, checkpoint, int8 and HF code can all use it.
"""

from __future__ import annotations

from typing import Any

WRAPPER_ATTRS = ("_orig_mod", "module")  # torch.compile's OptimizedModule, DistributedDataParallel
EMBED, HEAD = "embed.weight", "lm_head.weight"


def unwrap(model: Any) -> Any:
    """The innermost model under any ``torch.compile`` / DDP wrappers (``model`` itself if unwrapped)."""
    seen = 0
    while seen < 8:  # a wrapper of a wrapper at most in practice; the bound only guards a cycle
        inner = next((getattr(model, a) for a in WRAPPER_ATTRS if hasattr(model, a)), None)
        if inner is None or inner is model:
            return model
        model, seen = inner, seen + 1
    return model


def tie_head(state: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """``state`` with a tied model's head restored from its embedding (in place; returned for chaining).

    Always the embedding, never a stale head a file may carry: the two are one tensor in the
    model, so loading a different head would overwrite the embedding. Untied configs, and states
    without an embedding (the strict load then names what is missing), are left alone.
    """
    if getattr(cfg, "tie_embeddings", False) and EMBED in state:
        state[HEAD] = state[EMBED]
    return state
