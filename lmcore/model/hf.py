"""Hugging Face ``LlamaForCausalLM`` compatibility: weight mapping, export and import.

Why: an lmops model folder is useful beyond lmops only if standard tooling (``transformers``,
vLLM, TGI, llama.cpp converters) can read it. lmops' ``Transformer`` is Llama-shaped, so the
mapping is a rename plus splitting the fused ``qkv`` (as q, k, v) and ``gate_up`` (as gate,
up) projections. ``config.json`` is written as plain JSON in ``LlamaConfig`` format, so
export needs no ``transformers`` at runtime; only :func:`hf_config` imports it (lazily).
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
from lmcore.model.checkpoint import atomic_dir, commit_dir, load_model, model_from_weights, write_model_files
from lmcore.model.transformer import ModelConfig, Transformer
from lmcore.model.weights import tie_head, unwrap

HF_WEIGHTS, HF_INDEX = "model.safetensors", "model.safetensors.index.json"


def to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """lmops weights -> ``LlamaForCausalLM`` names (contiguous CPU tensors; no tied duplicate)."""
    model = unwrap(model)
    cfg = model.cfg
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, o = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[p + "attn.qkv.weight"].split((H * D, Hkv * D, Hkv * D), dim=0)
        gate, up = sd[p + "mlp.gate_up.weight"].chunk(2, dim=0)
        out.update({
            o + "self_attn.q_proj.weight": q,
            o + "self_attn.k_proj.weight": k,
            o + "self_attn.v_proj.weight": v,
            o + "self_attn.o_proj.weight": sd[p + "attn.proj.weight"],
            o + "mlp.gate_proj.weight": gate,
            o + "mlp.up_proj.weight": up,
            o + "mlp.down_proj.weight": sd[p + "mlp.down.weight"],
            o + "input_layernorm.weight": sd[p + "attn_norm.weight"],
            o + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
        })
    return {k: v.contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` weights -> a state dict that ``Transformer(cfg).load_state_dict`` accepts."""
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    try:
        embed = sd["model.embed_tokens.weight"]
        out = {"embed.weight": embed, "norm.weight": sd["model.norm.weight"]}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        tie_head(out, cfg)
        for i in range(cfg.n_layer):
            p, o = f"blocks.{i}.", f"model.layers.{i}."
            qkv = [sd[o + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")]
            out.update({
                p + "attn.qkv.weight": torch.cat(qkv, dim=0),
                p + "attn.proj.weight": sd[o + "self_attn.o_proj.weight"],
                p + "mlp.gate_up.weight": torch.cat([sd[o + "mlp.gate_proj.weight"], sd[o + "mlp.up_proj.weight"]]),
                p + "mlp.down.weight": sd[o + "mlp.down_proj.weight"],
                p + "attn_norm.weight": sd[o + "input_layernorm.weight"],
                p + "mlp_norm.weight": sd[o + "post_attention_layernorm.weight"],
            })
    except KeyError as e:
        raise LmopsError(f"Hugging Face weights lack tensor {e.args[0]}") from None
    return out


def hf_config_dict(cfg: ModelConfig, eos_id: int | None = None) -> dict[str, Any]:
    """``config.json`` contents in ``LlamaConfig`` format (both transformers 4.x and 5.x keys)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_scaling": _rope_scaling(cfg),
        "rope_parameters": {**(_rope_scaling(cfg) or {"rope_type": "default"}), "rope_theta": cfg.rope_theta},  # 5.x
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": "float32",
    }


def _rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    """``rope_scaling`` of a Llama 3 base (None for plain RoPE)."""
    if not cfg.rope_llama3:
        return None
    factor, low, high, original = cfg.rope_llama3
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": int(original)}


def hf_config(cfg: ModelConfig, eos_id: int | None = None):
    """A ``transformers.LlamaConfig`` equal to what :func:`export_hf` writes (imports transformers)."""
    try:
        from transformers import LlamaConfig  # lazy: transformers imports in ~1 s
    except ImportError:
        raise LmopsError("transformers is not installed (pip install 'lmops[dev]')") from None
    d = hf_config_dict(cfg, eos_id)
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k)
    if d["rope_scaling"] is None:
        d.pop("rope_scaling")
    try:
        return LlamaConfig(**d)
    except TypeError:  # transformers 4.x does not know rope_parameters
        d.pop("rope_parameters")
        return LlamaConfig(**d)


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """``LlamaConfig`` JSON -> ``ModelConfig``; refuses features lmops' model does not have."""
    if d.get("model_type") not in ("llama", None):
        raise LmopsError(f"not a Llama model: model_type={d.get('model_type')!r}")
    try:
        heads, width = int(d["num_attention_heads"]), int(d["hidden_size"])
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        llama3: tuple[float, ...] = ()
        if rope_type == "llama3":
            llama3 = tuple(float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings"))
        elif rope_type != "default":
            raise LmopsError(f"unsupported RoPE scaling {rope_type!r} (lmops models default and llama3 RoPE)")
        if d.get("attention_bias") or d.get("mlp_bias") or d.get("hidden_act", "silu") != "silu":
            raise LmopsError("unsupported Llama variant: biases or a non-silu activation")
        if d.get("head_dim") not in (None, width // heads):
            raise LmopsError(f"unsupported head_dim {d['head_dim']} != hidden_size / num_attention_heads")
        return ModelConfig(
            vocab_size=int(d["vocab_size"]),
            n_layer=int(d["num_hidden_layers"]),
            n_head=heads,
            n_kv_head=int(d.get("num_key_value_heads") or heads),
            d_model=width,
            block_size=int(d.get("max_position_embeddings", 2048)),
            ffn_hidden=int(d["intermediate_size"]),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope_llama3=llama3,
        )
    except KeyError as e:
        raise LmopsError(f"Hugging Face config lacks {e.args[0]!r}") from None


def _tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """tokenizer.json plus the two small files ``AutoTokenizer`` wants: its eos token and chat template."""
    special = {"bos_token": tokenizer.bos_token or tokenizer.eos_token, "eos_token": tokenizer.eos_token,
               "unk_token": tokenizer.eos_token}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        **special,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    return {
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False),
    }


def _prepare_out(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise LmopsError(f"output path exists and is not a folder: {out_dir}")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise LmopsError(f"output folder is not empty: {out_dir} (use --force to overwrite)")


def _write_atomic(out_dir: Path, write) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_dir(out_dir)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_dir(tmp, out_dir)


def export_hf(model_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """An lmops model folder -> a Hugging Face folder that ``from_pretrained`` loads."""
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(model_dir).resolve():
        raise LmopsError(f"export would overwrite its own source folder: {out_dir}")
    _prepare_out(out_dir, force)
    model, tokenizer, _ = load_model(model_dir)

    def write(tmp: Path) -> None:
        save_file(to_hf_state_dict(model), str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model.cfg, tokenizer.eos_id), indent=2))
        gen = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for name, text in _tokenizer_files(tokenizer).items():
            (tmp / name).write_text(text, encoding="utf-8")

    return _write_atomic(out_dir, write)


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    files = [hf_dir / HF_WEIGHTS]
    if (hf_dir / HF_INDEX).is_file():  # sharded checkpoint
        index = json.loads((hf_dir / HF_INDEX).read_text())
        files = [hf_dir / f for f in sorted(set(index["weight_map"].values()))]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise LmopsError(f"Hugging Face weights not found: {f} (only safetensors is read)")
        try:
            sd.update(load_file(str(f)))
        except Exception as e:
            raise LmopsError(f"cannot read weights {f}: {str(e).splitlines()[0]}") from None
    return sd


def read_hf_folder(hf_dir: str | Path) -> tuple[Transformer, Tokenizer]:
    """A Hugging Face Llama folder (config.json, safetensors, tokenizer.json) as lmops' model and tokenizer."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise LmopsError(f"not a Hugging Face model folder (no config.json): {hf_dir}")
    try:
        cfg = config_from_hf(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise LmopsError(f"corrupt Hugging Face config {cfg_path}: {e}") from None
    tokenizer = Tokenizer.load(hf_dir / "tokenizer.json")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise LmopsError(f"tokenizer in {hf_dir} has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")
    return model_from_weights(cfg, from_hf_state_dict(_read_hf_weights(hf_dir), cfg), hf_dir).eval(), tokenizer


def import_hf(hf_dir: str | Path, out_model_dir: str | Path, force: bool = False) -> Path:
    """A Hugging Face Llama folder (safetensors; its tokenizer's eos token) -> an lmops model folder."""
    hf_dir, out = Path(hf_dir), Path(out_model_dir)
    if out.resolve() == hf_dir.resolve():
        raise LmopsError(f"import would overwrite its own source folder: {out}")
    _prepare_out(out, force)
    model, tokenizer = read_hf_folder(hf_dir)
    meta = {"imported_from": str(hf_dir.resolve()), "format": "hf-llama"}
    return _write_atomic(out, lambda tmp: write_model_files(tmp, model, tokenizer, meta))
