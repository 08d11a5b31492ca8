"""Monitoring what the server sees: prompt drift against the champion's training data, the 👎 and
correction rates per model version, and latency percentiles.

Drift (``prompt_drift``) is a two-sample test on character n-grams. The statistic is the
Jensen-Shannon divergence (base 2, in [0, 1]) between the pooled n-gram distribution of the recent
prompts and that of *reference prompts*: for each prompt, ``monitor.reference_ratio`` windows of the
champion's training records of exactly its length, each from a line start (so the test does not flag
that prompts are shorter than training records) of a record no other window came from (while unused
records remain: windows of one record share its identifiers, and such pairs made the test flag
same-distribution prompts too often). The threshold is calibrated by a stratified
permutation test: each prompt and its equal-length windows form a block, and each of ``permutations``
shuffles lets every block give a random member to the "prompt" side; the p-value is the share of
shuffles whose divergence reaches the observed one. Shuffling whole windows (not n-grams) keeps the
n-grams of one prompt together, and shuffling within blocks keeps the length mix of each side fixed,
so when prompts and training text come from one distribution the windows of a block are exchangeable
and the false-alarm rate is ``monitor.alpha`` (measured by ``bench/monitor_drift.py``; a plain
shuffle across blocks, which varies each side's total length, was conservative: p <= 0.05 in 1% of
same-distribution trials).

Everything here is pure: it reads the feedback store and texts it is given, never Prefect or MLflow
(``flows/monitor.py`` runs it, publishes it and acts on it).
"""

from __future__ import annotations

import bisect
import json
import math
import random
import re
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from lmcore.config import MonitorParams, Params
from lmcore.data.versions import DataRegistry
from lmcore.errors import LmopsError
from lmcore.feedback.store import FeedbackStore
from lmcore.registry.models import resolve_alias, version_tags
from lmcore.registry.tracking import TAG_DATASET_VERSION
from lmcore.settings import Settings

DRIFT_METHOD = "character n-gram Jensen-Shannon divergence, permutation test within prompt/equal-length-window blocks"
HISTORY_FILE = "monitor/history.jsonl"  # under the lmops home: one report per line, newest last
_MAX_ROWS = 50_000  # generations read per report (latency percentiles)
_NEWLINE = re.compile("\n")
_WINDOW_TRIES = 8  # texts tried for room for a reference window before a shorter one is taken


@dataclass(frozen=True)
class DriftResult:
    method: str
    n_prompts: int
    n_reference: int
    divergence: float | None  # JSD of prompts vs reference (None: not tested)
    threshold: float | None  # the (1 - alpha) quantile of the permuted divergences
    p_value: float | None
    alpha: float
    drifted: bool
    note: str = ""


@dataclass(frozen=True)
class VersionStats:
    """What users did with one model version's generations in the window."""

    version: str
    generations: int
    ratings: int
    thumbs_down: int
    corrections: int
    latency_ms: dict[str, float | None]  # p50, p90, p99 of end-to-end latency
    ms_per_token: float | None  # median latency / completion token

    @property
    def thumbs_down_rate(self) -> float | None:
        return self.thumbs_down / self.ratings if self.ratings else None

    @property
    def correction_rate(self) -> float | None:
        return self.corrections / self.ratings if self.ratings else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "thumbs_down_rate": self.thumbs_down_rate, "correction_rate": self.correction_rate}


@dataclass(frozen=True)
class MonitorReport:
    at: float
    window_hours: float
    model_name: str
    champion: str | None
    dataset_version: str | None
    drift: DriftResult
    versions: list[VersionStats]
    triggers: list[str] = field(default_factory=list)  # why retraining should run (empty: it should not)

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "window_hours": self.window_hours, "model_name": self.model_name,
                "champion": self.champion, "dataset_version": self.dataset_version, "drift": asdict(self.drift),
                "versions": [v.to_dict() for v in self.versions], "triggers": list(self.triggers)}


