"""Artifacts worth reading: model card, seeded samples, gate comparison; and logging them to a run.

``log_training_outputs`` is the one call a train flow makes after training + evaluation to
attach everything the issue asks for to its MLflow run: loss curve PNG, samples (Markdown
and an MLflow table), ``tokenizer.json``, the metrics JSON and a model card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from lmcore.model.checkpoint import read_meta
from lmcore.plots import loss_curve

EVAL_KEYS = ("val_loss", "perplexity", "bits_per_byte", "accuracy", "tokens")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def samples_markdown(samples: list[dict], title: str = "Samples") -> str:
    """Prompt/completion pairs as Markdown (fenced, so code prompts stay readable)."""
    lines = [f"# {title}", ""]
    for i, s in enumerate(samples, 1):
        lines += [f"## {i}. prompt", "", "```", s.get("prompt", ""), "```", "", "completion:", "", "```",
                  s.get("completion", ""), "```", ""]
    return "\n".join(lines)


def model_card(meta: dict, metrics: dict, params: Any = None, dataset_version: str | None = None,
               n_params: int | None = None, lineage: dict | None = None) -> str:
    """A Markdown model card: architecture, size, data version, metrics, intended use, limitations."""
    cfg = meta.get("model", {})
    lines = ["# Model card: lmops language model", "",
             "## Architecture", "",
             "Decoder-only Transformer (Llama-style: RMSNorm, RoPE, SwiGLU, tied embeddings, KV cache).", ""]
    lines += [f"- {k}: {v}" for k, v in cfg.items()]
    if n_params is not None:
        lines.append(f"- parameters: {n_params:,}")
    lines += ["", "## Data", "", f"- dataset version: {dataset_version or meta.get('dataset_version') or 'unknown'}"]
    for k, v in (lineage or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Evaluation (validation set)", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(metrics.get(k))} |" for k in EVAL_KEYS if k in metrics]
    if params is not None:
        tr = getattr(params, "train", None)
        if tr is not None:
            lines += ["", "## Training", "", f"- optimizer {tr.optimizer}, lr {tr.lr}, batch {tr.batch_size}, "
                      f"max_steps {tr.max_steps}, seed {tr.seed}"]
    lines += ["", "## Intended use", "",
              "Small research/demo language model for text in the style of its training corpus: completion,",
              "playground experiments and end-to-end MLOps exercises.", "",
              "## Limitations", "",
              "- Tiny by design: completions are often incoherent; not for factual, safety-critical or user-facing",
              "  decisions.",
              "- Reflects biases and errors of its training data; no safety tuning or filtering of outputs.",
              "- Metrics come from a held-out split of the same corpus and say little about other domains.", ""]
    return "\n".join(lines)


def comparison_table(challenger: str, champion: str | None, ch_samples: list[dict],
                     champ_samples: list[dict]) -> dict[str, list]:
    """Columns for ``log_table``: one row per (version, prompt), so the MLflow UI can compare them."""
    rows: dict[str, list] = {"version": [], "role": [], "prompt": [], "completion": []}
    for version, role, samples in ((challenger, "challenger", ch_samples), (champion, "champion", champ_samples)):
        for s in samples:
            rows["version"].append(str(version))
            rows["role"].append(role)
            rows["prompt"].append(s["prompt"])
            rows["completion"].append(s["completion"])
    return rows


def comparison_markdown(decision: Any, ch_metrics: dict, champ_metrics: dict | None,
                        ch_samples: list[dict], champ_samples: list[dict]) -> str:
    """Challenger vs champion: metrics side by side, the decision, then completions prompt by prompt."""
    champ_metrics = champ_metrics or {}
    champ = decision.champion or "none"
    lines = [f"# Gate: v{decision.challenger} (challenger) vs v{champ} (champion)", "",
             f"**Decision: {'PROMOTED' if decision.promoted else 'REJECTED'}**: {decision.reason}", "",
             "| metric | challenger | champion |", "| --- | --- | --- |"]
    lines += [f"| {k} | {_fmt(ch_metrics.get(k))} | {_fmt(champ_metrics.get(k))} |" for k in EVAL_KEYS]
    if "base_val_loss" in (scores := decision.scores):  # a fine-tune: its base on the same held-out tokens
        lines += ["", "| pretrained base | val_loss | bits_per_byte |", "| --- | --- | --- |",
                  f"| base | {_fmt(scores['base_val_loss'])} | {_fmt(scores['base_bits_per_byte'])} |",
                  f"| challenger | {_fmt(ch_metrics.get('val_loss'))} | {_fmt(ch_metrics.get('bits_per_byte'))} |"]
    lines += ["", "| check | result |", "| --- | --- |"]
    lines += [f"| {k} | {'ok' if ok else 'FAIL'} |" for k, ok in decision.checks.items()]
    lines += ["", "## Completions", ""]
    by_prompt = {s["prompt"]: s["completion"] for s in champ_samples}
    for s in ch_samples:
        lines += ["```", s["prompt"], "```", "", "challenger:", "", "```", s["completion"], "```", ""]
        if s["prompt"] in by_prompt:
            lines += ["champion:", "", "```", by_prompt[s["prompt"]], "```", ""]
    return "\n".join(lines)


def log_evaluation(tracker: Any, metrics: dict, prefix: str = "eval/", samples: list[dict] | None = None) -> None:
    """Evaluation scalars as metrics (``eval/bits_per_byte`` ...), the metrics JSON and the samples."""
    tracker.log_summary({k: v for k, v in metrics.items() if k != "samples"}, prefix=prefix)
    tracker.log_dict({k: v for k, v in metrics.items()}, "eval/metrics.json")
    samples = samples if samples is not None else metrics.get("samples") or []
    if samples:
        tracker.log_text(samples_markdown(samples, "Seeded samples"), "eval/samples.md")
        tracker.log_table({"prompt": [s["prompt"] for s in samples], "completion": [s["completion"] for s in samples]},
                          "eval/completions.json")


def log_training_outputs(tracker: Any, *, model_dir: Path, metrics: dict, history_csv: Path | None = None,
                         params: Any = None, dataset_version: str | None = None, lineage: dict | None = None) -> None:
    """Attach the run's readable outputs: loss curve, eval metrics + samples, tokenizer, model card."""
    model_dir = Path(model_dir)
    log_evaluation(tracker, metrics)
    if history_csv is not None and Path(history_csv).is_file():
        tracker.log_figure(loss_curve(history_csv, "training loss"), "plots/loss_curve.png")
        tracker.log_artifact(history_csv, "history")
    if (model_dir / "tokenizer.json").is_file():
        tracker.log_artifact(model_dir / "tokenizer.json", "tokenizer")
    meta = read_meta(model_dir)
    n_params = None
    try:
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as sf:
            n_params = 0
            for k in sf.keys():  # noqa: SIM118 - safe_open is not a dict
                numel = 1
                for d in sf.get_slice(k).get_shape():
                    numel *= d
                n_params += numel
    except Exception:  # noqa: BLE001 - a size in the card is nice, not essential
        n_params = None
    tracker.log_text(model_card(meta, metrics, params, dataset_version, n_params, lineage), "model_card.md")
    tracker.log_text(json.dumps(meta, indent=2, default=str), "model_config.json")
