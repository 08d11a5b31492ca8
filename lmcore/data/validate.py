"""Great Expectations validation: suites from ``expectations/<name>.json``, per-row reasons, Data Docs.

The suite JSON is the single source of the rules. It is loaded at run time into a
``gx.ExpectationSuite``; GX silently drops an expectation it cannot parse, so lmops counts them
and a suite that fails to load or loses any is an ``LmopsError``. Values written
``{"$PARAMETER": "min_chars"}`` are filled from ``params.yaml`` ``data.*`` at validation time.

GX decides pass/fail: every chunk is validated by GX on a pandas datasource (a
``ValidationDefinition`` in a file context under ``<lmops home>/gx``, so results accumulate and
Data Docs are built there, offline HTML). GX's per-row output (``COMPLETE``) is slow on a million
rows, so the rows behind each *failed* expectation are found by a vectorised twin of that same
expectation type and kwargs, and the count is checked against GX's ``unexpected_count`` (a
mismatch is an error, never a silent pass). Expectation types without a twin fall back to GX
``COMPLETE`` results for that expectation alone. A failed table- or column-level expectation
(schema, dtype) fails every row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lmcore.errors import LmopsError
from lmcore.settings import get_settings

_LOCK = threading.Lock()
_GX: Any = None
_CONTEXTS: dict[str, Any] = {}


def suites_dir(workspace: Path | None = None) -> Path:
    """``expectations/`` of the workspace, else the one shipped next to the lmcore package."""
    if workspace is not None and (workspace / "expectations").is_dir():
        return workspace / "expectations"

    ws = get_settings().workspace / "expectations"
    return ws if ws.is_dir() else Path(__file__).resolve().parents[2] / "expectations"


def import_gx() -> Any:
    """Import GX once per process with analytics and progress bars off (it is slow and chatty)."""
    global _GX
    with _LOCK:
        if _GX is None:
            os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

            import great_expectations as gx  # lazy: GX imports in ~3.5 s
            from great_expectations.execution_engine import pandas_execution_engine

            # GX fingerprints every in-memory batch with a full hash_pandas_object (seconds per
            # million rows) only to store it as a batch marker; lmops names data by its DVC hash.
            pandas_execution_engine.HASH_THRESHOLD = 0
            logging.getLogger("great_expectations").setLevel(logging.ERROR)
            _GX = gx
    return _GX


def _context(home: Path) -> Any:
    key = str(home.resolve())
    if key not in _CONTEXTS:
        gx = import_gx()
        home.mkdir(parents=True, exist_ok=True)
        try:
            ctx = gx.get_context(mode="file", project_root_dir=str(home))
        except Exception as e:  # a broken gx/ folder: name it rather than fail deep in GX
            raise LmopsError(f"cannot open the GX context in {home / 'gx'}: {str(e).splitlines()[0]}") from None
        ctx.variables.progress_bars = {"globally": False, "metric_calculations": False, "profilers": False}
        with contextlib.suppress(Exception):  # saving the preference is best effort
            ctx.variables.save()
        _CONTEXTS[key] = ctx
    return _CONTEXTS[key]


@dataclass(frozen=True)
class Suite:
    """A loaded suite: the raw JSON (the rules) and the GX object built from it."""

    name: str
    path: Path
    spec: dict
    gx_suite: Any

    @property
    def expectations(self) -> list[dict]:
        return self.spec["expectations"]


def load_suite(name: str, workspace: Path | None = None) -> Suite:
    """Read ``expectations/<name>.json`` into a GX suite; refuse a broken or lossy load."""
    path = suites_dir(workspace) / f"{name}.json"
    if not path.is_file():
        raise LmopsError(f"expectation suite not found: {path}")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmopsError(f"expectation suite {path} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("expectations"), list) or not spec["expectations"]:
        raise LmopsError(f"expectation suite {path} has no 'expectations' list")
    gx = import_gx()
    try:
        suite = gx.ExpectationSuite(name=spec.get("name") or name, expectations=spec["expectations"],
                                    meta=spec.get("meta"))
    except Exception as e:
        raise LmopsError(f"expectation suite {path} does not load: {str(e).splitlines()[0]}") from None
    if len(suite.expectations) != len(spec["expectations"]):
        raise LmopsError(f"expectation suite {path}: {len(spec['expectations'])} expectations written but only "
                         f"{len(suite.expectations)} loaded (check their types and kwargs)")
    return Suite(name=suite.name, path=path, spec=spec, gx_suite=suite)


@dataclass
class Outcome:
    """Result of validating one chunk: GX's verdict and the reasons of every failing row."""

    success: bool
    reasons: Any  # pandas Series[str] aligned with the frame; "" = row passed
    failed: dict[str, int] = field(default_factory=dict)  # expectation label -> failing rows
    rows: int = 0

    @property
    def bad(self) -> Any:
        """Per row: it failed some expectation (a bool Series aligned with the frame)."""
        if not self.failed:  # nothing failed: no need to compare a million empty reasons
            return pd.Series(False, index=self.reasons.index)
        return self.reasons != ""