# -- drift ---------------------------------------------------------------------------------------------
def _line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in _NEWLINE.finditer(text, 0, len(text) - 1)]


class _Windows:
    """Windows of texts from line starts, each from a text not used yet while unused ones remain (windows of
    distinct documents are independent draws, as prompts from distinct users' texts are)."""

    def __init__(self, pool: Sequence[str], rng: random.Random):
        self.pool, self.rng = pool, rng
        self.order: list[int] = []
        self.starts: dict[int, list[int]] = {}

    def _next(self) -> int:
        if not self.order:
            self.order = list(range(len(self.pool)))
            self.rng.shuffle(self.order)
        return self.order.pop()

    def take(self, length: int) -> str:
        """A window of ``length`` chars from the next text with room for it (else a shorter one)."""
        for _ in range(_WINDOW_TRIES):
            i = self._next()
            line_starts = self.starts.get(i) or self.starts.setdefault(i, _line_starts(self.pool[i]))
            room = bisect.bisect_right(line_starts, len(self.pool[i]) - length)
            if room:
                begin = line_starts[self.rng.randrange(room)]
                return self.pool[i][begin:begin + length]
        begin = self.rng.choice(line_starts)
        return self.pool[i][begin:begin + length]


def reference_windows(texts: Sequence[str], lengths: Sequence[int], seed: int, per_length: int = 1) -> list[str]:
    """``per_length`` windows of ``texts`` for each of ``lengths``, in that order, each from a line start."""
    pool = [t for t in texts if t]
    if not pool:
        return []
    windows = _Windows(pool, random.Random(seed))
    return [windows.take(max(1, int(n))) for n in lengths for _ in range(per_length)]


def ngram_matrix(texts: Sequence[str], n: int, max_features: int) -> np.ndarray:
    """Counts of each text's character n-grams: the ``max_features`` most frequent columns plus one for the rest."""
    counts = [Counter(t[i:i + n] for i in range(len(t) - n + 1)) for t in texts]
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    vocab = {g: j for j, (g, _) in enumerate(sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:max_features])}
    x = np.zeros((len(texts), len(vocab) + 1), dtype=np.float64)
    for i, c in enumerate(counts):
        for g, k in c.items():
            x[i, vocab.get(g, len(vocab))] += k
    return x


