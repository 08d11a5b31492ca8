"""The `lmops` console entry: lmcore's verbs plus the verbs that need flows (they run or start Prefect)."""

from __future__ import annotations

import typer

from lmcore.cli import app
from lmcore.cli import main as _lmcore_main
from lmcore.cli._common import JSON_OPTION, PARAMS_OPTION, SET_OPTION, emit_json, load_params_cli
from lmcore.config import parse_override
from lmcore.errors import LmopsError
from lmcore.settings import MLFLOW_PORT, POSTGRES_PORT, PREFECT_PORT, WORKER_HEALTH_PORT


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
    base: str = typer.Option(None, "--base", help="Fine-tune this pretrained base (a Hugging Face Llama folder, "
                                                  "a .gguf file or a hub id) instead of training from scratch: "
                                                  "-S model.base=...; with chat data in the registry and no "
                                                  "--source, it trains on that data for train.finetune_epochs"),
    params: str = PARAMS_OPTION,
    sets: list[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Run the whole loop once: ingest, validate, version, prepare, train, evaluate, register, gate, deploy.

    Uses Prefect's ephemeral API unless PREFECT_API_URL is set, MLflow on SQLite under the lmops
    home unless MLFLOW_TRACKING_URI is set, and DVC with a local remote. With unchanged data and
    params a re-run is cached and does no training work.
    """
    if base:
        sets = [*(sets or []), f"model.base={base}"]
    p = load_params_cli(params, sets)  # fail fast on bad params, before Prefect starts
    if p.model.base:  # and on a base that is not there, not Llama, or too large for this machine's memory
        from lmcore.model.base import check_fits_memory  # lazy: keeps `lmops --help` fast

        check_fits_memory(p.model.base, p.train.lora_r)
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
def dpo(
    model: str = typer.Option(None, "--model", help="SFT model to start from (models:/NAME@ALIAS, models:/NAME/N or "
                                                    "a model folder). Default: the champion."),
    params: str = PARAMS_OPTION,
    sets: list[str] = SET_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Preference tuning: DPO from the champion on the pairs `lmops harvest` made, then register, gate and deploy.

    Pairs come from corrections (correction chosen over the served text) and thumbs up/down on the
    same prompt; the gate promotes the result only if it prefers them at least as often as the
    champion (gate.min_preference_gain) and passes the other checks.
    """
    load_params_cli(params, sets)  # fail fast on bad params, before Prefect starts
    from flows.prefect_home import prefect_start_errors  # lazy: keeps `lmops --help` fast

    _prepare_prefect()
    from flows.dpo import dpo_flow  # lazy: keeps `lmops --help` fast

    with prefect_start_errors():
        summary = dpo_flow(params_path=params, overrides=_overrides(sets), model_uri=model)
    if as_json:
        emit_json(summary)
    else:
        g = summary["gate"]
        typer.echo(f"{summary['pairs']} pairs; v{summary['model_version']} "
                   f"{'promoted' if g['promoted'] else 'not promoted'}: {g['reason']}")


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
        f"{result.get('pairs', 0)} preference pairs, {result.get('quarantined', 0)} quarantined; "
        f"version {result.get('version') or 'unchanged'}"
    )
    if result.get("training"):
        t = result["training"]
        typer.echo(f"triggered training: v{t['model_version']} {'promoted' if t['promoted'] else 'not promoted'}")


@app.command()
def monitor(
    params: str = PARAMS_OPTION,
    no_trigger: bool = typer.Option(False, "--no-trigger", help="Only report; never run harvest and training."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Prompt drift against the champion's training data, 👎/correction rates and latency per model version.

    Publishes a Prefect artifact and an MLflow run; when drift is flagged or the champion's 👎 rate
    is over monitor.max_thumbs_down_rate, runs the harvest flow, then the training flow.
    """
    load_params_cli(params, None)
    from flows.monitor import monitor_flow  # lazy: keeps `lmops --help` fast
    from flows.prefect_home import prefect_start_errors

    _prepare_prefect()
    with prefect_start_errors():
        result = monitor_flow(params_path=params, trigger=False if no_trigger else None)
    if as_json:
        emit_json(result)
        return
    from lmcore.feedback.monitor import report_lines  # lazy: keeps `lmops --help` fast

    typer.echo("\n".join(report_lines(result["report"])))
    if result["training"]:
        t = result["training"]
        outcome = (f"v{t['model_version']} {'promoted' if t['promoted'] else 'not promoted'}" if t["steps_trained"]
                   else f"cached (no new data), v{t['model_version']} unchanged")
        typer.echo(f"triggered harvest ({result['harvest']['new_rows'] or 0} new feedback rows), then training: "
                   f"{outcome}")


@app.command()
def schedule(
    params: str = PARAMS_OPTION,
    port: int = typer.Option(PREFECT_PORT,
                             help="Port of the local Prefect server started when PREFECT_API_URL is unset."),
) -> None:
    """Keep the scheduled flows running on this machine (training nightly, harvest and monitor hourly by default).

    Starts a local Prefect server on 127.0.0.1 if none is configured, serves the deployments
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
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: local only; beyond "
                                                         "loopback needs --open-to-network)."),
    open_to_network: bool = typer.Option(False, "--open-to-network", help="Bind beyond loopback although neither "
                                         "UI authenticates (only behind an authenticating proxy)."),
) -> None:
    """Start the MLflow UI (runs, models) and the Prefect UI (flows); Ctrl-C stops both.

    A first start in a fresh lmops home creates Prefect's local database first, as its own step.
    """
    from flows.ui import run_uis  # lazy: keeps `lmops --help` fast

    run_uis(mlflow_port=mlflow_port, prefect_port=None if no_prefect else prefect_port, host=host,
            echo=typer.echo, open_to_network=open_to_network)