def _label(cfg: dict) -> str:
    kw = cfg.get("kwargs", {})
    col = kw.get("column")
    return f"{cfg['type']}({col})" if col else cfg["type"]


def _resolve(value: Any, params: dict) -> Any:
    if isinstance(value, dict) and "$PARAMETER" in value:
        key = value["$PARAMETER"]
        if key not in params:
            raise LmopsError(f"expectation parameter '{key}' has no value (known: {', '.join(sorted(params))})")
        return params[key]
    return value


def _twin_mask(cfg: dict, df: Any, params: dict) -> Any | None:
    """Rows an expectation marks unexpected, computed like GX's pandas map metric; None = no twin."""
    t = cfg["type"]
    kw = {k: _resolve(v, params) for k, v in cfg.get("kwargs", {}).items()}
    col = kw.get("column")
    if col is None or col not in df.columns or kw.get("row_condition") or kw.get("mostly") not in (None, 1, 1.0):
        return None
    s = df[col]
    present = s.notna()
    if t == "expect_column_values_to_not_be_null":
        return ~present
    if t == "expect_column_values_to_be_null":
        return present
    if t == "expect_column_values_to_be_in_set":
        return present & ~s.isin(list(kw["value_set"]))
    if t == "expect_column_values_to_not_be_in_set":
        return present & s.isin(list(kw["value_set"]))
    if t == "expect_column_value_lengths_to_be_between":
        n = s.str.len()
        lo, hi = kw.get("min_value"), kw.get("max_value")
        bad = present & False
        if lo is not None:
            bad |= present & ((n <= lo) if kw.get("strict_min") else (n < lo))
        if hi is not None:
            bad |= present & ((n >= hi) if kw.get("strict_max") else (n > hi))
        return bad
    if t in ("expect_column_values_to_match_regex", "expect_column_values_to_not_match_regex"):
        hit = s[present].astype(str).str.contains(kw["regex"], regex=True).reindex(s.index, fill_value=False)
        hit = hit.astype(bool)
        return present & (~hit if t == "expect_column_values_to_match_regex" else hit)
    if t == "expect_column_values_to_be_unique":
        return present & s.duplicated(keep=False)
    return None


