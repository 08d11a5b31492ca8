"""Export a registered version (default: the champion) or a model folder to Hugging Face or GGUF format.

Why here and not only in ``lmcore.model.hf``: users think in registry versions, not folders. This
resolves ``--version``/``--model`` to a local model folder, refuses int8 variants (HF Llama
has no such weights; export their fp32 source), and delegates the format to
``lmcore.model.hf.export_hf`` (``hf``) or ``lmcore.model.gguf_writer.export_gguf`` (``gguf``: one
file for llama.cpp / Ollama, F32, F16 or Q8_0). :func:`verify_hf` replays a greedy continuation through
``transformers`` to prove the export loads and matches lmops token for token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmcore.errors import LmopsError
from lmcore.model.checkpoint import load_model, read_meta
from lmcore.model.generate import SamplingParams, generate_tokens
from lmcore.model.gguf_writer import check_type, export_gguf
from lmcore.model.hf import export_hf
from lmcore.registry.models import fetch_model_dir

FORMATS = ("hf", "gguf")


def resolve_source(name: str, version: str | None = None, model_dir: str | Path | None = None,
                   default_alias: str = "champion") -> tuple[Path, dict[str, Any]]:
    """A local model folder for ``--model DIR`` or a registry version/alias (default: the champion)."""
    if model_dir is not None and version is not None:
        raise LmopsError("give either --version or --model, not both")
    if model_dir is not None:
        folder = Path(model_dir)
        if not folder.is_dir():
            raise LmopsError(f"model folder not found: {folder}")
        read_meta(folder)
        return folder, {"name": None, "version": None, "aliases": [], "run_id": None}

    v = str(version) if version is not None else None
    if v is None:
        uri = f"models:/{name}@{default_alias}"
    elif v.isdigit():
        uri = f"models:/{name}/{v}"
    else:  # an alias such as "challenger"
        uri = f"models:/{name}@{v}"
    return fetch_model_dir(uri)


def export_model(out_dir: str | Path, *, fmt: str = "hf", name: str, version: str | None = None,
                 model_dir: str | Path | None = None, force: bool = False,
                 gguf_type: str | None = None) -> dict[str, Any]:
    """Export and return ``{"out_dir", "format", "version", "source"}`` (and ``"file"``, ``"gguf_type"`` for
    GGUF); nothing written on error."""
    if fmt not in FORMATS:
        raise LmopsError(f"unknown export format '{fmt}' (supported: {', '.join(FORMATS)})")
    if gguf_type is not None and fmt != "gguf":
        raise LmopsError("--gguf-type applies to --format gguf only")
    gguf_type = check_type(gguf_type or "f32") if fmt == "gguf" else None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LmopsError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not force:  # checked before any download
        raise LmopsError(f"output folder is not empty: {out} (use --force to overwrite)")
    src, info = resolve_source(name, version, model_dir)
    meta = read_meta(src)
    if meta.get("quantization"):
        origin = meta.get("quantized_from")
        hint = f" (export its source, version {origin})" if origin else ""
        raise LmopsError(f"model {info.get('version') or src} is {meta['quantization']} quantized; the "
                         f"{fmt.upper()} export holds float weights{hint}")
    result = {"out_dir": str(out), "format": fmt, "name": info.get("name"), "version": info.get("version"),
              "source": str(src)}
    if fmt == "gguf":
        label = f"{info['name']} v{info['version']}" if info.get("name") and info.get("version") else src.name
        file = export_gguf(src, out, gguf_type or "f32", force=force, name=label)
        return {**result, "file": str(file), "gguf_type": gguf_type}
    export_hf(src, out, force=force)
    return result


def verify_hf(hf_dir: str | Path, model_dir: str | Path, prompt: str = "\n", new_tokens: int = 16) -> dict[str, Any]:
    """Greedy continuation by ``transformers`` from ``hf_dir`` vs lmops from ``model_dir``: equal ids?"""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers imports in ~1 s
    except ImportError:
        raise LmopsError("verifying an HF export needs `transformers` (pip install transformers)") from None
    model, tok, _ = load_model(model_dir, "cpu")
    ids = tok.encode(prompt) or [tok.eos_id]
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    ours = [t for t, _ in generate_tokens(model, ids, sp, tok.eos_id)]
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    hf_ids = hf_tok(prompt, add_special_tokens=False)["input_ids"] or [tok.eos_id]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([hf_ids]), max_new_tokens=new_tokens, do_sample=False,
                                min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=tok.eos_id)
    theirs = out[0, len(hf_ids):].tolist()
    return {"match": ours == theirs and hf_ids == ids, "lmops": ours, "transformers": theirs,
            "lmops_text": tok.decode(ours), "transformers_text": hf_tok.decode(theirs, skip_special_tokens=True)}
