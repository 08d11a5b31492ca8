"""The sweep's search space: parsed and checked from ``params.yaml`` before any trial runs.

Why a module of its own: validation (unknown parameter, empty range, wrong type) must fail
fast with one line, and both the sweep and ``--apply`` need the same key mapping. Each key
of ``optimize.search_space`` names a ``model.*`` or ``train.*`` param, bare (``lr``) or
dotted (``train.lr``); its value is ``{low, high, log?, step?}`` for numbers or
``{choices: [...]}``. Optuna params are named by the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmcore.config import ModelParams, TrainParams
from lmcore.config import _coerce as coerce
from lmcore.errors import LmopsError

NOT_SEARCHABLE = {"train.device", "train.dtype", "train.compile", "train.max_steps", "train.max_minutes",
                  "train.eval_interval", "train.eval_iters", "train.checkpoint_interval", "train.log_interval"}


@dataclass(frozen=True)
class Dim:
    """One searched parameter: ``key`` is dotted (``train.lr``); ``kind`` is int, float or choice."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)


def _field_types() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, cls in (("model", ModelParams), ("train", TrainParams)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = hints[f.name]
    return out


def resolve_key(name: str) -> str:
    """``lr`` -> ``train.lr``; ``model.d_model`` stays; anything else is a one-line error."""
    types = _field_types()
    if "." in name:
        if name in types:
            return name
    else:
        hits = [k for k in types if k.split(".", 1)[1] == name]
        if len(hits) == 1:
            return hits[0]
    known = ", ".join(sorted(k.split(".", 1)[1] for k in types if k not in NOT_SEARCHABLE))
    raise LmopsError(f"optimize.search_space: unknown parameter '{name}' (searchable model/train params: {known})")


def _num(value: Any, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LmopsError(f"optimize.search_space.{where} must be a finite number (got {value!r})")
    return value


def parse_space(space: Mapping[str, Any]) -> list[Dim]:
    """Validate ``optimize.search_space`` into dims; any problem is a one-line ``LmopsError``."""
    if not isinstance(space, Mapping) or not space:
        raise LmopsError("optimize.search_space is empty: declare at least one parameter to search")
    types = _field_types()
    dims: list[Dim] = []
    seen: dict[str, str] = {}
    for name, spec in space.items():
        key = resolve_key(str(name))
        if key in NOT_SEARCHABLE:
            raise LmopsError(f"optimize.search_space: '{name}' is set per trial by lmops and cannot be searched")
        if key in seen:
            raise LmopsError(f"optimize.search_space: '{name}' and '{seen[key]}' name the same parameter {key}")
        seen[key] = str(name)
        tp = types[key]
        if not isinstance(spec, Mapping):
            raise LmopsError(f"optimize.search_space.{name} must be {{low, high}} or {{choices: [...]}}")
        extra = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
        if extra:
            raise LmopsError(f"optimize.search_space.{name}: unknown key '{extra[0]}' (use low, high, log, step "
                             f"or choices)")
        if "choices" in spec:
            if set(spec) - {"choices"}:
                raise LmopsError(f"optimize.search_space.{name}: give either choices or low/high, not both")
            choices = spec["choices"]
            if not isinstance(choices, list | tuple) or not choices:
                raise LmopsError(f"optimize.search_space.{name}: choices must be a non-empty list")
            coerced = tuple(_coerce(c, tp, f"{name}.choices") for c in choices)
            if len(set(coerced)) != len(coerced):
                raise LmopsError(f"optimize.search_space.{name}: choices repeat a value")
            dims.append(Dim(key=key, kind="choice", choices=coerced))
            continue
        if "low" not in spec or "high" not in spec:
            raise LmopsError(f"optimize.search_space.{name} needs both low and high (or choices)")
        if tp not in (int, float):
            raise LmopsError(f"optimize.search_space.{name}: {key} is not numeric; use choices")
        low, high = _num(spec["low"], f"{name}.low"), _num(spec["high"], f"{name}.high")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise LmopsError(f"optimize.search_space.{name}.log must be true or false")
        step = spec.get("step")
        if step is not None and (_num(step, f"{name}.step") <= 0):
            raise LmopsError(f"optimize.search_space.{name}.step must be > 0")
        if not low < high:
            raise LmopsError(f"optimize.search_space.{name}: empty range (low {low} must be < high {high})")
        if log and low <= 0:
            raise LmopsError(f"optimize.search_space.{name}: a log range needs low > 0 (got {low})")
        if log and step is not None:
            raise LmopsError(f"optimize.search_space.{name}: log and step cannot be combined")
        if tp is int:
            if any(isinstance(v, float) and not float(v).is_integer() for v in (low, high, step or 1)):
                raise LmopsError(f"optimize.search_space.{name}: {key} is an integer param; low/high/step "
                                 f"must be integers")
            dims.append(Dim(key=key, kind="int", low=int(low), high=int(high), log=log,
                            step=int(step) if step is not None else None))
        else:
            dims.append(Dim(key=key, kind="float", low=float(low), high=float(high), log=log,
                            step=float(step) if step is not None else None))
    return dims


def _coerce(value: Any, tp: Any, where: str) -> Any:
    try:
        return coerce(value, tp, f"optimize.search_space.{where}")
    except LmopsError as e:
        raise LmopsError(str(e).removeprefix("invalid params: ")) from None


def derive(base: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """Searched values plus the ones they imply: ``train.min_lr`` keeps its ratio to a searched ``lr``."""
    out = dict(values)
    if "train.lr" in out and "train.min_lr" not in out and base.train.lr > 0:
        out["train.min_lr"] = float(out["train.lr"]) * base.train.min_lr / base.train.lr
    return out


def with_overrides(base: Any, values: Mapping[str, Any]) -> Any:
    """A copy of ``Params`` with dotted ``values`` set (re-checked; LmopsError if invalid)."""
    by_section: dict[str, dict[str, Any]] = {}
    for key, v in values.items():
        section, _, field = key.partition(".")
        by_section.setdefault(section, {})[field] = v
    changes = {}
    for section, fields in by_section.items():
        obj = dataclasses.replace(getattr(base, section), **fields)
        obj.check()
        changes[section] = obj
    return dataclasses.replace(base, **changes)


def check_against(base: Any, dims: list[Dim]) -> None:
    """Each bound/choice on its own with the other params must be valid (e.g. d_model % n_head)."""
    for d in dims:
        values = list(d.choices) if d.kind == "choice" else [d.low, d.high]
        for v in values:
            try:
                with_overrides(base, derive(base, {d.key: v}))
            except LmopsError as e:
                raise LmopsError(f"optimize.search_space: {d.key}={v} is invalid with the other params: "
                                 f"{str(e).removeprefix('invalid params: ')}") from None