class Validator:
    """Validates chunks against one suite in the GX context of an lmops home; builds Data Docs."""

    def __init__(self, suite: str, params: dict, home: Path, workspace: Path | None = None) -> None:
        self.suite = load_suite(suite, workspace)
        self.params = params
        self.home = home
        gx = import_gx()
        ctx = _context(home)
        self.ctx = ctx
        gx_suite = ctx.suites.add_or_update(self.suite.gx_suite)
        ds = ctx.data_sources.add_or_update_pandas(name="lmops")
        asset_name = f"{self.suite.name}-records"
        try:
            asset = ds.get_asset(asset_name)
        except LookupError:
            asset = ds.add_dataframe_asset(name=asset_name)
        try:
            self.batch_def = asset.get_batch_definition("whole")
        except (KeyError, LookupError, ValueError):
            self.batch_def = asset.add_batch_definition_whole_dataframe("whole")
        self.vd = ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"lmops-{self.suite.name}", data=self.batch_def, suite=gx_suite)
        )
        self.runs = 0
        self.earlier = set(ctx.validation_results_store.list_keys())  # results before this validator's runs

    def validate(self, df: Any) -> Outcome:
        """GX verdict for ``df`` plus the failing expectations of every row ("" when it passed)."""
        df = df.reset_index(drop=True)
        try:
            result = self.vd.run(batch_parameters={"dataframe": df}, expectation_parameters=self.params,
                                 result_format="BASIC")
        except LmopsError:
            raise
        except Exception as e:
            raise LmopsError(f"GX validation failed to run: {str(e).splitlines()[0]}") from None
        self.runs += 1
        reasons = pd.Series("", index=df.index, dtype=object)
        failed: dict[str, int] = {}
        for res in result.results:
            if res.success:
                continue
            cfg = res.expectation_config.to_json_dict()
            label = _label(cfg)
            if res.exception_info and res.exception_info.get("raised_exception"):
                msg = str(res.exception_info.get("exception_message", "")).splitlines()[0:1]
                raise LmopsError(f"expectation {label} raised inside GX: {msg[0] if msg else 'unknown error'}")
            orig = self._original(cfg)
            mask = _twin_mask(orig, df, self.params)
            if mask is None:
                mask = self._gx_rows(orig, df) if "column" in orig.get("kwargs", {}) else None
            if mask is None:  # table- or column-level rule: the whole chunk fails it
                mask = pd.Series(True, index=df.index)
            else:
                counted = res.result.get("unexpected_count")
                if counted is not None and int(counted) != int(mask.sum()):
                    raise LmopsError(f"validation disagreement on {label}: GX counted {counted} rows, "
                                     f"lmops found {int(mask.sum())}")
            n = int(mask.sum())
            if n:
                failed[label] = n
                sep = reasons[mask].map(lambda r: "; " if r else "")
                reasons[mask] = reasons[mask] + sep + label
        return Outcome(success=bool(result.success), reasons=reasons, failed=failed, rows=len(df))

    def _original(self, cfg: dict) -> dict:
        """The suite JSON entry (with its $PARAMETER references) behind a GX result config."""
        for e in self.suite.expectations:
            if e["type"] == cfg["type"] and e.get("kwargs", {}).get("column") == cfg.get("kwargs", {}).get("column"):
                same = all(_resolve(v, self.params) == cfg["kwargs"].get(k) or isinstance(v, dict)
                           for k, v in e.get("kwargs", {}).items())
                if same:
                    return e
        return cfg

    def _gx_rows(self, cfg: dict, df: Any) -> Any:
        """Fallback: GX ``COMPLETE`` result of one expectation, mapped back to rows by index."""
        gx = import_gx()
        batch = self.batch_def.get_batch(batch_parameters={"dataframe": df})
        conf = gx.expectations.expectation_configuration.ExpectationConfiguration(
            type=cfg["type"], kwargs={k: _resolve(v, self.params) for k, v in cfg["kwargs"].items()})
        res = batch.validate(conf.to_domain_obj(), result_format={"result_format": "COMPLETE"})
        idx = res.result.get("unexpected_index_list")
        if idx is None:
            return None
        mask = pd.Series(False, index=df.index)
        mask.loc[[i if not isinstance(i, dict) else i.get("index") for i in idx]] = True
        return mask

    def build_docs(self) -> str | None:
        """Render Data Docs (offline HTML) under ``<home>/gx``; returns the index path.

        Only this validator's results and its suite are rendered (plus the index, which lists every
        result): the earlier pages are already there, and re-rendering all of them made every ingest
        slower than the one before. A site without an index yet gets a full build.
        """
        if not self.runs:
            return None
        # lazy: GX imports in ~3.5 s
        from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

        try:
            built = self.ctx.get_docs_sites_urls(only_if_exists=True)
            if built and all(site.get("site_url") for site in built):  # every site has its index
                new = [k for k in self.ctx.validation_results_store.list_keys() if k not in self.earlier]
                sites = self.ctx.build_data_docs(resource_identifiers=[ExpectationSuiteIdentifier(self.suite.name),
                                                                       *new])
            else:
                sites = self.ctx.build_data_docs()
        except Exception as e:  # docs are a report: a render failure must not lose the ingest
            return f"data docs not built: {str(e).splitlines()[0]}"
        for url in sites.values():
            return url.removeprefix("file://")
        return None
