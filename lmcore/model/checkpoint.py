"""Model checkpoints on disk: weights in safetensors, args in JSON, never pickle for weights.

A model folder holds ``model.safetensors``, ``config.json`` (``{"model": ModelConfig, ...}``
plus free metadata such as the dataset version) and ``tokenizer.json``. A training
checkpoint adds ``trainer_state.pt`` (optimizer, step, RNG) next to them. Writes go to a
temporary sibling folder that is renamed into place, so a crash never leaves half a
checkpoint behind.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmcore.data.tokenizer import Tokenizer
from lmcore.errors import LmopsError
from lmcore.model.int8 import load_quantized
from lmcore.model.transformer import ModelConfig, Transformer, rope_cache
from lmcore.model.weights import HEAD, tie_head, unwrap

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights without the tied duplicate (safetensors refuses shared storage)."""
    model = unwrap(model)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop(HEAD, None)
    return sd


def atomic_dir(target: Path) -> Path:
    """A fresh temporary sibling of ``target``; pass it to :func:`commit_dir` when complete."""
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, target: Path) -> Path:
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def write_model_files(folder: Path, model: torch.nn.Module, tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    """Write weights, config and tokenizer into an existing folder (no atomicity here)."""
    cfg: ModelConfig = unwrap(model).cfg
    save_file(model_state(model), str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({"model": cfg.to_dict(), **meta}, indent=2, default=str))
    tokenizer.save(folder / TOKENIZER)


def save_model(folder: str | Path, model: torch.nn.Module, tokenizer: Tokenizer, meta: dict | None = None) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_dir(folder)
    try:
        write_model_files(tmp, model, tokenizer, meta or {})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_dir(tmp, folder)


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise LmopsError(f"not a model folder (no {CONFIG}): {folder}")
    try:
        meta = json.loads(path.read_text())
        ModelConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LmopsError(f"corrupt model config {path}: {e}") from None
    return meta


def model_from_weights(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str | Path) -> Transformer:
    """The model of ``cfg`` holding ``state``'s tensors (as fp32) without first building random ones.

    Why: ``Transformer(cfg)`` initialises every weight before ``load_state_dict`` overwrites it, so loading
    a 135M base held two copies of it at the peak (the server's 1.4 GB) and spent seconds drawing random
    numbers. Built on the meta device, the model takes the loaded tensors as they are.
    """
    state = {k: v.float() if v.is_floating_point() else v for k, v in tie_head(dict(state), cfg).items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise LmopsError(f"weights in {where} do not match its config: {str(e).splitlines()[0]}") from None
    if cfg.tie_embeddings:  # one parameter again, not two that share storage (training updates it once)
        model.lm_head.weight = model.embed.weight
    model.rope_cos, model.rope_sin = rope_cache(cfg, cfg.block_size)  # not in the file: computed
    return model


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer, dict]:
    """Model (eval mode), tokenizer and metadata from a model folder; one-line error if broken.

    A folder whose config says ``"quantization": "int8-dynamic"`` loads as an int8 model on CPU
    whatever ``device`` says (the dynamic int8 kernels are CPU kernels).
    """
    folder = Path(folder)
    meta = read_meta(folder)
    cfg = ModelConfig.from_dict(meta["model"])
    tokenizer = Tokenizer.load(folder / TOKENIZER)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LmopsError(f"tokenizer in {folder} has {tokenizer.vocab_size} tokens, model only {cfg.vocab_size}")
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as e:
        raise LmopsError(f"cannot read weights {folder / WEIGHTS}: {str(e).splitlines()[0]}") from None
    if meta.get("quantization"):  # int8 variant (lmops optimize quantize): CPU-only kernels
        if meta["quantization"] != "int8-dynamic":
            raise LmopsError(f"model in {folder} uses unknown quantization {meta['quantization']!r}")

        return load_quantized(cfg, state), tokenizer, meta
    return model_from_weights(cfg, state, folder).to(device).eval(), tokenizer, meta
