"""`lmops optimize`: hyper-parameter sweeps, int8 quantization for CPU serving, HF and GGUF export."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from lmcore.cli._common import JSON_OPTION, PARAMS_OPTION, SET_OPTION, emit_json, load_params_cli, print_table
from lmcore.errors import LmopsError

optimize_app = typer.Typer(help="Optimize models: hyper-parameter sweeps, int8 quantization, export.",
                           no_args_is_help=True)


@optimize_app.command("sweep")
def sweep(
    trials: int = typer.Option(None, "--trials", "-n", help="Trials to run in this process (default optimize.trials)."),
    minutes: float = typer.Option(None, "--minutes", help="Stop starting trials after this long (0 = no limit)."),
    apply: bool = typer.Option(False, "--apply", help="Write the best params into params.yaml (comments kept)."),
    data: str = typer.Option(None, "--data", help="Prepared data folder or text file/folder (default: current "
                                                  "dataset version)."),
    study: str = typer.Option(None, "--study", help="Study name: resume it, or share it between workers."),
    storage: str = typer.Option(None, "--storage", help="Optuna RDB URL (default optimize.storage or SQLite "
                                                        "under the lmops home)."),
    seed: int = typer.Option(None, "--seed", help="TPE sampler seed (give each parallel worker its own)."),
    no_pruning: bool = typer.Option(False, "--no-pruning", help="Let every trial run to the end."),
    params_path: str = PARAMS_OPTION,
    sets: list[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Search model/train params (optimize.search_space) with Optuna TPE + percentile pruning, tracked in MLflow."""
    from lmcore.optimize.space import check_against, parse_space  # lazy: keeps `lmops --help` fast
    from lmcore.optimize.sweep import apply_best, resolve_data, run_sweep

    params = load_params_cli(params_path, sets)
    check_against(params, parse_space(params.optimize.search_space))  # before any data work
    data_dir, version = resolve_data(data, params)

    def on_trial(row: dict) -> None:
        if not as_json:
            value = f"{row['value']:.4f}" if row["value"] is not None else "-"
            shown = ", ".join(f"{k.split('.', 2)[-1]}={_fmt(v)}" for k, v in row.items() if k.startswith("param."))
            typer.echo(f"trial {row['number']:>3} {row['state']:<8} val_loss {value:>8}  {shown}", err=True)

    result = run_sweep(params, data_dir, trials=trials, minutes=minutes, study_name=study, storage=storage,
                       seed=seed, pruning=not no_pruning, dataset_version=version, on_trial=on_trial)
    changes = apply_best(result, params_path) if apply else []
    out = {k: v for k, v in asdict(result).items() if k != "trials"}
    out["applied"] = [{"key": k, "old": o, "new": n} for k, o, n in changes]
    if as_json:
        emit_json(out)
        return
    typer.echo(f"study {result.study}: {result.trials_run} trials run here, {result.trials_total} in the study "
               f"({result.completed} complete, {result.pruned} pruned, {result.failed} failed) "
               f"in {result.seconds:.1f}s")
    if result.best_value is None:
        typer.echo("no trial completed")
        return
    print_table(f"best trial {result.best_trial}: val_loss {result.best_value:.4f}", ["param", "value"],
                [[k, _fmt(v)] for k, v in result.best_params.items()])
    if result.parent_run_id:
        typer.echo(f"MLflow parent run: {result.parent_run_id}")
    if apply:
        typer.echo(f"params.yaml updated: {', '.join(f'{k}={_fmt(n)}' for k, _, n in changes) or 'already best'}")
    else:
        typer.echo("run again with --apply to write these into params.yaml")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@optimize_app.command("quantize")
