"""Typed, frozen params loaded from ``params.yaml``: one dataclass per stage slice.

``params.yaml`` is the single source of truth (``dvc.yaml`` reads the same slices). Loading
is strict: an unknown key, a wrong type or an out-of-range value is an ``LmopsError`` that
names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmcore.errors import LmopsError


@dataclass(frozen=True)
class DataParams:
    sources: tuple[str, ...] = ("python-stdlib",)
    allowed_sources: tuple[str, ...] = ("python-stdlib", "files", "jsonl", "csv", "parquet", "feedback")
    min_chars: int = 16
    max_chars: int = 100_000
    max_failure_rate: float = 0.5
    normalize_nfc: bool = True
    normalize_newlines: bool = True
    strip_trailing_whitespace: bool = True
    stdlib_max_records: int = 4000
    record_chars: int = 2000
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    chunk_rows: int = 250_000
    git_commit: bool = False

    def check(self) -> None:
        _require(0 <= self.min_chars <= self.max_chars, "data.min_chars must be between 0 and data.max_chars")
        _require(0.0 <= self.max_failure_rate <= 1.0, "data.max_failure_rate must be within [0, 1]")
        _require(self.stdlib_max_records >= 0, "data.stdlib_max_records must be >= 0")
        _require(self.record_chars > 0, "data.record_chars must be > 0")
        _require(self.chunk_rows > 0, "data.chunk_rows must be > 0")


@dataclass(frozen=True)
class PrepareParams:
    val_fraction: float = 0.05
    seed: int = 1337

    def check(self) -> None:
        _require(0.0 < self.val_fraction < 1.0, "prepare.val_fraction must be within (0, 1)")


@dataclass(frozen=True)
class TokenizerParams:
    kind: str = "bpe"
    vocab_size: int = 2048

    def check(self) -> None:
        _require(self.kind in ("bpe", "byte"), "tokenizer.kind must be 'bpe' or 'byte'")
        _require(self.kind == "byte" or 260 <= self.vocab_size <= 65536,
                 "tokenizer.vocab_size must be within [260, 65536]")


@dataclass(frozen=True)
class ModelParams:
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    d_model: int = 128
    block_size: int = 128
    ffn_hidden: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True

    def check(self) -> None:
        for name in ("n_layer", "n_head", "n_kv_head", "d_model", "block_size"):
            _require(getattr(self, name) > 0, f"model.{name} must be > 0")
        _require(self.d_model % self.n_head == 0, "model.d_model must be divisible by model.n_head")
        _require(self.n_head % self.n_kv_head == 0, "model.n_head must be divisible by model.n_kv_head")
        _require((self.d_model // self.n_head) % 2 == 0, "model head size (d_model/n_head) must be even")
        _require(self.ffn_hidden >= 0, "model.ffn_hidden must be >= 0")
        _require(0.0 <= self.dropout < 1.0, "model.dropout must be within [0, 1)")


@dataclass(frozen=True)
class TrainParams:
    device: str = "auto"
    seed: int = 1337
    batch_size: int = 16
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int = 600
    max_minutes: float = 2.0
    eval_interval: int = 100
    eval_iters: int = 10
    checkpoint_interval: int = 100
    compile: bool = False
    dtype: str = "auto"
    log_interval: int = 10
    lr_schedule: str = "cosine"
    cooldown_frac: float = 0.5
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    zero_init_residual: bool = False
    threads: int = 0

    def check(self) -> None:
        _require(self.threads >= 0, "train.threads must be >= 0 (0 = auto)")
        _require(self.lr > 0, f"train.lr must be > 0 (got {self.lr})")
        _require(0 <= self.min_lr <= self.lr, "train.min_lr must be within [0, train.lr]")
        _require(self.batch_size > 0 and self.grad_accum > 0, "train.batch_size and train.grad_accum must be > 0")
        _require(self.max_steps > 0, "train.max_steps must be > 0")
        _require(self.max_minutes >= 0, "train.max_minutes must be >= 0 (0 = no limit)")
        _require(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _require(self.weight_decay >= 0 and self.grad_clip >= 0, "train.weight_decay and grad_clip must be >= 0")
        _require(self.optimizer in ("auto", "adamw", "muon"), "train.optimizer must be auto, adamw or muon")
        _require(self.dtype in ("auto", "float32", "bfloat16"), "train.dtype must be auto, float32 or bfloat16")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 "train.device must be auto, cpu, cuda or cuda:N")
        _require(self.log_interval > 0, "train.log_interval must be > 0")
        _require(self.eval_interval >= 0 and self.checkpoint_interval >= 0,
                 "train.eval_interval and train.checkpoint_interval must be >= 0 (0 = only at the end)")
        _require(self.lr_schedule in ("cosine", "linear", "wsd", "constant"),
                 "train.lr_schedule must be cosine, linear, wsd or constant")
        _require(0.0 <= self.cooldown_frac <= 1.0, "train.cooldown_frac must be within [0, 1]")
        _require(self.muon_lr > 0 and 0 <= self.muon_momentum < 1,
                 "train.muon_lr must be > 0 and train.muon_momentum within [0, 1)")


@dataclass(frozen=True)
class EvalParams:
    batch_size: int = 16
    max_batches: int = 50
    n_samples: int = 3
    sample_max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    seed: int = 1234
    prompts: tuple[str, ...] = ("def main(", "import os\n", "class Config:\n")

    def check(self) -> None:
        _require(self.temperature >= 0, "eval.temperature must be >= 0")
        _require(0 < self.top_p <= 1, "eval.top_p must be within (0, 1]")


@dataclass(frozen=True)
class RegistryParams:
    model_name: str = "lmops-lm"
    experiment: str = "lmops"


@dataclass(frozen=True)
class GateParams:
    min_improvement: float = 0.0


@dataclass(frozen=True)
class ServeParams:
    host: str = "127.0.0.1"
    port: int = 8000
    max_prompt_chars: int = 4000
    max_new_tokens: int = 256
    request_timeout_s: float = 60.0
    max_concurrent: int = 16
    batch_window_ms: float = 5.0
    poll_interval_s: float = 30.0
    max_batch: int = 16
    alias: str = "champion"

    def check(self) -> None:
        _require(0 < self.port < 65536, "serve.port must be within [1, 65535]")
        for name in ("max_prompt_chars", "max_new_tokens", "max_concurrent", "max_batch"):
            _require(getattr(self, name) > 0, f"serve.{name} must be > 0")
        _require(self.request_timeout_s > 0, "serve.request_timeout_s must be > 0")
        _require(self.batch_window_ms >= 0, "serve.batch_window_ms must be >= 0 (0 = no waiting)")
        _require(self.poll_interval_s >= 0, "serve.poll_interval_s must be >= 0 (0 = no polling)")


@dataclass(frozen=True)
class FeedbackParams:
    min_new_records: int = 50
    holdout_fraction: float = 0.2
    max_correction_chars: int = 8000
    max_comment_chars: int = 2000

    def check(self) -> None:
        _require(self.min_new_records >= 0, "feedback.min_new_records must be >= 0")
        _require(0.0 <= self.holdout_fraction < 1.0, "feedback.holdout_fraction must be within [0, 1)")
        _require(self.max_correction_chars > 0 and self.max_comment_chars > 0,
                 "feedback.max_correction_chars and feedback.max_comment_chars must be > 0")


@dataclass(frozen=True)
class ScheduleParams:
    timezone: str = "UTC"
    training_cron: str = "0 2 * * *"
    harvest_cron: str = "0 * * * *"


@dataclass(frozen=True)
class OptimizeParams:
    trials: int = 20
    minutes: float = 0.0
    trial_max_steps: int = 150
    trial_eval_interval: int = 0  # 0 = trial_max_steps // 10: how often the pruner sees val_loss
    startup_trials: int = 3  # trials the pruner lets complete before it prunes
    prune_percentile: float = 25.0  # prune a trial outside the best this-% of completed trials at a step (50 = median)
    seed: int = 1337  # TPE sampler seed (offset by the trials a resumed study already holds)
    storage: str = ""  # Optuna RDB URL; "" = sqlite:///<lmops home>/optuna.db
    search_space: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        _require(self.trials > 0, "optimize.trials must be > 0")
        _require(self.minutes >= 0, "optimize.minutes must be >= 0 (0 = no limit)")
        _require(self.trial_max_steps > 0, "optimize.trial_max_steps must be > 0")
        _require(self.trial_eval_interval >= 0, "optimize.trial_eval_interval must be >= 0")
        _require(self.startup_trials >= 0, "optimize.startup_trials must be >= 0")
        _require(0 <= self.prune_percentile <= 100, "optimize.prune_percentile must be in [0, 100]")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    tokenizer: TokenizerParams = field(default_factory=TokenizerParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    gate: GateParams = field(default_factory=GateParams)
    serve: ServeParams = field(default_factory=ServeParams)
    feedback: FeedbackParams = field(default_factory=FeedbackParams)
    schedule: ScheduleParams = field(default_factory=ScheduleParams)
    optimize: OptimizeParams = field(default_factory=OptimizeParams)

    def slice_hash(self, *names: str) -> str:
        """Content hash of some slices: a cache key shared by Prefect tasks and lineage tags."""
        payload = {n: to_dict(getattr(self, n)) for n in names}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.003, ...}``: for MLflow params and `dvc exp` style overrides."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            for k, v in to_dict(getattr(self, f.name)).items():
                out[f"{f.name}.{k}"] = v
        return out


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise LmopsError(f"invalid params: {message}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise LmopsError(f"invalid params: {where} must be a list")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise LmopsError(f"invalid params: {where} must be a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise LmopsError(f"invalid params: {where} must be true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LmopsError(f"invalid params: {where} must be an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LmopsError(f"invalid params: {where} must be a number (got {value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise LmopsError(f"invalid params: {where} must be a string (got {value!r})")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    return value


def from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build a frozen dataclass from a mapping, refusing unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LmopsError(f"invalid params: {where or 'params'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise LmopsError(f"unknown params key '{key}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    d = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Read ``params.yaml`` (default: the workspace's) with optional ``{"train.lr": 1e-3}`` overrides."""
    if path is None:
        from lmcore.settings import get_settings

        path = get_settings().params_path
    path = Path(path)
    if not path.is_file():
        raise LmopsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LmopsError(f"params file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise LmopsError(f"override '{dotted}' must look like section.key=value")
        raw.setdefault(section, {})[key] = value
    return from_dict(Params, raw)


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``, values parsed as YAML scalars."""
    key, sep, value = text.partition("=")
    if not sep:
        raise LmopsError(f"override '{text}' must look like section.key=value")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str) and _FLOAT_RE.fullmatch(parsed.strip()):  # YAML 1.1 reads "1e-3" as a string
        parsed = float(parsed)
    return key.strip(), parsed
