"""``--apply``: write a sweep's best params back into ``params.yaml``, keeping comments and order.

Why ruamel round-trip: ``params.yaml`` is hand-written and commented, and it is the one
source of truth that ``lmops run`` and ``dvc repro`` read; rewriting it with PyYAML would
drop every comment. The file is validated with the new values before it is replaced
atomically, so a bad value never lands on disk.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from lmcore.config import load_params
from lmcore.errors import LmopsError


def _tidy(value: Any) -> Any:
    """Floats to 6 significant digits (readable YAML); other types unchanged."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def yaml_float(value: float) -> str:
    """A float spelled so YAML 1.1 readers (PyYAML, which ``load_params`` uses) read a float back.

    ``1e-05`` is a *string* to PyYAML: it needs a dot in the mantissa (``1.0e-05``).
    """
    if value != value:  # NaN
        return ".nan"
    if value in (float("inf"), float("-inf")):
        return ".inf" if value > 0 else "-.inf"
    text = repr(float(value))
    mantissa, e, exp = text.partition("e")
    if e and "." not in mantissa:
        mantissa += ".0"
    return mantissa + (f"e{exp}" if e else "")


def _represent_float(representer, value: float):
    return representer.represent_scalar("tag:yaml.org,2002:float", yaml_float(value))


def apply_params(params_path: str | Path, values: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Set dotted ``values`` (``{"train.lr": 0.002}``) in the YAML file; returns (key, old, new) per change."""
    path = Path(params_path)
    if not path.is_file():
        raise LmopsError(f"params file not found: {path}")
    yaml = YAML()  # round-trip mode: comments, order and flow style survive
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)  # the house style: "  - item" under a key
    yaml.representer.add_representer(float, _represent_float)
    doc = yaml.load(path.read_text(encoding="utf-8"))
    if not isinstance(doc, Mapping):
        raise LmopsError(f"params file {path} is not a mapping")
    changes: list[tuple[str, Any, Any]] = []
    for key, raw in values.items():
        section, _, field = key.partition(".")
        if not field:
            raise LmopsError(f"cannot apply '{key}': expected section.key")
        if section not in doc or doc[section] is None:
            doc[section] = {}
        new = _tidy(raw)
        old = doc[section].get(field)
        if old != new:
            doc[section][field] = new
            changes.append((key, old, new))
    buf = io.StringIO()
    yaml.dump(doc, buf)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    try:
        load_params(tmp)  # strict check of the result before it replaces the original
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return changes