stack_app = typer.Typer(help="The team stack on this machine: PostgreSQL, Prefect server + workers, MLflow server.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")


@stack_app.command("up")
def stack_up_cmd(
    workers: int = typer.Option(0, "--workers", "-n", help="Process workers (default: stack.workers in params)."),
    no_schedules: bool = typer.Option(False, "--no-schedules", help="Deploy with the cron schedules paused."),
    postgres_port: int = typer.Option(POSTGRES_PORT, "--postgres-port"),
    prefect_port: int = typer.Option(PREFECT_PORT, "--prefect-port"),
    mlflow_port: int = typer.Option(MLFLOW_PORT, "--mlflow-port"),
    worker_port: int = typer.Option(WORKER_HEALTH_PORT, "--worker-port", help="First worker's health port (+1 each)."),
    params: str = PARAMS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Start the team stack on 127.0.0.1 and print the environment other machines need (export lines).

    PostgreSQL under the lmops home holds Prefect's, MLflow's, the feedback store's and Optuna's
    databases; MLflow proxies artifacts; the work pool runs prefect.yaml's deployments on N workers
    sharing one result folder. `lmops stack down` stops it all.
    """
    p = load_params_cli(params, None)
    from flows.stack import Ports, export_lines, stack_up  # lazy: keeps `lmops --help` fast

    ports = Ports(postgres=postgres_port, prefect=prefect_port, mlflow=mlflow_port, worker_health=worker_port)
    state = stack_up(p, workers or None, ports, schedules=not no_schedules,
                     echo=lambda m: typer.secho(m, err=True, dim=True))
    if as_json:
        emit_json(state)
        return
    for s in state["services"]:
        typer.echo(f"{s['name']:<16} {s['url']:<28} pid {s['pid']}", err=True)
    typer.echo("# the environment for this shell and for other machines (`eval \"$(lmops stack env)\"`):", err=True)
    typer.echo(export_lines(state["env"]))


@stack_app.command("env")
def stack_env_cmd() -> None:
    """Print the running stack's environment as export lines (`eval "$(lmops stack env)"`)."""
    from flows.stack import export_lines, read_state  # lazy: keeps `lmops --help` fast

    state = read_state()
    if not state or "env" not in state:
        raise LmopsError("no stack is up here (`lmops stack up`)")
    typer.echo(export_lines(state["env"]))


@stack_app.command("status")
def stack_status_cmd(as_json: bool = JSON_OPTION) -> None:
    """Each part of the stack with its URL, PID and health; exit 1 when any part is down."""
    from flows.stack import stack_status  # lazy: keeps `lmops --help` fast

    rows = stack_status()
    if as_json:
        emit_json(rows)
    elif not rows:
        typer.echo("no stack is up here (`lmops stack up`)")
    for r in [] if as_json else rows:
        health = "healthy" if r["healthy"] else ("running, not answering" if r["alive"] else "down")
        typer.echo(f"{r['name']:<16} {r['url']:<28} pid {r['pid'] or '-':<8} {health}")
    if rows and not all(r["healthy"] for r in rows):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down_cmd() -> None:
    """Stop every part `lmops stack up` started, by PID (workers first, PostgreSQL last); data is kept."""
    from flows.stack import stack_down  # lazy: keeps `lmops --help` fast

    stack_down(echo=typer.echo)


@app.command()
def doctor(
    no_workers: bool = typer.Option(False, "--no-workers", help="Skip the checks that run a probe on each worker."),
    params: str = PARAMS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Check this machine's team configuration, one line per check; exit 1 on any failure.

    No SQLite behind a shared server; MLflow's artifact proxy on; the DVC remote writable; every
    worker on the same git revision and torch, with CUDA where train.device asks for it; the torchrun
    rendezvous port reachable; Prefect results in one folder every worker shares.
    """
    p = load_params_cli(params, None)
    from flows.doctor import run_doctor  # lazy: keeps `lmops --help` fast

    checks = run_doctor(p, workers=not no_workers)
    if as_json:
        emit_json([c.__dict__ for c in checks])
    else:
        for c in checks:
            typer.secho(c.line(), fg=None if c.ok else typer.colors.RED)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def main() -> None:
    _lmcore_main()


if __name__ == "__main__":
    main()
