"""GGUF export: an lmops model as the file llama.cpp, Ollama and LM Studio load (F32, F16 or Q8_0).

Why write GGUF ourselves rather than run llama.cpp's ``convert_hf_to_gguf.py`` on the HF export: that
script lives in llama.cpp's source tree, not in a package, and needs its whole ``conversion`` folder.
The ``gguf`` package (already here for reading GGUF bases, :mod:`lmcore.model.gguf`) has the writer
and the Q8_0 quantiser; this module only states llama.cpp's ``llama`` conventions, which follow
``convert_hf_to_gguf.py`` (``LlamaModel``):

* tensor names ``token_embd``, ``blk.N.attn_q|k|v|output``, ``ffn_gate|up|down``, ``attn_norm``,
  ``ffn_norm``, ``output_norm``, ``output`` (absent when the embeddings are tied);
* Q and K rows permuted from Hugging Face's rotate-half RoPE layout (which lmops uses) to llama.cpp's
  interleaved pairs (``LlamaModel.permute``); Llama 3 RoPE scaling as a ``rope_freqs`` tensor;
* norms and other 1-D tensors stay F32 whatever the file type; a Q8_0 matrix whose rows are not a
  multiple of 32 falls back to F16, as the converter does;
* the tokenizer as ``gpt2`` byte-level BPE (tokens, token types, merges, special ids, chat template).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcore.data.tokenizer import Tokenizer
from lmcore.errors import LmopsError
from lmcore.model.checkpoint import atomic_dir, commit_dir, load_model
from lmcore.model.hf import to_hf_state_dict
from lmcore.model.transformer import ModelConfig, Transformer

GGUF_TYPES = ("f32", "f16", "q8_0")
ARCH = "llama"
_NAMES = {  # Hugging Face LlamaForCausalLM suffix -> llama.cpp tensor name (per block unless top level)
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
# how Llama 3's split regex (llama.cpp's "llama-bpe" pre type) begins
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"


def gguf_file_name(gguf_type: str) -> str:
    """The file an export folder holds, named by its type like llama.cpp's converter (``model-Q8_0.gguf``)."""
    return f"model-{gguf_type.upper()}.gguf"


def check_type(gguf_type: str) -> str:
    """The lower-case type, or a one-line error naming the supported ones."""
    t = str(gguf_type).lower()
    if t not in GGUF_TYPES:
        raise LmopsError(f"unknown GGUF type '{gguf_type}' (supported: {', '.join(GGUF_TYPES)})")
    return t


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a Q or K projection from rotate-half RoPE order to llama.cpp's pairwise order (its ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names -> fp32 weights in its layout (Q/K permuted; ``rope_freqs`` for Llama 3 RoPE)."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    for name, w in to_hf_state_dict(model).items():
        if name in _TOP:
            out[_TOP[name]] = w.float()
            continue
        _, _, layer, rest = name.split(".", 3)
        if rest == "self_attn.q_proj.weight":
            w = permute_rope(w, cfg.n_head)
        elif rest == "self_attn.k_proj.weight":
            w = permute_rope(w, cfg.n_kv_head)
        out[f"blk.{layer}.{_NAMES[rest]}"] = w.float()
    if cfg.rope_llama3:
        out["rope_freqs.weight"] = _llama3_rope_factors(cfg)
    return out


