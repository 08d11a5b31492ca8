"""`lmops train`, `lmops evaluate`, `lmops generate`: the model verbs over lmcore.training.loop/evaluate/generate."""

from __future__ import annotations

from pathlib import Path

import typer

from lmcore.cli._common import JSON_OPTION, PARAMS_OPTION, SET_OPTION, emit_json, load_params_cli
from lmcore.config import load_params
from lmcore.errors import LmopsError
from lmcore.settings import get_settings


def _default_run() -> Path:
    return get_settings().runs_dir / "latest"


def _resolve_training_data(data: Path | None, out: Path, resume: bool, params) -> tuple[Path, str | None]:
    """A prepared folder to train on (``lmcore.data.prepared``): text ``--data`` is prepared into <out>/data."""
    from lmcore.data.prepared import resolve_prepared  # lazy: keeps `lmops --help` fast

    return resolve_prepared(data, params, text_dir=out / "data", resume=resume)


def _model_dir(model: str | None) -> Path:
    """--model (a folder or a ``models:/name@alias`` URI); else the last `lmops train` run's model;
    else the registry's champion (what `lmops run` produced and `lmops serve` serves)."""
    from lmcore.model.checkpoint import CONFIG  # lazy: keeps `lmops --help` fast

    if model and model.startswith(("models:/", "runs:/")):
        from lmcore.registry.models import fetch_model_dir  # lazy: keeps `lmops --help` fast

        return fetch_model_dir(model)[0]
    folder = Path(model) if model else _default_run() / "model"
    if (folder / CONFIG).is_file():
        return folder
    if model:
        raise LmopsError(f"no model at {folder}")
    from lmcore.registry.models import CHAMPION, fetch_model_dir, resolve_alias  # lazy: keeps `lmops --help` fast

    name = load_params().registry.model_name
    try:
        champion = resolve_alias(name, CHAMPION)
    except LmopsError:
        champion = None
    if champion is None:
        raise LmopsError(f"no model at {folder} and no champion of '{name}' in the registry "
                         "(run `lmops run`, or `lmops train --data PATH`, or pass --model DIR)")
    return fetch_model_dir(f"models:/{name}@{CHAMPION}")[0]


def train(
    data: Path = typer.Option(None, "--data", help="Text file or folder to train on (or a prepared folder). "
                              "Default: the data registry's current version, else the workspace's "
                              "data/prepared."),
    out: Path = typer.Option(None, "--out", help="Run folder (default: <lmops home>/runs/latest)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    params: str = PARAMS_OPTION,
    sets: list[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Train a language model: prepare the text (tokenizer + splits), train, checkpoint, save a model folder.

    Writes <out>/model (the trained model), <out>/checkpoint (resumable state), <out>/history.csv and
    <out>/train_summary.json. Stops at train.max_steps or train.max_minutes, whichever comes first.
    """
    from lmcore.training.loop import train as run_training  # lazy: keeps `lmops --help` fast

    p = load_params_cli(params, sets)
    out_dir = out or _default_run()
    data_dir, version = _resolve_training_data(data, out_dir, resume, p)
    result = run_training(data_dir, out_dir, p.model, p.train, resume=resume, progress=not as_json,
                          dataset_version=version)
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
    summary["data_dir"] = str(data_dir)
    if as_json:
        emit_json(summary)
        return
    val = "n/a" if result.final_val_loss is None else f"{result.final_val_loss:.4f}"
    typer.echo(f"trained {result.steps} steps ({result.tokens:,} tokens) in {result.seconds:.1f}s, "
               f"stopped by {result.stopped_by}; train loss {result.final_train_loss:.4f}, val loss {val}")
    typer.echo(f"model: {result.model_dir}")


def evaluate(
    model: str = typer.Option(None, "--model", help="Model folder or models:/NAME@ALIAS URI (default: the last "
                              "`lmops train` model, else the registry's champion)."),
    data: Path = typer.Option(None, "--data", help="Prepared data folder (default: the one the model was "
                              "trained on, else as for `lmops train`)."),
    out: Path = typer.Option(None, "--out", help="Also write the metrics JSON to this file."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    params: str = PARAMS_OPTION,
    sets: list[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Score a model on a validation split: loss, perplexity, bits per byte, top-1 accuracy, seeded samples."""
    from lmcore.model.checkpoint import read_meta  # lazy: keeps `lmops --help` fast
    from lmcore.training.evaluate import evaluate as run_eval  # lazy: keeps `lmops --help` fast

    p = load_params_cli(params, sets)
    folder = _model_dir(model)
    if data is None:  # the data the model was trained on, else the one every command defaults to
        from lmcore.data.prepared import resolve_prepared  # lazy: keeps `lmops --help` fast

        trained_on = read_meta(folder).get("data_dir")
        data = Path(trained_on) if trained_on and Path(trained_on).is_dir() else resolve_prepared(None, p)[0]
    metrics = run_eval(folder, data, p.eval, out, device)
    if as_json:
        emit_json(metrics)
        return
    typer.echo(f"val loss {metrics['val_loss']:.4f}  perplexity {metrics['perplexity']:.2f}  "
               f"bits/byte {metrics['bits_per_byte']:.4f}  accuracy {metrics['accuracy']:.4f}  "
               f"({metrics['tokens']:,} tokens)")
    for s in metrics["samples"]:
        typer.echo(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")


def generate(
    prompt: str = typer.Argument(..., help="Text to continue."),
    model: str = typer.Option(None, "--model", help="Model folder or models:/NAME@ALIAS URI (default: the last "
                              "`lmops train` model, else the registry's champion)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample from the k likeliest tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1 = off)."),
    seed: int = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they are generated."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    compile_: bool = typer.Option(False, "--compile", help="Decode with a compiled step: 2-3x faster per "
                                  "token on a CPU, after a one-off 20-30 s compile (cached on disk)."),
) -> None:
    """Continue PROMPT with a trained model (KV-cached sampling: greedy, temperature, top-k, top-p)."""
    from lmcore.device import pick_device  # lazy: keeps `lmops --help` fast
    from lmcore.model.checkpoint import load_model
    from lmcore.model.generate import SamplingParams, generate_text, stream_text  # lazy: keeps `lmops --help` fast

    if top_p <= 0:
        raise LmopsError("--top-p must be within (0, 1]")
    net, tokenizer, _ = load_model(_model_dir(model), pick_device(device))
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed)
    if stream:
        typer.echo(prompt, nl=False)
        for piece in stream_text(net, tokenizer, prompt, sp, compile_):
            typer.echo(piece, nl=False)
        typer.echo("")
    else:
        typer.echo(prompt + generate_text(net, tokenizer, prompt, sp, compile_))


def register(app: typer.Typer) -> None:
    for command in (train, evaluate, generate):
        app.command()(command)
