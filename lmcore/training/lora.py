"""LoRA on lmops' model through ``peft``: adapters in, merged weights out.

Why peft and no adapters of our own: peft's ``LoraConfig`` + ``inject_adapter_in_model`` wrap any
``nn.Linear`` by name, so lmops' plain ``Transformer`` gets the same LoRA layers (init, scaling,
dropout, merge) that ``transformers`` models get. Injected in place, the model stays a
``Transformer``: the training loop, checkpoints (adapter tensors beside frozen base tensors) and
resume need no special case. On save the adapters are merged into the base weights
(:func:`merge_lora`), so registry, serving, int8 and HF export see an ordinary model; the
adapter alone can be kept too (:func:`save_adapter`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def lora_config(train) -> Any:
    """peft's ``LoraConfig`` from params.yaml's ``train.lora_*`` (``TrainParams``)."""
    from peft import LoraConfig  # lazy: peft imports transformers (seconds)

    return LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=list(train.lora_targets), bias="none")


def add_lora(model: torch.nn.Module, train) -> torch.nn.Module:
    """``model`` with LoRA adapters on ``train.lora_targets``; every other weight frozen (peft does it)."""
    from peft import inject_adapter_in_model  # lazy: peft imports transformers (seconds)

    return inject_adapter_in_model(lora_config(train), model)


def has_lora(model: torch.nn.Module) -> bool:
    """Whether peft injected adapters (it records their config on the model)."""
    return bool(getattr(model, "peft_config", None))


def save_adapter(model: torch.nn.Module, folder: Path, base: dict | None = None) -> Path:
    """The adapter alone, in peft's file layout (weights + config; target names are lmops' modules)."""
    from peft import get_peft_model_state_dict  # lazy: peft imports transformers (seconds)

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()},
              str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config.update(base_model_name_or_path=(base or {}).get("spec"), lmops_base_hash=(base or {}).get("hash"))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))
    return folder


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight (peft's ``merge``) and put the plain Linear back, in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft imports transformers (seconds)

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module.get_base_layer())
    model.__dict__.pop("peft_config", None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
