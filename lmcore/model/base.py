"""A pretrained base to fine-tune: a Hugging Face ``LlamaForCausalLM`` folder, hub id or GGUF file as lmops' model.

Why: teams start from an open checkpoint (SmolLM2, TinyLlama, Llama-3.2) rather than from
scratch. ``model.base`` (params.yaml) or ``lmops run --base`` names one; it is read through the
HF mapping of :mod:`lmcore.model.hf` into lmops' own ``Transformer`` (so training, decoding,
int8, the server and export all stay one code path), its logits are checked against
``transformers``' own model of the same folder, and its own tokenizer and chat template are used.

A ``.gguf`` file (llama.cpp, Ollama) is dequantized once into an HF folder under the lmops home
(:mod:`lmcore.model.gguf`); its lineage hash is the GGUF file's.

A hub id is fetched through ``huggingface_hub``'s cache; lmops sets ``HF_HUB_OFFLINE=1``, so an id
resolves only once it is in that cache (``HF_HUB_OFFLINE=0 lmops run --base ORG/NAME`` fetches it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lmcore.data.tokenizer import Tokenizer
from lmcore.errors import LmopsError
from lmcore.machine import release_freed_memory
from lmcore.model.gguf import check_gguf, gguf_source_hash, hf_folder_from_gguf, is_gguf
from lmcore.model.hf import read_hf_folder
from lmcore.model.transformer import Transformer

SUPPORTED = ("LlamaForCausalLM",)
TAG_BASE, TAG_BASE_HASH = "lmops.base", "lmops.base_hash"
PARITY_ATOL = 1e-3  # fp32 logits of lmops' model vs transformers' on the same weights
PARITY_TEXT = "The quick brown fox jumps over the lazy dog."
_HASHED = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class BaseInfo:
    """Lineage of a base: what params named, where it was read from, a hash of its files."""

    spec: str
    dir: str
    hash: str
    architecture: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def resolve_base(spec: str) -> Path:
    """A local folder as is; a GGUF file as its converted folder; a hub id (``org/name``) through the
    huggingface_hub cache; else a one-line error."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if is_gguf(spec):
        return hf_folder_from_gguf(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise LmopsError(f"base model not found: {spec!r} (give a Hugging Face model folder, a .gguf file or a "
                         f"hub id like HuggingFaceTB/SmolLM2-135M)")
    try:
        from huggingface_hub import snapshot_download  # lazy: only hub ids need it

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as e:
        raise LmopsError(f"cannot get base {spec!r} from the Hugging Face hub ({str(e).splitlines()[0][:160]}); "
                         "this machine may be offline: fetch it once with HF_HUB_OFFLINE=0, or pass its folder") \
            from None


def check_architecture(folder: Path) -> str:
    """The architecture named in ``config.json``; an error naming what is supported for any other."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise LmopsError(f"not a Hugging Face model folder (no config.json): {folder}") from None
    except ValueError as e:
        raise LmopsError(f"corrupt Hugging Face config {folder / 'config.json'}: {e}") from None
    archs = config.get("architectures") or (["LlamaForCausalLM"] if config.get("model_type") == "llama" else [])
    arch = archs[0] if archs else f"model_type={config.get('model_type')!r}"
    if arch not in SUPPORTED:
        raise LmopsError(f"unsupported base architecture {arch} in {folder}: lmops fine-tunes "
                         f"{', '.join(SUPPORTED)} checkpoints")
    return arch


def base_hash(folder: Path) -> str:
    """sha256 over the config, tokenizer and weight files (names and bytes): the base's lineage id.

    A folder converted from a GGUF file is named by that file's hash (what the user has on disk).
    Remembered per process while the files keep their sizes and mtimes (a 1B base is gigabytes)."""
    if source := gguf_source_hash(folder):
        return source
    files = [f for f in [folder / n for n in _HASHED] + sorted(folder.glob("*.safetensors")) if f.is_file()]
    return _hash_files(tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.cache
def _hash_files(stamps: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for path, _, _ in stamps:
        h.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()[:16]


def base_lineage(spec: str) -> dict[str, str]:
    """MLflow tags naming the base a run fine-tuned: what params said and the hash of its files."""
    return {TAG_BASE: spec, TAG_BASE_HASH: base_hash(resolve_base(spec))}


def base_tokenizer(spec: str) -> Tokenizer:
    """The base's own tokenizer (``tokenizer.json`` + eos token + chat template)."""
    folder = resolve_base(spec)
    check_architecture(folder)
    return Tokenizer.load(folder / "tokenizer.json")


BYTES_PER_PARAM = {"lora": 4 + 4, "full": 4 + 4 + 8 + 4}  # fp32 weights (+ the parity check's reference copy);
# full: + gradients + AdamW's two moments
ACTIVATIONS_BYTES = 1 << 30  # a training step's activations at the default 16 x 128 batch, and the libraries


def base_parameters(spec: str) -> int:
    """How many numbers a base holds, from the GGUF header or the safetensors headers (no weights read)."""
    if is_gguf(spec):
        check_gguf(Path(spec).expanduser())
        from gguf import GGUFReader  # lazy: only GGUF bases need it

        return sum(int(t.n_elements) for t in GGUFReader(str(Path(spec).expanduser())).tensors)
    total = 0
    for f in sorted(resolve_base(spec).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118
    return total


def available_memory() -> int:
    """Bytes the kernel could give this process now (``MemAvailable``), or 0 when it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_fits_memory(spec: str, lora_r: int, available: int | None = None) -> None:
    """One line, before any long work, when fine-tuning ``spec`` would not fit this machine's memory."""
    available = available_memory() if available is None else available
    if not available:
        return
    kind = "lora" if lora_r else "full"
    n = base_parameters(spec)
    need = n * BYTES_PER_PARAM[kind] + ACTIVATIONS_BYTES
    if need > available:
        hint = "or a smaller base" if lora_r else "use LoRA (-S train.lora_r=16) or a smaller base"
        raise LmopsError(f"base {spec} ({n / 1e6:,.0f}M parameters) needs about {need / 2**30:.1f} GiB for "
                         f"{'LoRA' if lora_r else 'full'} fine-tuning in float32; this machine has "
                         f"{available / 2**30:.1f} GiB available: free memory, {hint}")


def reference_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """``transformers``' own logits for ``ids`` (at most 16) from ``folder``: what lmops' reading must match.

    Its model is gone (and its heap handed back) before lmops loads its own: two copies of a base at
    once were the peak memory of a fine-tune's start.
    """
    try:
        from transformers import AutoModelForCausalLM  # lazy: transformers imports in ~1 s
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise LmopsError("checking a base's logits needs transformers (pip install transformers)") from None
    hf_logging.disable_progress_bar()
    try:
        ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    except Exception as e:  # a corrupt or foreign file: transformers says why in its first line
        raise LmopsError(f"cannot read weights in {folder} with transformers: {str(e).splitlines()[0][:200]}") \
            from None
    with torch.no_grad():
        logits = ref(torch.tensor([ids[:16] or [0]])).logits.float()[0]
    del ref
    release_freed_memory()
    return logits


def check_parity(model: Transformer, folder: Path, ids: list[int], reference: torch.Tensor | None = None) -> float:
    """Largest logit difference between lmops' model and ``transformers``' reading of ``folder``
    (``reference``: :func:`reference_logits`, taken before when given).

    Raises when above :data:`PARITY_ATOL`: a mapping error would otherwise train silently.
    """
    ids = ids[: min(16, model.cfg.block_size)] or [0]
    theirs = reference_logits(folder, ids) if reference is None else reference[: len(ids)]
    with torch.no_grad():
        ours = model.float()(torch.tensor([ids]))[0][0]
    diff = float((ours - theirs).abs().max())
    if not diff <= PARITY_ATOL:
        raise LmopsError(f"base {folder}: lmops' logits differ from transformers' by {diff:.2e} "
                         f"(> {PARITY_ATOL:g}); this checkpoint uses a Llama variant lmops does not model")
    return diff


def load_base(spec: str, verify: bool = True) -> tuple[Transformer, Tokenizer, BaseInfo]:
    """lmops' model (fp32, eval mode) and tokenizer of a base, with its lineage; logits checked when ``verify``."""
    folder = resolve_base(spec)
    arch = check_architecture(folder)
    ids = Tokenizer.load(folder / "tokenizer.json").encode(PARITY_TEXT) if verify else []
    reference = reference_logits(folder, ids) if verify else None  # first: one copy of the base at a time
    model, tokenizer = read_hf_folder(folder)
    if verify:
        check_parity(model, folder, ids, reference)
    return model, tokenizer, BaseInfo(spec=spec, dir=str(folder.resolve()), hash=base_hash(folder),
                                      architecture=arch)
