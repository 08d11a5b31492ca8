"""The `lmops` console entry: lmcore's verbs plus the verbs that need flows (they run or start Prefect)."""

from __future__ import annotations

import typer

from lmcore.cli import app
from lmcore.cli import main as _lmcore_main
from lmcore.cli._common import JSON_OPTION, PARAMS_OPTION, SET_OPTION, emit_json, load_params_cli
from lmcore.config import parse_override
from lmcore.settings import MLFLOW_PORT, PREFECT_PORT


def _overrides(sets: list[str] | None) -> dict:
    return dict(parse_override(s) for s in (sets or []))


def _prepare_prefect() -> None:
    """Create Prefect's local database as its own step, so a first flow's server start fits its timeout."""
    from flows.prefect_home import prepare_prefect_database  # lazy: keeps `lmops --help` fast

    prepare_prefect_database(echo=lambda m: typer.secho(m, err=True, dim=True))


@app.command()
def run(
    source: list[str] = typer.Option(
        None, "--source", "-s", help="Source to ingest (path or built-in name); repeatable. Default: data.sources."
    ),
    params: str = PARAMS_OPTION,
    sets: list[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Run the whole loop once: ingest, validate, version, prepare, train, evaluate, register, gate, deploy.

    Uses Prefect's ephemeral API unless PREFECT_API_URL is set, MLflow on SQLite under the lmops
    home unless MLFLOW_TRACKING_URI is set, and DVC with a local remote. With unchanged data and
    params a re-run is cached and does no training work.
    """
    load_params_cli(params, sets)  # fail fast on bad params, before Prefect starts
    from flows.prefect_home import prefect_start_errors  # lazy: keeps `lmops --help` fast

    _prepare_prefect()
    typer.secho("starting the training flow (Prefect) ...", err=True, dim=True)
    from flows.reporting import terminal_summary  # lazy: keeps `lmops --help` fast
    from flows.training import training_flow

    with prefect_start_errors():
        summary = training_flow(sources=source or None, params_path=params, overrides=_overrides(sets))
    if as_json:
        emit_json(summary)
    else:
        typer.echo(terminal_summary(summary))


@app.command()
def harvest(
    params: str = PARAMS_OPTION,
    no_train: bool = typer.Option(False, "--no-train", help="Only harvest; never trigger a training run."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Turn new user feedback into validated, versioned training data (and train if enough arrived)."""
    load_params_cli(params, None)
    from flows.harvest import harvest_flow  # lazy: keeps `lmops --help` fast
    from flows.prefect_home import prefect_start_errors

    _prepare_prefect()
    with prefect_start_errors():
        result = harvest_flow(params_path=params, trigger_training=not no_train)
    if as_json:
        emit_json(result)
        return
    typer.echo(
        f"harvested {result.get('new_rows', 0)} feedback rows -> {result.get('train_records', 0)} training, "
        f"{result.get('holdout_records', 0)} held out, {result.get('negatives', 0)} negatives, "
        f"{result.get('quarantined', 0)} quarantined; version {result.get('version') or 'unchanged'}"
    )
    if result.get("training"):
        t = result["training"]
        typer.echo(f"triggered training: v{t['model_version']} {'promoted' if t['promoted'] else 'not promoted'}")


@app.command()
def schedule(
    params: str = PARAMS_OPTION,
    port: int = typer.Option(PREFECT_PORT,
                             help="Port of the local Prefect server started when PREFECT_API_URL is unset."),
) -> None:
    """Keep the scheduled flows running on this machine (training nightly, harvest hourly by default).

    Starts a local Prefect server on 127.0.0.1 if none is configured, serves both deployments
    with the cron schedules from params.yaml, prints the UI address, and shuts everything down on
    Ctrl-C or SIGTERM.
    """
    p = load_params_cli(params, None)
    from flows.schedule import serve_schedules  # lazy: keeps `lmops --help` fast

    _prepare_prefect()  # the local server it starts uses the same database

    serve_schedules(p, params, port=port, echo=lambda m: typer.echo(m, err=True))


@app.command()
def ui(
    mlflow_port: int = typer.Option(MLFLOW_PORT, "--mlflow-port", help="Port for the MLflow UI."),
    prefect_port: int = typer.Option(PREFECT_PORT, "--prefect-port", help="Port for the Prefect UI."),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="Start only the MLflow UI."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: local only)."),
) -> None:
    """Start the MLflow UI (runs, models) and the Prefect UI (flows); Ctrl-C stops both.

    A first start in a fresh lmops home creates Prefect's local database first, as its own step.
    """
    from flows.ui import run_uis  # lazy: keeps `lmops --help` fast

    run_uis(mlflow_port=mlflow_port, prefect_port=None if no_prefect else prefect_port, host=host,
            echo=typer.echo)


def main() -> None:
    _lmcore_main()


if __name__ == "__main__":
    main()
