"""LoRA on lmops' model through ``peft``: adapters in, merged weights out.

Why peft and no adapters of our own: peft's ``LoraConfig`` + ``inject_adapter_in_model`` wrap any
``nn.Linear`` by name, so lmops' plain ``Transformer`` gets the same LoRA layers (init, scaling,
dropout, merge) that ``transformers`` models get. Injected in place, the model stays a
``Transformer``: the training loop, checkpoints (adapter tensors beside frozen base tensors) and
resume need no special case. On save the adapters are merged into the base weights
(:func:`merge_lora`), so registry, serving, int8 and HF export see an ordinary model; the
adapter alone can be kept too (:func:`save_adapter`).

Adapter-only registration (``registry.adapter_only``): the registered folder holds the adapter, the
model config and the tokenizer, not the weights (megabytes for a gigabyte base). It names its base by
spec and file hash; :func:`merge_adapter_folder` rebuilds the merged model from that base when the
version is fetched, and refuses a base whose files changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmcore.data.tokenizer import Tokenizer
from lmcore.errors import LmopsError
from lmcore.model.base import load_base
from lmcore.model.checkpoint import CONFIG, TOKENIZER, WEIGHTS, read_meta, save_model

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


# lmops' fused projections and how many of a Llama's projections each one holds
FUSED_PARTS = {"qkv": 3, "gate_up": 2}


def lora_config(train) -> Any:
    """peft's ``LoraConfig`` from params.yaml's ``train.lora_*`` (``TrainParams``).

    Rank r means r per projection, as peft gives a Llama's separate ``q_proj``/``k_proj``/``v_proj``
    (and ``gate_proj``/``up_proj``): a fused layer gets rank parts x r and alpha parts x alpha (the same
    alpha / r scaling), which holds every update the separate adapters can make (a block-diagonal B).
    """
    from peft import LoraConfig  # lazy: peft imports transformers (seconds)

    fused = {t: n for t, n in FUSED_PARTS.items() if t in train.lora_targets}
    return LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=list(train.lora_targets), bias="none",
                      rank_pattern={t: n * train.lora_r for t, n in fused.items()},
                      alpha_pattern={t: n * train.lora_alpha for t, n in fused.items()})


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


def is_adapter_only(folder: Path) -> bool:
    """A registered folder with an adapter and no weights of its own (``registry.adapter_only``)."""
    return (folder / ADAPTER_WEIGHTS).is_file() and not (folder / WEIGHTS).is_file()


def stage_adapter_only(model_dir: Path, adapter_dir: Path, out: Path, extra: tuple[str, ...] = ()) -> Path:
    """``out`` holding what an adapter-only version keeps: config (with the base's lineage), tokenizer, adapter."""
    meta = read_meta(model_dir)
    if not (meta.get("base") or {}).get("hash"):
        raise LmopsError(f"{model_dir} has no base lineage: only a LoRA run from model.base registers adapter-only")
    out.mkdir(parents=True, exist_ok=True)
    for src in [model_dir / CONFIG, model_dir / TOKENIZER, *(model_dir / f for f in extra),
                adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_CONFIG]:
        if src.is_file():
            shutil.copy2(src, out / src.name)
    return out


def merge_adapter_folder(folder: Path, out: Path) -> Path:
    """A full model folder at ``out``: the base named in ``folder``'s config with its adapter merged in.

    The base must be the one trained on (same file hash): an adapter on other weights computes
    something else without any error to show for it."""
    meta = read_meta(folder)
    base = meta.get("base") or {}
    if not base.get("spec"):
        raise LmopsError(f"adapter-only model {folder} does not name its base")
    model, _, info = load_base(base["spec"], verify=False)
    if info.hash != base.get("hash"):
        raise LmopsError(f"adapter-only model {folder} was trained on base {base['spec']} with hash "
                         f"{base.get('hash')}, but that base now hashes to {info.hash}: fetch the original base files")
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict  # lazy: peft imports transformers

    lora = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0,
                      target_modules=list(cfg["target_modules"]), bias="none",
                      rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {})
    model = inject_adapter_in_model(lora, model)
    result = set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS)))
    if getattr(result, "unexpected_keys", None):
        raise LmopsError(f"adapter in {folder} does not fit base {base['spec']}: {result.unexpected_keys[:3]}")
    return save_model(out, merge_lora(model).eval(), Tokenizer.load(folder), {k: v for k, v in meta.items()
                                                                              if k != "model"})
