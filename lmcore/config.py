"""Typed, frozen params loaded from ``params.yaml``: one dataclass per stage slice.

``params.yaml`` is the single source of truth (``dvc.yaml`` reads the same slices), defaults
included: the dataclasses below name and type the keys and check their ranges, and every field's
default is the value in the ``params.yaml`` lmops ships (``SHIPPED_PARAMS``, the repository's own
file; a key a workspace's file leaves out takes that value). Loading is strict: an unknown key, a
wrong type or an out-of-range value is an ``LmopsError`` that names the key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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
from lmcore.settings import get_settings

# The repository's params.yaml: ``lmcore/shipped_params.yaml`` is a link to it (package data in a wheel).
SHIPPED_PARAMS = Path(__file__).with_name("shipped_params.yaml")


def params_slice(section: str):
    """Class decorator: a frozen dataclass for ``section`` of params.yaml whose defaults are the shipped file's.

    The class only declares the keys, their types and a ``check()``; a field left out of a
    constructor call (``TrainParams(lr=1e-3)``) or of a workspace's params.yaml takes the value in
    ``SHIPPED_PARAMS``, read once, on first use.
    """

    def wrap(cls: type) -> type:
        for name in cls.__dict__.get("__annotations__", {}):
            default = functools.partial(_shipped_default, section, name)
            setattr(cls, name, field(default_factory=default))
        return dataclass(frozen=True)(cls)

    return wrap


def _shipped_default(section: str, name: str) -> Any:
    return copy.deepcopy(getattr(getattr(shipped_params(), section), name))  # a fresh copy of a mutable value


@params_slice("data")
class DataParams:
    sources: tuple[str, ...]
    allowed_sources: tuple[str, ...]
    min_chars: int
    max_chars: int
    max_failure_rate: float
    normalize_nfc: bool
    normalize_newlines: bool
    strip_trailing_whitespace: bool
    stdlib_max_records: int
    record_chars: int
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    chunk_rows: int
    git_commit: bool

    def check(self) -> None:
        _require(0 <= self.min_chars <= self.max_chars, "data.min_chars must be between 0 and data.max_chars")
        _require(0.0 <= self.max_failure_rate <= 1.0, "data.max_failure_rate must be within [0, 1]")
        _require(self.stdlib_max_records >= 0, "data.stdlib_max_records must be >= 0")
        _require(self.record_chars > 0, "data.record_chars must be > 0")
        _require(self.chunk_rows > 0, "data.chunk_rows must be > 0")


@params_slice("prepare")
class PrepareParams:
    val_fraction: float
    seed: int

    def check(self) -> None:
        _require(0.0 < self.val_fraction < 1.0, "prepare.val_fraction must be within (0, 1)")


@params_slice("tokenizer")
class TokenizerParams:
    kind: str
    vocab_size: int

    def check(self) -> None:
        _require(self.kind in ("bpe", "byte"), "tokenizer.kind must be 'bpe' or 'byte'")
        _require(self.kind == "byte" or 260 <= self.vocab_size <= 65536,
                 "tokenizer.vocab_size must be within [260, 65536]")


@params_slice("model")
class ModelParams:
    base: str
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    block_size: int
    ffn_hidden: int
    rope_theta: float
    norm_eps: float
    dropout: float
    tie_embeddings: bool
    rope_llama3: tuple[float, ...]

    def check(self) -> None:
        _require(len(self.rope_llama3) in (0, 4), "model.rope_llama3 must be [] or [factor, low_freq_factor, "
                 "high_freq_factor, original_context]")
        for name in ("n_layer", "n_head", "n_kv_head", "d_model", "block_size"):
            _require(getattr(self, name) > 0, f"model.{name} must be > 0")
        _require(self.d_model % self.n_head == 0, "model.d_model must be divisible by model.n_head")
        _require(self.n_head % self.n_kv_head == 0, "model.n_head must be divisible by model.n_kv_head")
        _require((self.d_model // self.n_head) % 2 == 0, "model head size (d_model/n_head) must be even")
        _require(self.ffn_hidden >= 0, "model.ffn_hidden must be >= 0")
        _require(0.0 <= self.dropout < 1.0, "model.dropout must be within [0, 1)")


@params_slice("train")
class TrainParams:
    device: str
    seed: int
    batch_size: int
    grad_accum: int
    optimizer: str
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    max_steps: int
    max_minutes: float
    eval_interval: int
    eval_iters: int
    checkpoint_interval: int
    compile: bool
    dtype: str
    log_interval: int
    lr_schedule: str
    cooldown_frac: float
    muon_lr: float
    muon_momentum: float
    zero_init_residual: bool
    threads: int
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: tuple[str, ...]
    micro_batch: int  # rows per forward/backward (0 = auto: the batch, or fewer where activations would be large)
    finetune_epochs: float  # with model.base: passes over the fine-tuning tokens (max_steps stays an upper bound)
    finetune_max_minutes: float  # with model.base: the wall-clock bound instead of max_minutes (0 = none)

    def check(self) -> None:
        _require(self.threads >= 0, "train.threads must be >= 0 (0 = auto)")
        _require(self.micro_batch >= 0, "train.micro_batch must be >= 0 (0 = auto)")
        _require(self.finetune_epochs >= 0 and self.finetune_max_minutes >= 0,
                 "train.finetune_epochs and train.finetune_max_minutes must be >= 0 (0 = no such bound)")
        _check_lora(self, "train")
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


def _check_lora(p: Any, section: str) -> None:
    """The ``lora_*`` keys the train and dpo slices share (``lmcore.training.lora`` reads them)."""
    _require(p.lora_r >= 0 and p.lora_alpha > 0 and 0 <= p.lora_dropout < 1,
             f"{section}.lora_r must be >= 0, {section}.lora_alpha > 0 and {section}.lora_dropout within [0, 1)")
    _require(p.lora_r == 0 or bool(p.lora_targets), f"{section}.lora_targets must name modules when lora_r > 0")


@params_slice("dpo")
class DpoParams:
    beta: float
    lr: float
    warmup_steps: int
    max_steps: int
    batch_size: int
    max_len: int
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: tuple[str, ...]

    def check(self) -> None:
        _require(self.beta > 0 and self.lr > 0, "dpo.beta and dpo.lr must be > 0")
        _require(self.max_steps > 0 and self.batch_size > 0 and self.max_len > 1 and self.warmup_steps >= 0,
                 "dpo.max_steps, dpo.batch_size must be > 0, dpo.max_len > 1, dpo.warmup_steps >= 0")
        _check_lora(self, "dpo")


@params_slice("eval")
class EvalParams:
    batch_size: int
    max_batches: int
    max_tokens: int  # validation tokens scored at most (0 = max_batches alone bounds it)
    block_size: int  # tokens per scored window (0 = the window the model was trained in)
    n_samples: int
    sample_max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    prompts: tuple[str, ...]

    def check(self) -> None:
        _require(self.temperature >= 0, "eval.temperature must be >= 0")
        _require(self.max_tokens >= 0 and self.block_size >= 0, "eval.max_tokens and eval.block_size must be >= 0")
        _require(0 < self.top_p <= 1, "eval.top_p must be within (0, 1]")


@params_slice("registry")
class RegistryParams:
    model_name: str
    experiment: str
    adapter_only: bool  # a LoRA run from model.base registers its adapter alone (merged on its base when fetched)


@params_slice("gate")
class GateParams:
    min_improvement: float
    golden: tuple[dict[str, str], ...]
    golden_tolerance: float
    min_preference_gain: float
    min_heldout_pairs: int
    check_hf_export: bool

    def check(self) -> None:
        _require(all(isinstance(g.get("prompt"), str) and isinstance(g.get("completion"), str) and g["completion"]
                     for g in self.golden), "gate.golden entries need a prompt and a non-empty completion (strings)")
        _require(self.golden_tolerance >= 0, "gate.golden_tolerance must be >= 0")
        _require(-1.0 <= self.min_preference_gain <= 1.0, "gate.min_preference_gain must be within [-1, 1]")
        _require(self.min_heldout_pairs >= 1, "gate.min_heldout_pairs must be >= 1")


@params_slice("serve")
class ServeParams:
    host: str
    port: int
    max_prompt_chars: int
    max_new_tokens: int
    request_timeout_s: float
    max_concurrent: int
    batch_window_ms: float
    poll_interval_s: float
    max_batch: int
    alias: str
    max_body_bytes: int
    body_timeout_s: float
    header_timeout_s: float
    send_timeout_s: float
    keep_alive_s: float
    compile_decode: bool

    def check(self) -> None:
        _require(0 < self.port < 65536, "serve.port must be within [1, 65535]")
        for name in ("max_prompt_chars", "max_new_tokens", "max_concurrent", "max_batch", "max_body_bytes"):
            _require(getattr(self, name) > 0, f"serve.{name} must be > 0")
        for name in ("request_timeout_s", "body_timeout_s", "header_timeout_s", "send_timeout_s", "keep_alive_s"):
            _require(getattr(self, name) > 0, f"serve.{name} must be > 0")
        _require(self.batch_window_ms >= 0, "serve.batch_window_ms must be >= 0 (0 = no waiting)")
        _require(self.poll_interval_s >= 0, "serve.poll_interval_s must be >= 0 (0 = no polling)")


@params_slice("feedback")
class FeedbackParams:
    min_new_records: int
    holdout_fraction: float
    max_correction_chars: int
    max_comment_chars: int

    def check(self) -> None:
        _require(self.min_new_records >= 0, "feedback.min_new_records must be >= 0")
        _require(0.0 <= self.holdout_fraction < 1.0, "feedback.holdout_fraction must be within [0, 1)")
        _require(self.max_correction_chars > 0 and self.max_comment_chars > 0,
                 "feedback.max_correction_chars and feedback.max_comment_chars must be > 0")


@params_slice("schedule")
class ScheduleParams:
    timezone: str
    training_cron: str
    harvest_cron: str
    monitor_cron: str


@params_slice("monitor")
class MonitorParams:
    window_hours: float  # prompts, ratings and latencies of the last N hours
    max_prompts: int  # the most recent prompts tested for drift
    min_prompts: int  # fewer: drift is not tested
    alpha: float  # p-value at or below which drift is flagged: the false-alarm rate
    permutations: int
    ngram: int
    max_features: int  # most frequent n-grams compared (the rest pooled)
    reference_ratio: int  # reference windows per prompt
    reference_records: int  # training records sampled for the reference windows
    max_thumbs_down_rate: float
    min_ratings: int  # the champion's ratings before its thumbs-down rate can trigger
    trigger: bool  # a crossed threshold runs harvest, then training
    seed: int

    def check(self) -> None:
        _require(self.window_hours > 0, "monitor.window_hours must be > 0")
        _require(0 < self.min_prompts <= self.max_prompts, "monitor.min_prompts must be within [1, max_prompts]")
        _require(0.0 < self.alpha < 1.0, "monitor.alpha must be within (0, 1)")
        _require(self.permutations >= 1 / self.alpha - 1,
                 "monitor.permutations must be >= 1/alpha - 1 (else no p-value can reach alpha)")
        _require(self.ngram > 0 and self.max_features > 0, "monitor.ngram and monitor.max_features must be > 0")
        _require(self.reference_ratio > 0 and self.reference_records > 0,
                 "monitor.reference_ratio and monitor.reference_records must be > 0")
        _require(0.0 <= self.max_thumbs_down_rate <= 1.0, "monitor.max_thumbs_down_rate must be within [0, 1]")
        _require(self.min_ratings > 0, "monitor.min_ratings must be > 0")


@params_slice("optimize")
class OptimizeParams:
    trials: int
    minutes: float
    trial_max_steps: int
    trial_eval_interval: int  # 0 = trial_max_steps // 10: how often the pruner sees val_loss
    startup_trials: int  # trials the pruner lets complete before it prunes
    prune_percentile: float  # prune a trial outside the best this-% of completed trials at a step (50 = median)
    seed: int  # TPE sampler seed (offset by the trials a resumed study already holds)
    storage: str  # Optuna RDB URL; "" = sqlite:///<lmops home>/optuna.db
    search_space: dict[str, Any]

    def check(self) -> None:
        _require(self.trials > 0, "optimize.trials must be > 0")
        _require(self.minutes >= 0, "optimize.minutes must be >= 0 (0 = no limit)")
        _require(self.trial_max_steps > 0, "optimize.trial_max_steps must be > 0")
        _require(self.trial_eval_interval >= 0, "optimize.trial_eval_interval must be >= 0")
        _require(self.startup_trials >= 0, "optimize.startup_trials must be >= 0")
        _require(0 <= self.prune_percentile <= 100, "optimize.prune_percentile must be in [0, 100]")


@params_slice("stack")
class StackParams:
    workers: int  # process workers `lmops stack up` starts on the work pool
    heartbeat_s: int  # flow-run heartbeat period (Prefect's minimum is 30 s)
    crash_after_s: int  # a running flow run silent this long is marked Crashed (its worker died)
    nproc_per_node: int  # torchrun processes of the ddp-train deployment

    def check(self) -> None:
        _require(self.workers >= 1, "stack.workers must be >= 1")
        _require(self.heartbeat_s >= 30, "stack.heartbeat_s must be >= 30 (Prefect's minimum)")
        _require(self.crash_after_s > self.heartbeat_s, "stack.crash_after_s must be > stack.heartbeat_s")
        _require(self.nproc_per_node >= 1, "stack.nproc_per_node must be >= 1")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    tokenizer: TokenizerParams = field(default_factory=TokenizerParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    dpo: DpoParams = field(default_factory=DpoParams)
    eval: EvalParams = field(default_factory=EvalParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    gate: GateParams = field(default_factory=GateParams)
    serve: ServeParams = field(default_factory=ServeParams)
    feedback: FeedbackParams = field(default_factory=FeedbackParams)
    schedule: ScheduleParams = field(default_factory=ScheduleParams)
    monitor: MonitorParams = field(default_factory=MonitorParams)
    optimize: OptimizeParams = field(default_factory=OptimizeParams)
    stack: StackParams = field(default_factory=StackParams)

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


def _coerce(value: Any, tp: Any, where: str, complete: bool = False) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where, complete)
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
        return from_dict(tp, value, where, complete)
    return value


def from_dict(cls: type, raw: Any, where: str = "", complete: bool = False) -> Any:
    """Build a frozen dataclass from a mapping, refusing unknown keys and wrong types.

    ``complete``: every key must be given (the shipped file, which the defaults come from).
    """
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
    missing = sorted(names - set(raw)) if complete else []
    if missing:
        key = f"{where}.{missing[0]}" if where else missing[0]
        raise LmopsError(f"params key '{key}' is missing: the shipped params.yaml must give every key")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k, complete) for k, v in raw.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    d = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LmopsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LmopsError(f"params file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise LmopsError(f"params file {path} must be a mapping of sections")
    return raw


@functools.cache
def shipped_params() -> Params:
    """The params.yaml lmops ships (every key given): where every default comes from."""
    try:
        return from_dict(Params, _read_yaml(SHIPPED_PARAMS), complete=True)
    except LmopsError as e:
        raise LmopsError(f"{e} (in the shipped defaults, {SHIPPED_PARAMS.resolve()})") from None


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Read ``params.yaml`` (default: the workspace's) with optional ``{"train.lr": 1e-3}`` overrides.

    The one loader of params files: the CLI, the flows, the DVC stages and the benchmarks use it.
    Keys the file leaves out take the shipped params.yaml's values.
    """
    if path is None:
        path = get_settings().params_path
    raw = _read_yaml(Path(path))
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise LmopsError(f"override '{dotted}' must look like section.key=value")
        current = raw.get(section) or {}
        if not isinstance(current, dict):
            raise LmopsError(f"invalid params: {section} must be a mapping")
        raw[section] = {**current, key: value}
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