def quantize(
    version: str = typer.Option(None, "--version", help="Registered version or alias (default: champion)."),
    model: Path = typer.Option(None, "--model", help="A model folder instead of a registered version (the int8 "
                                                     "folder is written, not registered)."),
    out: Path = typer.Option(None, "--out", help="Where to write the int8 model folder."),
    data: str = typer.Option(None, "--data", help="Text or prepared folder for bits per byte (default: the data "
                                                  "the model was trained on)."),
    no_register: bool = typer.Option(False, "--no-register", help="Do not register the int8 variant."),
    min_speedup: float = typer.Option(1.0, "--min-speedup", help="Register only if int8 decodes at least this "
                                                                 "many times as fast as fp32 on this CPU "
                                                                 "(0 = always)."),
    params_path: str = PARAMS_OPTION,
    sets: list[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Int8 dynamic quantization of the linear layers for CPU serving, measured and registered as a variant.

    Not registered when int8 decodes slower than ``--min-speedup`` x fp32 here (AVX2-only CPUs
    lack fast int8 kernels): the job says why in one line and exits 0; the int8 folder stays.
    """
    from lmcore.optimize.quantize import quantize_job  # lazy: keeps `lmops --help` fast

    params = load_params_cli(params_path, sets)
    log = None if as_json else (lambda m: typer.echo(m, err=True))
    result = quantize_job(name=params.registry.model_name, version=version, model_dir=model, out_dir=out,
                          data=data, register=not no_register, experiment=params.registry.experiment,
                          min_speedup=min_speedup, log=log)
    if as_json:
        emit_json(result)
        return
    m = result["metrics"]
    typer.echo(f"int8 model: {result['out_dir']} ({m['int8_bytes'] / 1e6:.1f} MB, fp32 {m['fp32_bytes'] / 1e6:.1f} MB)")
    typer.echo(f"decode speedup x{m['speedup']:.2f} ({m['fp32_tokens_per_s']:.0f} -> {m['int8_tokens_per_s']:.0f} "
               f"tokens/s, batch 1, CPU)")
    if m["speedup"] < 1.0 and not result.get("declined"):
        typer.echo("note: int8 decodes slower than fp32 for this model on this CPU; keep serving the fp32 version",
                   err=True)
    if "bpb_change" in m:
        typer.echo(f"bits per byte {m['fp32_bpb']:.4f} -> {m['int8_bpb']:.4f} ({100 * m['bpb_change']:+.2f}%)")
        if "bpb_change_wo" in m:
            typer.echo(f"  weight-only int8 (the compiled decode step): {m['int8_wo_bpb']:.4f} "
                       f"({100 * m['bpb_change_wo']:+.2f}%)")
    if result.get("version"):
        typer.echo(f"registered {params.registry.model_name} version {result['version']} (challenger), "
                   f"quantized from version {result['source_version']}")
    elif result.get("declined"):
        typer.echo(result["declined"])  # a measured outcome, not an error: exit code 0


@optimize_app.command("export")
def export(
    out_dir: Path = typer.Argument(..., help="Folder to write (must be empty unless --force)."),
    fmt: str = typer.Option("hf", "--format", help="Export format: hf (transformers LlamaForCausalLM folder) or "
                                                   "gguf (one model-<TYPE>.gguf file for llama.cpp / Ollama)."),
    gguf_type: str = typer.Option(None, "--gguf-type", help="GGUF weight type: f32 (default), f16 or q8_0 "
                                                            "(norms stay f32)."),
    version: str = typer.Option(None, "--version", help="Registered version or alias (default: champion)."),
    model: Path = typer.Option(None, "--model", help="A model folder instead of a registered version."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output folder."),
    verify: bool = typer.Option(False, "--verify", help="Check with transformers that greedy output matches."),
    params_path: str = PARAMS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Export a registered version (default: champion) for transformers / vLLM / TGI, or as GGUF for llama.cpp."""
    from lmcore.optimize.export import export_model, verify_hf  # lazy: keeps `lmops --help` fast

    if verify and fmt != "hf":  # before any work
        raise LmopsError("--verify checks an hf export (a GGUF file loads in transformers with gguf_file=...)")
    params = load_params_cli(params_path, None)
    result = export_model(out_dir, fmt=fmt, name=params.registry.model_name, version=version, model_dir=model,
                          force=force, gguf_type=gguf_type)
    if verify:
        check = verify_hf(out_dir, result["source"])
        result["verified"] = check["match"]
        if not check["match"]:
            raise LmopsError(f"export in {out_dir} loads but its greedy output differs from lmops")
    if as_json:
        emit_json(result)
        return
    what = f"version {result['version']}" if result["version"] else result["source"]
    where = result.get("file") or result["out_dir"]
    kind = f"gguf {result['gguf_type']}" if fmt == "gguf" else fmt
    typer.echo(f"exported {what} to {where} ({kind})" + (" - verified with transformers" if verify else ""))


def register(app: typer.Typer) -> None:
    app.add_typer(optimize_app, name="optimize")
