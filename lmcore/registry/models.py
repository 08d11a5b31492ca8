"""The MLflow model registry: pyfunc logging, versions, aliases, and tracking the promotion gate.

One registered model (``params.registry.model_name``). Every new version gets the alias
``challenger``; ``champion`` is what serving uses. Only the gate (or a person through
``promote``/``rollback``, with a reason) moves ``champion``; every move is recorded in the
version's tags and in an alias history kept as a registered-model tag. Aliases, not stages.
What the gate decides lives in :mod:`lmcore.registry.gate`; here it is evaluated, recorded and acted on.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from safetensors import safe_open

from lmcore.data.versions import CATALOG, DataRegistry
from lmcore.device import pick_device
from lmcore.errors import LmopsError
from lmcore.feedback.harvest import read_pairs
from lmcore.locks import reentrant_file_lock
from lmcore.machine import release_freed_memory
from lmcore.model.base import load_base
from lmcore.model.checkpoint import load_model, read_meta
from lmcore.progress import Say
from lmcore.registry.gate import (
    GateDecision,
    behaviour_checks,
    decide,
    finite_logits,
    hf_export_agrees,
    is_champion,
    prompt_completions,
    user_scores,
)
from lmcore.registry.reports import comparison_markdown, comparison_table
from lmcore.registry.tracking import MODEL_DIR_ARTIFACT, RunTracker, get_client
from lmcore.settings import get_settings
from lmcore.training.evaluate import evaluate_model
from lmcore.training.lora import is_adapter_only, merge_adapter_folder, stage_adapter_only

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "lmops.alias_history"
HISTORY_MAX_CHARS = 4500
MODEL_ARTIFACT = "model"
MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json")
OPTIONAL_MODEL_FILES = ("tokenizer_config.json",)  # a base's eos token and chat template (lmcore.data.tokenizer)


# --------------------------------------------------------------------------- logging a model
def _pip_requirements() -> list[str]:
    """Pinned runtime deps of the pyfunc (no slow inference); ``lmops`` provides the model class."""
    reqs = []
    for pkg in ("torch", "safetensors", "tokenizers", "mlflow", "pandas", "lmops"):
        try:
            version = md.version(pkg).split("+")[0]
            reqs.append(f"{pkg}=={version}")
        except md.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_model(tracker_or_run_id: Any, model_dir: Path, adapter_dir: Path | None = None) -> str:
    """Log a model folder to a run as a pyfunc model (weights as a safetensors artifact); returns its URI.

    The model is saved "from code" (``lmcore/registry/pyfunc_entry.py``) so nothing is pickled, into a
    temporary folder, then uploaded with ``log_artifacts`` against the explicit run id. With
    ``adapter_dir`` (a LoRA run's adapter), only the adapter is logged in place of the weights
    (``registry.adapter_only``); fetching the version merges it onto its base again.
    """
    import mlflow.pyfunc  # lazy: MLflow imports in ~1.8 s

    from lmcore.registry.pyfunc import signature  # lazy: its class subclasses MLflow's PythonModel

    model_dir = Path(model_dir)
    read_meta(model_dir)
    missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise LmopsError(f"not a complete model folder {model_dir}: missing {', '.join(missing)}")
    run_id = tracker_or_run_id if isinstance(tracker_or_run_id, str) else tracker_or_run_id.run_id
    client = get_client()
    with tempfile.TemporaryDirectory(prefix="lmops-pyfunc-") as tmp:
        staged = Path(tmp) / MODEL_DIR_ARTIFACT  # MLflow keeps a folder artifact's own name
        if adapter_dir is not None:
            stage_adapter_only(model_dir, Path(adapter_dir), staged, OPTIONAL_MODEL_FILES)
        else:
            staged.mkdir()
            for f in MODEL_FILES:  # only these files: never a trainer_state.pt (pickle) next to them
                shutil.copy2(model_dir / f, staged / f)
            for f in OPTIONAL_MODEL_FILES:
                if (model_dir / f).is_file():
                    shutil.copy2(model_dir / f, staged / f)
        out = Path(tmp) / MODEL_ARTIFACT
        with warnings.catch_warnings():  # "add type hints"/"no input example": by design (explicit signature)
            warnings.simplefilter("ignore", UserWarning)
            mlflow.pyfunc.save_model(
                path=str(out),
                python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                artifacts={MODEL_DIR_ARTIFACT: str(staged)},
                signature=signature(),
                pip_requirements=_pip_requirements(),
                metadata={"lmops_model": True},
            )
        client.log_artifacts(run_id, str(out), MODEL_ARTIFACT)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


def _source_for(client: Any, model_uri: str) -> str:
    if model_uri.startswith("runs:/"):
        run_id, _, sub = model_uri.removeprefix("runs:/").partition("/")
        return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{sub}"
    return model_uri


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException  # lazy: MLflow imports in ~1.8 s

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="lmops language model (aliases: champion, challenger)")
        except MlflowException:
            client.get_registered_model(name)  # created concurrently


def register_version(model_uri: str, name: str, tags: dict, run_id: str) -> str:
    """Register ``model_uri`` as a new version of ``name`` with ``tags``; alias ``challenger`` points at it."""
    client = get_client()
    _ensure_registered_model(client, name)
    mv = client.create_model_version(name, _source_for(client, model_uri), run_id=run_id,
                                     tags={str(k): str(v) for k, v in (tags or {}).items()})
    _wait_ready(client, name, mv.version)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version)


def _wait_ready(client: Any, name: str, version: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise LmopsError(f"model version {name}/{version} did not become ready (status {status})")
        time.sleep(0.2)


# --------------------------------------------------------------------------- lookups
def _require_model(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException  # lazy: MLflow imports in ~1.8 s

    try:
        return client.get_registered_model(name)
    except MlflowException:
        try:
            known = sorted(m.name for m in client.search_registered_models(max_results=50))
        except MlflowException:
            known = []
        hint = f" (registered: {', '.join(known)})" if known else " (no models registered yet)"
        raise LmopsError(f"registered model '{name}' not found{hint}") from None


def _require_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException  # lazy: MLflow imports in ~1.8 s

    _require_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise LmopsError(f"model version {name}/{version} not found") from None


def resolve_alias(name: str, alias: str) -> str | None:
    """Version number an alias points at, or None when the alias is unset (LmopsError for an unknown model)."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow imports in ~1.8 s

    client = get_client()
    _require_model(client, name)
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_tags(name: str, version: str) -> dict[str, str]:
    """A version's tags (its lineage: dataset version, params hash, ...); LmopsError when it does not exist."""
    return dict(_require_version(get_client(), name, version).tags or {})


def find_version_by_tag(name: str, key: str, value: str) -> str | None:
    """The version of ``name`` whose tag ``key`` equals ``value`` (None if none or no such model)."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow imports in ~1.8 s

    client = get_client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        return None
    for mv in client.search_model_versions(f"name='{name}'"):
        if (mv.tags or {}).get(key) == value:
            return str(mv.version)
    return None


def list_versions(name: str) -> list[dict]:
    """All versions (newest first) with aliases, their run's metrics, lineage tags and gate outcome."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow imports in ~1.8 s

    client = get_client()
    rm = _require_model(client, name)
    alias_of: dict[str, list[str]] = {}
    for alias, version in (getattr(rm, "aliases", None) or {}).items():
        alias_of.setdefault(str(version), []).append(alias)
    out = []
    for mv in client.search_model_versions(f"name='{name}'"):
        metrics: dict[str, float] = {}
        if mv.run_id:
            try:
                metrics = dict(client.get_run(mv.run_id).data.metrics)
            except MlflowException:
                metrics = {}
        out.append({
            "name": name,
            "version": str(mv.version),
            "aliases": sorted(alias_of.get(str(mv.version), [])),
            "created": int(mv.creation_timestamp or 0),
            "run_id": mv.run_id,
            "status": mv.status,
            "metrics": metrics,
            "tags": dict(mv.tags or {}),
            "description": mv.description or "",
        })
    out.sort(key=lambda d: int(d["version"]), reverse=True)
    return out


def alias_history(name: str) -> list[dict]:
    """Every recorded champion move for ``name``, oldest first."""
    rm = _require_model(get_client(), name)
    raw = (rm.tags or {}).get(HISTORY_TAG)
    try:
        return json.loads(raw) if raw else []
    except json.JSONDecodeError:
        return []


# --------------------------------------------------------------------------- fetching a model
def _validate_model_dir(folder: Path, label: str) -> None:
    """Cheap integrity check: config parses, tokenizer present, safetensors header matches file size."""
    try:
        read_meta(folder)
    except LmopsError as e:
        raise LmopsError(f"model {label} is corrupt: {e}") from None
    for f in MODEL_FILES:
        if not (folder / f).is_file():
            raise LmopsError(f"model {label} is corrupt: missing {f}")
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 - safe_open is not a dict
                sf.get_slice(key)
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LmopsError(f"model {label} is corrupt: cannot read weights ({msg})") from None


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, _, alias = body.partition("@")
        return name, None, alias
    name, _, version = body.rpartition("/")
    if not name or not version:
        raise LmopsError(f"model URI must look like models:/<name>@<alias> or models:/<name>/<version>: {uri}")
    return name, version, None


def fetch_model_dir(model_uri: str, dst: Path | None = None) -> tuple[Path, dict]:
    """A local, validated model folder for ``model_uri`` plus ``{"name","version","aliases","run_id"}``.

    Accepts ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a local model folder.
    Registry models are downloaded once into ``<home>/models/<name>/v<version>`` (or ``dst``)
    through a temporary folder; a corrupt artifact is a one-line LmopsError.
    """
    local = Path(model_uri)
    if not model_uri.startswith(("models:/", "runs:/")) and local.exists():
        _validate_model_dir(local, str(local))
        return local, {"name": None, "version": None, "aliases": [], "run_id": None}

    import mlflow.artifacts  # lazy: MLflow imports in ~1.8 s
    from mlflow.exceptions import MlflowException

    client = get_client()
    if model_uri.startswith("runs:/"):
        name, version, run_id, aliases = None, None, model_uri.removeprefix("runs:/").split("/")[0], []
        remote = f"{model_uri.rstrip('/')}/artifacts/{MODEL_DIR_ARTIFACT}"
        cache_key = f"runs/{run_id}"
    else:
        name, version, alias = _parse_models_uri(model_uri)
        _require_model(client, name)
        if alias is not None:
            version = resolve_alias(name, alias)
            if version is None:
                raise LmopsError(f"model '{name}' has no version with alias '{alias}'")
        mv = _require_version(client, name, version)
        run_id = mv.run_id
        aliases = sorted(getattr(mv, "aliases", None) or [])
        remote = f"{client.get_model_version_download_uri(name, version).rstrip('/')}/artifacts/{MODEL_DIR_ARTIFACT}"
        cache_key = f"{name}/v{version}"
    info = {"name": name, "version": version, "aliases": aliases, "run_id": run_id}
    target = Path(dst) if dst is not None else get_settings().home / "models" / cache_key
    label = model_uri if version is None else f"{name}/{version}"
    if target.is_dir() and all((target / f).is_file() for f in MODEL_FILES):
        _validate_model_dir(target, label)
        return target, info
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.dl-{uuid.uuid4().hex[:8]}"
    try:
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=remote, dst_path=str(tmp)))
        except (MlflowException, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LmopsError(f"cannot download model {label}: {msg}") from None
        if is_adapter_only(got):  # registered adapter-only: merged onto its base once, here
            got = merge_adapter_folder(got, tmp / "merged")
        _validate_model_dir(got, label)
        if target.exists():
            shutil.rmtree(target)
        got.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, info


# --------------------------------------------------------------------------- champion moves
def registry_lock(timeout_s: float = 3600.0):
    """The one lock every move of the champion takes (the gate, ``promote``, ``rollback``, the flows'
    register + gate): a gate reads the champion minutes before it moves the alias, and the alias history
    is a read-modify-write tag, so a rollback made during a gate would otherwise be overwritten."""
    return reentrant_file_lock(get_settings().home / "locks" / "model-registry.lock", timeout_s)


def _record_move(client: Any, name: str, entry: dict) -> None:
    history = alias_history(name) + [entry]
    text = json.dumps(history)
    while len(text) > HISTORY_MAX_CHARS and len(history) > 1:  # tag values are capped: keep the newest
        history = history[1:]
        text = json.dumps(history)
    client.set_registered_model_tag(name, HISTORY_TAG, text)


def _move_champion(client: Any, name: str, version: str, action: str, reason: str) -> str | None:
    previous = resolve_alias(name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _record_move(client, name, {"at": now, "action": action, "version": str(version), "previous": previous,
                                "reason": reason})
    client.set_model_version_tag(name, str(version), "lmops.champion.since", now)
    client.set_model_version_tag(name, str(version), "lmops.champion.reason", f"{action}: {reason}"[:4900])
    return previous


def promote(name: str, version: str, reason: str) -> None:
    """Point ``champion`` at ``version`` by hand; the reason goes into tags and the alias history."""
    if not reason or not reason.strip():
        raise LmopsError("a reason is required to move the champion")
    client = get_client()
    with registry_lock():
        _require_version(client, name, str(version))
        _move_champion(client, name, str(version), "promote", reason.strip())


def _champion_stack(history: list[dict]) -> list[str]:
    """Replays the alias history: promotions push, rollbacks pop; the top is the champion."""
    stack: list[str] = []
    for e in history:
        if e.get("action") == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != e["version"]:
                stack.append(e["version"])
        elif not stack or stack[-1] != e["version"]:
            stack.append(e["version"])
    return stack


def rollback(name: str, reason: str) -> str:
    """Move ``champion`` back to the previous champion; returns that version."""
    if not reason or not reason.strip():
        raise LmopsError("a reason is required to roll back the champion")
    with registry_lock():
        return _rollback(get_client(), name, reason)


def _rollback(client: Any, name: str, reason: str) -> str:
    _require_model(client, name)
    current = resolve_alias(name, CHAMPION)
    if current is None:
        raise LmopsError(f"model '{name}' has no champion to roll back")
    stack = _champion_stack(alias_history(name))
    if stack and stack[-1] == current:
        stack.pop()
    if not stack:
        raise LmopsError(f"model '{name}' has no previous champion to roll back to (champion is v{current})")
    target = stack[-1]
    _require_version(client, name, target)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, current, "lmops.rolled_back", f"{now} to v{target}: {reason.strip()}"[:4900])
    _move_champion(client, name, target, "rollback", reason.strip())
    return target


# --------------------------------------------------------------------------- the gate
def _evaluate_version(name: str, version: str, data_dir: Path, params: Any, device: Any, say: Say | None = None
                      ) -> tuple[dict, list, Any]:
    if say:
        say(f"gate: scoring v{version}")
    folder, _ = fetch_model_dir(f"models:/{name}/{version}")
    model, tokenizer, meta = load_model(folder, device=device)
    if not finite_logits(model, tokenizer, tuple(params.eval.prompts)):
        nan = float("nan")
        return ({"val_loss": nan, "bits_per_byte": nan, "perplexity": nan, "accuracy": 0.0}, [],
                (model, tokenizer, folder))
    metrics = evaluate_model(model, tokenizer, Path(data_dir), params.eval, device, trained_window=meta.get("window"),
                             say=say)
    completions = prompt_completions(model, tokenizer, params.eval)
    return metrics, completions, (model, tokenizer, folder)


def _base_scores(folder: Path, data_dir: Path, params: Any, device: Any, say: Say | None = None) -> dict[str, float]:
    """The pretrained base a model was fine-tuned from, scored on the same held-out tokens in the same
    window ({} for a model trained from scratch): whether fine-tuning helped at all."""
    meta = read_meta(folder)
    if not meta.get("base"):
        return {}
    if say:
        say(f"gate: scoring the pretrained base {meta['base']['spec']}")
    try:
        base, tokenizer, _ = load_base(meta["base"]["spec"], verify=False)
    except LmopsError:  # the base is not on this machine (a registry shared by a team): nothing to compare
        return {}
    metrics = evaluate_model(base, tokenizer, Path(data_dir), dataclasses.replace(params.eval, n_samples=0), device,
                             trained_window=meta.get("window"), say=say)
    return {"base_val_loss": metrics["val_loss"], "base_bits_per_byte": metrics["bits_per_byte"],
            **({} if "sft_model" in meta else {"sft": 1.0})}


def harvested_pairs() -> list[dict]:
    """The preference pairs of the workspace's current dataset version (none without a data registry)."""
    if not (get_settings().workspace / CATALOG).is_file():
        return []
    return read_pairs(DataRegistry.open())


def _recorded_bpb(client: Any, name: str, version: str) -> float | None:
    """Bits per byte the version's own run recorded at evaluation (None if it has none)."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow imports in ~1.8 s

    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        return None
    try:
        metrics = client.get_run(run_id).data.metrics
    except MlflowException:
        return None
    value = metrics.get("eval/bits_per_byte", metrics.get("bits_per_byte"))
    return None if value is None else float(value)


def gate(name: str, challenger_version: str, data_dir: Path, params: Any, *,
         parent_run_id: str | None = None, pairs: list[dict] | None = None, say: Say | None = None) -> GateDecision:
    """Under :func:`registry_lock`: :func:`_gate`."""
    with registry_lock():
        return _gate(name, challenger_version, data_dir, params, parent_run_id=parent_run_id, pairs=pairs, say=say)


def _gate(name: str, challenger_version: str, data_dir: Path, params: Any, *,
          parent_run_id: str | None = None, pairs: list[dict] | None = None, say: Say | None = None) -> GateDecision:
    """Evaluate challenger and champion on the same current validation set and decide (:func:`.gate.decide`).

    The challenger becomes ``champion`` when it passes the behaviour checks and there is no
    champion or it beats the champion's bits per byte by at least ``params.gate.min_improvement``.
    The decision is written to the version's tags/description and logged as a ``gate`` run with
    a side-by-side comparison artifact. A failed gate never moves ``champion``. A challenger
    that already is the champion has nothing to decide: ``promoted=False``, nothing is evaluated,
    logged or tagged (its earlier gate record stands), and the alias stays where it is.

    Both are also scored on what users asked for: the golden set (``gate.golden``) and the harvested
    preference pairs (``pairs``, default :func:`harvested_pairs`); the challenger's HF export must
    load in transformers and decode greedily as lmops does (``gate.check_hf_export``). ``say`` gets a line
    per phase and the evaluations' progress (a log: the Prefect task's).
    """
    client = get_client()
    challenger_version = str(challenger_version)
    _require_version(client, name, challenger_version)
    champion = resolve_alias(name, CHAMPION)
    min_imp = float(params.gate.min_improvement)
    if is_champion(challenger_version, champion):
        bpb = _recorded_bpb(client, name, challenger_version)
        return decide(challenger_version, champion, checks={}, challenger_bpb=bpb, champion_bpb=bpb,
                      min_improvement=min_imp)

    device = pick_device(params.train.device)
    pairs = harvested_pairs() if pairs is None else pairs
    ch_metrics, ch_samples, (model, tok, folder) = _evaluate_version(name, challenger_version, data_dir, params,
                                                                     device, say)
    checks = behaviour_checks(model, tok, tuple(params.eval.prompts), params.eval.seed, ch_metrics)
    scores = {f"challenger_{k}": v for k, v in user_scores(model, tok, params.gate.golden, pairs).items()}
    del model, tok  # each check below loads what it needs: one model in memory at a time
    if params.gate.check_hf_export:
        if say:
            say("gate: checking that the HF export loads in transformers and decodes the same")
        checks["hf_export_agrees"] = hf_export_agrees(folder, (params.eval.prompts or ("\n",))[0])
    base = _base_scores(folder, data_dir, params, device, say)
    if base.pop("sft", None):  # supervised fine-tuning that does worse on held-out data than its base taught nothing
        checks["beats_base"] = float(ch_metrics["val_loss"]) <= base["base_val_loss"]
    scores.update(base)
    champ_metrics: dict | None = None
    champ_samples: list = []
    champ_note = ""
    if champion is not None:
        try:
            champ_metrics, champ_samples, (cmodel, ctok, _) = _evaluate_version(name, champion, data_dir, params,
                                                                                device, say)
            scores.update({f"champion_{k}": v for k, v in user_scores(cmodel, ctok, params.gate.golden,
                                                                     pairs).items()})
            del cmodel, ctok
        except LmopsError as e:  # an unreadable champion must not block a good challenger
            champ_note = f"; champion v{champion} could not be evaluated ({e})"
    ch_bpb = float(ch_metrics["bits_per_byte"])
    champ_bpb = float(champ_metrics["bits_per_byte"]) if champ_metrics else None
    decision = decide(challenger_version, champion, checks=checks, challenger_bpb=ch_bpb, champion_bpb=champ_bpb,
                      min_improvement=min_imp, champion_note=champ_note, scores=scores,
                      golden_tolerance=params.gate.golden_tolerance,
                      min_preference_gain=params.gate.min_preference_gain,
                      min_heldout_pairs=params.gate.min_heldout_pairs)
    promoted, reason = decision.promoted, decision.reason

    # The record first (a gate run + version tags), then the only alias move.
    run_tags = {"lmops.kind": "gate", "lmops.model_name": name, "lmops.challenger": challenger_version,
                "lmops.champion": champion or "none", "lmops.gate.promoted": str(promoted).lower()}
    tracker = RunTracker.start(params.registry.experiment, f"gate-v{challenger_version}",
                               {"gate.min_improvement": min_imp, "model_name": name}, run_tags,
                               parent_run_id=parent_run_id, system_metrics=False)
    try:
        summary = {"challenger_bpb": ch_bpb, "challenger_val_loss": ch_metrics.get("val_loss"),
                   "challenger_accuracy": ch_metrics.get("accuracy"), "promoted": float(promoted)}
        if champ_metrics:
            summary.update({"champion_bpb": champ_bpb, "champion_val_loss": champ_metrics.get("val_loss"),
                            "champion_accuracy": champ_metrics.get("accuracy")})
        summary.update(scores)
        tracker.log_summary({k: v for k, v in summary.items() if v is not None})
        tracker.log_dict(decision.to_dict(), "gate/decision.json")
        tracker.log_text(comparison_markdown(decision, ch_metrics, champ_metrics, ch_samples, champ_samples),
                         "gate/comparison.md")
        tracker.log_table(comparison_table(challenger_version, champion, ch_samples, champ_samples),
                          "gate/completions.json")
    finally:
        tracker.finish()
    for k, v in {"lmops.gate.decision": "promoted" if promoted else "rejected", "lmops.gate.reason": reason[:4900],
                 "lmops.gate.challenger_bpb": f"{ch_bpb:.6f}",
                 "lmops.gate.challenger_val_loss": f"{float(ch_metrics['val_loss']):.6f}",
                 "lmops.gate.champion_bpb": "none" if champ_bpb is None else f"{champ_bpb:.6f}",
                 "lmops.gate.champion_version": champion or "none", "lmops.gate.run_id": tracker.run_id,
                 "lmops.gate.checks": json.dumps(checks),
                 **{f"lmops.gate.{k}": f"{v:.4f}" for k, v in scores.items()}}.items():
        client.set_model_version_tag(name, challenger_version, k, v)
    client.update_model_version(name, challenger_version, description=(
        f"Gate {'PASSED' if promoted else 'FAILED'}: {reason}. Checks: "
        + ", ".join(f"{k}={'ok' if ok else 'FAIL'}" for k, ok in checks.items())))
    if promoted:
        _move_champion(client, name, challenger_version, "gate", reason)
    release_freed_memory()  # both models are gone: their heap goes back to the kernel
    return decision