def _entropy_rows(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each row of a probability matrix."""
    return -(p * np.log2(np.where(p > 0, p, 1.0))).sum(axis=1)


def _jsd_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (bits) between each row of ``a`` and of ``b`` (count vectors): H(m) - (H(p)+H(q))/2."""
    p = a / np.maximum(a.sum(axis=1, keepdims=True), 1e-12)
    q = b / np.maximum(b.sum(axis=1, keepdims=True), 1e-12)
    return np.maximum(_entropy_rows(0.5 * (p + q)) - 0.5 * (_entropy_rows(p) + _entropy_rows(q)), 0.0)


def permutation_jsd(x: np.ndarray, blocks: np.ndarray, permutations: int, seed: int) -> tuple[float, np.ndarray]:
    """The JSD between rows ``blocks[:, 0]`` and all other rows of ``x``, and its values when each block
    (a row of ``blocks``: a prompt and its equal-length reference windows) gives a random member instead."""
    total = x.sum(axis=0)
    first = x[blocks[:, 0]].sum(axis=0)
    observed = float(_jsd_rows(first[None], (total - first)[None])[0])
    rng = np.random.default_rng(seed)
    n, k = blocks.shape
    picks = blocks[np.arange(n), rng.integers(0, k, size=(permutations, n))]
    masks = np.zeros((permutations, x.shape[0]))
    np.put_along_axis(masks, picks, 1.0, axis=1)
    shuffled = masks @ x
    return observed, _jsd_rows(shuffled, total[None] - shuffled)


def prompt_drift(prompts: Sequence[str], reference_texts: Sequence[str], cfg: MonitorParams,
                 no_reference: str = "the champion's training data has no text") -> DriftResult:
    """Are ``prompts`` drawn from the training text ``reference_texts``? See the module doc for the method.

    ``no_reference`` says why ``reference_texts`` is empty, when it is.
    """
    prompts = [p for p in prompts if len(p) >= cfg.ngram]
    if len(prompts) < cfg.min_prompts:
        return DriftResult(DRIFT_METHOD, len(prompts), 0, None, None, None, cfg.alpha, False,
                           f"not tested: {len(prompts)} prompts of >= {cfg.ngram} chars, fewer than "
                           f"monitor.min_prompts={cfg.min_prompts}")
    n, ratio = len(prompts), cfg.reference_ratio
    reference = reference_windows(reference_texts, [len(p) for p in prompts], cfg.seed, per_length=ratio)
    if not reference:
        return DriftResult(DRIFT_METHOD, n, 0, None, None, None, cfg.alpha, False, f"not tested: {no_reference}")
    x = ngram_matrix(list(prompts) + reference, cfg.ngram, cfg.max_features)
    blocks = np.column_stack([np.arange(n), n + np.arange(n * ratio).reshape(n, ratio)])
    observed, null = permutation_jsd(x, blocks, cfg.permutations, cfg.seed)
    p_value = (1 + int((null >= observed - 1e-12).sum())) / (cfg.permutations + 1)
    return DriftResult(DRIFT_METHOD, len(prompts), len(reference), observed, float(np.quantile(null, 1 - cfg.alpha)),
                       p_value, cfg.alpha, p_value <= cfg.alpha)


def sample_texts(texts: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of ``k`` texts from a stream of any length (reservoir sampling), in one pass."""
    rng = random.Random(seed)
    out: list[str] = []
    for i, t in enumerate(texts):
        if i < k:
            out.append(t)
        elif (j := rng.randrange(i + 1)) < k:
            out[j] = t
    return out


def champion_reference(params: Params, settings: Settings) -> tuple[str | None, str | None, list[str], str]:
    """The served alias's version, its dataset version (lineage tag), a sample of that version's training
    texts, and why the sample is empty when it is (no model, no alias, data not in the DVC cache)."""
    name, alias = params.registry.model_name, params.serve.alias
    try:
        version = resolve_alias(name, alias)
    except LmopsError as e:
        return None, None, [], str(e)
    if version is None:
        return None, None, [], f"model '{name}' has no version with alias '{alias}'"
    dataset = version_tags(name, version).get(TAG_DATASET_VERSION)
    if not dataset:
        return version, None, [], f"{name} v{version} has no {TAG_DATASET_VERSION} tag"
    try:
        records = DataRegistry.open(settings).iter_records(dataset)
        texts = sample_texts((t for _, t, hint in records if hint in (None, "train")),
                             params.monitor.reference_records, params.monitor.seed)
    except LmopsError as e:
        return version, dataset, [], f"training data {dataset} unreadable: {e}"
    return version, dataset, texts, "" if texts else f"training data {dataset} has no training records"


# -- ratings and latency ---------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def version_stats(store: FeedbackStore, since: float) -> list[VersionStats]:
    """👎 and correction rates (of the feedback given since ``since``) and latency percentiles, per version."""
    gens: dict[str, list[dict]] = {}
    for g in store.recent_generations(since, _MAX_ROWS):
        gens.setdefault(g["model_version"], []).append(g)
    ratings: dict[str, list[dict]] = {}
    for f in store.feedback_since(since):
        ratings.setdefault(f["model_version"], []).append(f)
    out = []
    for version in sorted(set(gens) | set(ratings), key=lambda v: (len(v), v)):
        lat = [g["latency_ms"] for g in gens.get(version, [])]
        per_token = [g["latency_ms"] / g["completion_tokens"] for g in gens.get(version, []) if g["completion_tokens"]]
        fb = ratings.get(version, [])
        out.append(VersionStats(
            version=version, generations=len(lat), ratings=len(fb),
            thumbs_down=sum(f["rating"] < 0 for f in fb),
            corrections=sum(bool((f["correction"] or "").strip()) for f in fb),
            latency_ms={f"p{q}": _percentile(lat, q) for q in (50, 90, 99)},
            ms_per_token=_percentile(per_token, 50),
        ))
    return out


def rating_triggers(stats: Sequence[VersionStats], champion: str | None, cfg: MonitorParams) -> list[str]:
    """Why the champion's ratings call for retraining: its 👎 rate over ``monitor.max_thumbs_down_rate``."""
    for s in stats:
        if s.version == champion and s.ratings >= cfg.min_ratings and s.thumbs_down_rate > cfg.max_thumbs_down_rate:
            return [f"thumbs-down rate of champion v{champion} is {s.thumbs_down_rate:.0%} of {s.ratings} ratings "
                    f"(> monitor.max_thumbs_down_rate={cfg.max_thumbs_down_rate:.0%})"]
    return []


def build_report(store: FeedbackStore, reference_texts: Sequence[str], cfg: MonitorParams, *, model_name: str,
                 champion: str | None, dataset_version: str | None, reference_note: str = "",
                 now: float | None = None) -> MonitorReport:
    """Drift of the recent prompts, ratings and latency per version, and what should trigger retraining."""
    now = time.time() if now is None else now
    since = now - cfg.window_hours * 3600
    prompts = [g["prompt"] for g in store.recent_generations(since, cfg.max_prompts)]
    drift = prompt_drift(prompts, reference_texts, cfg, reference_note or "the champion's training data has no text")
    stats = version_stats(store, since)
    triggers = rating_triggers(stats, champion, cfg)
    if drift.drifted:
        triggers.insert(0, f"prompt drift: divergence {drift.divergence:.4f} > threshold {drift.threshold:.4f} "
                           f"(p={drift.p_value:.4f} <= monitor.alpha={cfg.alpha}, {drift.n_prompts} prompts)")
    return MonitorReport(at=now, window_hours=cfg.window_hours, model_name=model_name, champion=champion,
                         dataset_version=dataset_version, drift=drift, versions=stats, triggers=triggers)


# -- what a report says, and its history -------------------------------------------------------------------
def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{v:.1%}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report_markdown(r: dict[str, Any]) -> str:
    """A report (``MonitorReport.to_dict()``) as markdown: the Prefect artifact."""
    d = r["drift"]
    verdict = "**DRIFT**" if d["drifted"] else ("not tested" if d["p_value"] is None else "no drift")
    lines = [
        f"# Monitoring: {r['model_name']} (champion v{r['champion'] or '-'}, dataset `{r['dataset_version'] or '-'}`)",
        "",
        f"- **Prompt drift**: {verdict}. {d['method']}; {d['n_prompts']} prompts vs {d['n_reference']} reference "
        f"windows; divergence {_fmt(d['divergence'])}, threshold {_fmt(d['threshold'])}, p {_fmt(d['p_value'])} "
        f"(alpha {d['alpha']})" + (f"; {d['note']}" if d["note"] else ""),
        f"- **Triggers**: {'; '.join(r['triggers']) if r['triggers'] else 'none'}",
        f"- Window: the last {r['window_hours']:g} h",
        "",
        "| version | generations | ratings | 👎 rate | correction rate | p50 ms | p90 ms | p99 ms | ms/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["versions"]:
        star = " (champion)" if s["version"] == r["champion"] else ""
        lat = s["latency_ms"]
        lines.append(f"| v{s['version']}{star} | {s['generations']} | {s['ratings']} | "
                     f"{_fmt(s['thumbs_down_rate'], True)} | {_fmt(s['correction_rate'], True)} | {_fmt(lat['p50'])} | "
                     f"{_fmt(lat['p90'])} | {_fmt(lat['p99'])} | {_fmt(s['ms_per_token'])} |")
    return "\n".join(lines)


def report_lines(r: dict[str, Any]) -> list[str]:
    """A report for the terminal, one line per finding (``lmops monitor``)."""
    d = r["drift"]
    drift = (f"not tested ({d['note']})" if d["p_value"] is None else
             f"{'DRIFT' if d['drifted'] else 'none'}: divergence {d['divergence']:.4f} vs threshold "
             f"{d['threshold']:.4f}, p={d['p_value']:.4f} (alpha {d['alpha']}), {d['n_prompts']} prompts")
    lines = [f"champion  {r['model_name']} v{r['champion'] or '-'} (dataset {r['dataset_version'] or '-'})",
             f"drift     {drift}"]
    for s in r["versions"]:
        lat = s["latency_ms"]
        lines.append(f"v{s['version']:<8} {s['generations']} generations, {s['ratings']} ratings, "
                     f"👎 {_fmt(s['thumbs_down_rate'], True)}, corrected {_fmt(s['correction_rate'], True)}; "
                     f"latency p50/p90/p99 {_fmt(lat['p50'])}/{_fmt(lat['p90'])}/{_fmt(lat['p99'])} ms")
    lines.append(f"triggers  {'; '.join(r['triggers']) if r['triggers'] else 'none'}")
    return lines


def report_metrics(r: dict[str, Any]) -> dict[str, float]:
    """A report's numbers, flat, for MLflow (``drift_*``, ``v<N>_*``); absent values are left out."""
    d = r["drift"]
    out: dict[str, Any] = {"drift_divergence": d["divergence"], "drift_threshold": d["threshold"],
                           "drift_p_value": d["p_value"], "drift_flag": float(d["drifted"]), "prompts": d["n_prompts"],
                           "triggered": float(bool(r["triggers"]))}
    for s in r["versions"]:
        v = f"v{s['version']}"
        out.update({f"{v}_generations": s["generations"], f"{v}_ratings": s["ratings"],
                    f"{v}_thumbs_down_rate": s["thumbs_down_rate"], f"{v}_correction_rate": s["correction_rate"],
                    **{f"{v}_latency_{k}_ms": x for k, x in s["latency_ms"].items()}})
    return {k: float(v) for k, v in out.items() if v is not None}


_REPORT_KEYS = {f.name for f in fields(MonitorReport)}
_DRIFT_KEYS = {f.name for f in fields(DriftResult)}


def save_report(r: dict[str, Any], home: Path) -> Path:
    """Append a report (``MonitorReport.to_dict()``) to the history the playground's ``/monitor`` page plots."""
    path = Path(home) / HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(r, sort_keys=True) + "\n")
    return path


def load_history(home: Path, limit: int = 500) -> list[dict[str, Any]]:
    """The last ``limit`` saved reports, oldest first (lines that are not a whole report are skipped)."""
    path = Path(home) / HISTORY_FILE
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", errors="replace") as f:
        lines = deque(f, maxlen=limit)
    out = []
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and r.keys() >= _REPORT_KEYS and isinstance(r["drift"], dict) \
                and r["drift"].keys() >= _DRIFT_KEYS and isinstance(r["versions"], list):
            out.append(r)
    return out


def run_monitor(params: Params, settings: Settings, now: float | None = None) -> dict[str, Any]:
    """One monitoring pass: the report on the champion's serving (saved to the history) as a dict."""
    champion, dataset, texts, note = champion_reference(params, settings)
    store = FeedbackStore(settings.feedback_db)
    try:
        report = build_report(store, texts, params.monitor, model_name=params.registry.model_name,
                              champion=champion, dataset_version=dataset, reference_note=note, now=now).to_dict()
    finally:
        store.close()
    save_report(report, settings.home)
    return report