def _llama3_rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """Per-frequency divisors of Llama 3 RoPE scaling, as ``LlamaModel.generate_extra_tensors`` writes them."""
    factor, low, high, original = cfg.rope_llama3
    d = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    low_wavelen, high_wavelen = original / low, original / high
    factors = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _pre_tokenizer(spec: dict[str, Any] | None) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the way this tokenizer splits text before BPE.

    Read from the tokenizer's own structure, since an lmops-trained vocabulary has no entry in
    llama.cpp's table of known tokenizer hashes. A base read from GGUF by transformers splits as GPT-2
    does (plain ByteLevel), so that is what lmops tokenizes with and what is exported."""
    if not spec:
        return "default"
    if spec.get("type") == "ByteLevel":
        return "gpt-2" if spec.get("use_regex", True) else "default"
    if spec.get("type") == "Sequence":
        parts = spec.get("pretokenizers") or []
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex"):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and str((parts[0].get("pattern") or {}).get("Regex", "")).startswith(
                _LLAMA3_SPLIT):
            return "llama-bpe"
    return "default"


def tokenizer_fields(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """Tokens, token types, merges, pre-tokenizer and special ids in llama.cpp's ``gpt2`` vocabulary format.

    Ids past the tokenizer (a model may pad its vocabulary) become ``[PADn]`` tokens of type UNUSED;
    added tokens are CONTROL when special (or spelled ``<|...|>``), else USER_DEFINED, as in llama.cpp's
    converter."""
    from gguf import TokenType  # lazy: only GGUF export needs it

    spec = json.loads(tokenizer.to_str())
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE":
        raise LmopsError(f"GGUF export needs a byte-level BPE tokenizer; this one is {bpe.get('type')!r}")
    by_id = {i: t for t, i in bpe["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= vocab_size:
        raise LmopsError(f"tokenizer has id {max(by_id)}, the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            text = added[i]["content"]
            special = added[i].get("special") or (text.startswith("<|") and text.endswith("|>"))
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges") or []]
    bos = tokenizer._tok.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None
    return {"tokens": tokens, "types": types, "merges": merges, "pre": _pre_tokenizer(spec.get("pre_tokenizer")),
            "bos": tokenizer.eos_id if bos is None else bos, "eos": tokenizer.eos_id,
            "chat_template": tokenizer.chat_template}


def _encode(name: str, w: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, Any]:
    """A tensor's bytes and ggml type under the file's type (1-D tensors and norms stay F32)."""
    from gguf import GGMLQuantizationType, QuantError, quants  # lazy: only GGUF export needs it

    data = w.detach().cpu().float().contiguous().numpy()
    if data.ndim <= 1 or name.endswith("_norm.weight") or gguf_type == "f32":
        return data, GGMLQuantizationType.F32
    if gguf_type == "q8_0":
        try:
            return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
        except QuantError:  # rows not a multiple of the 32-weight block: F16, as llama.cpp's converter does
            pass
    return data.astype(np.float16), GGMLQuantizationType.F16


def write_gguf(model: Transformer, tokenizer: Tokenizer, path: str | Path, gguf_type: str = "f32",
               name: str = "lmops") -> Path:
    """Write ``model`` and ``tokenizer`` as one GGUF file at ``path`` (an int8 lmops model is refused)."""
    try:
        import gguf  # lazy: only GGUF export needs it
    except ImportError:
        raise LmopsError("GGUF export needs the gguf package (pip install gguf)") from None
    gguf_type = check_type(gguf_type)
    if any(not p.is_floating_point() for p in model.state_dict().values()):
        raise LmopsError("GGUF export holds float weights; export the int8 model's fp32 source")
    cfg: ModelConfig = model.cfg
    tok = tokenizer_fields(tokenizer, cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    path = Path(path)
    w = gguf.GGUFWriter(str(path), ARCH)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.hidden)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_file_type(file_type)
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.head_dim)
        if gguf_type == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        w.add_bos_token_id(tok["bos"])
        w.add_eos_token_id(tok["eos"])
        w.add_pad_token_id(tok["eos"])
        w.add_add_bos_token(False)  # lmops never prepends a BOS token
        w.add_add_space_prefix(False)
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
        for tname, tensor in gguf_tensors(model).items():
            data, qtype = _encode(tname, tensor, gguf_type)
            w.add_tensor(tname, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return path


def export_gguf(model_dir: str | Path, out_dir: str | Path, gguf_type: str = "f32", force: bool = False,
                name: str = "lmops") -> Path:
    """An lmops model folder -> ``out_dir/model-<TYPE>.gguf``, written whole or not at all; returns the file."""
    gguf_type = check_type(gguf_type)
    out = Path(out_dir)
    if out.resolve() == Path(model_dir).resolve():
        raise LmopsError(f"export would overwrite its own source folder: {out}")
    if out.exists() and not out.is_dir():
        raise LmopsError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LmopsError(f"output folder is not empty: {out} (use --force to overwrite)")
    model, tokenizer, _ = load_model(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_dir(out)
    try:
        write_gguf(model, tokenizer, tmp / gguf_file_name(gguf_type), gguf_type, name=name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_dir(tmp, out) / gguf_file_name(gguf_type)
