"""`lmops models`, `promote`, `rollback`: the model registry. (`lmops ui` starts Prefect, so it is in flows.cli.)"""

from __future__ import annotations

from collections.abc import Callable

import typer

from lmcore.cli._common import JSON_OPTION, PARAMS_OPTION, WIDE_OPTION, emit_json, load_params_cli, print_table

NAME_OPTION = typer.Option(None, "--name", help="Registered model name (default: params registry.model_name).")


def _model_name(name: str | None, params_path: str | None) -> str:
    if name:
        return name
    return load_params_cli(params_path, None).registry.model_name


COLUMNS = ["version", "aliases", "bits/byte", "gate", "data", "code", "params", "run", "prefers", "held-out", "golden",
           "base"]
DEFAULT_COLUMNS = ["version", "aliases", "bits/byte", "gate", "data"]  # fit 80 columns; --wide shows all


def _move_champion(name: str | None, params_path: str | None, as_json: bool, reason: str,
                   move: Callable[[str], str], label: str = "") -> None:
    """Run ``move`` (model name -> the version now champion) and report the alias move it made."""
    from lmcore.registry.models import CHAMPION, resolve_alias  # lazy: keeps `lmops --help` fast

    model = _model_name(name, params_path)
    previous = resolve_alias(model, CHAMPION)
    target = move(model)
    if as_json:
        emit_json({"name": model, "champion": target, "previous": previous, "reason": reason})
    else:
        typer.echo(f"{model}: champion v{previous or '-'} -> v{target} ({label}{reason})")


def _row(v: dict) -> list:
    m, t = v["metrics"], v["tags"]
    bpb = m.get("eval/bits_per_byte", m.get("bits_per_byte"))
    return [
        v["version"],
        ",".join(v["aliases"]),
        "" if bpb is None else f"{bpb:.4f}",
        t.get("lmops.gate.decision", ""),
        (t.get("lmops.dataset_version") or "")[:12],
        (t.get("lmops.code_rev") or "")[:12],
        t.get("lmops.params_hash", ""),
        (v["run_id"] or "")[:8],
        t.get("lmops.gate.challenger_preference_accuracy", ""),  # share of harvested pairs it prefers
        t.get("lmops.gate.challenger_heldout_preference_accuracy", ""),  # ... of those DPO never trained on
        t.get("lmops.gate.challenger_golden_loglik", ""),  # nats/token on gate.golden
        (t.get("lmops.base_hash") or "")[:12],
    ]


def register(app: typer.Typer) -> None:
    @app.command()
    def models(
        name: str = NAME_OPTION,
        params_path: str = PARAMS_OPTION,
        wide: bool = WIDE_OPTION,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """List registered model versions with aliases (champion/challenger), metrics, gate outcome and lineage.

        The table shows version, aliases, bits/byte, gate and dataset version; --wide adds the code
        revision, params hash, MLflow run, the gate's preference accuracy on harvested pairs (all, and the
        held-out ones no DPO run trained on) and golden log-likelihood, and a fine-tuned base's hash;
        --json has every value in full.
        """
        from lmcore.registry.models import alias_history, list_versions  # lazy: keeps `lmops --help` fast

        model = _model_name(name, params_path)
        versions = list_versions(model)
        if as_json:
            emit_json({"name": model, "versions": versions, "history": alias_history(model)})
            return
        rows = [_row(v) for v in versions]
        print_table(f"registered model {model}", COLUMNS, rows, default_columns=DEFAULT_COLUMNS, wide=wide)
        for v in versions:
            if v["tags"].get("lmops.gate.reason"):
                typer.echo(f"v{v['version']} gate: {v['tags']['lmops.gate.reason']}")

    @app.command()
    def promote(
        version: str = typer.Argument(..., help="Model version to make champion."),
        reason: str = typer.Option(..., "--reason", help="Why (recorded on the version and in the alias history)."),
        name: str = NAME_OPTION,
        params_path: str = PARAMS_OPTION,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Point the `champion` alias at VERSION by hand, recording the reason."""
        from lmcore.registry.models import promote as do_promote  # lazy: keeps `lmops --help` fast

        target = version.removeprefix("v")
        _move_champion(name, params_path, as_json, reason, lambda model: do_promote(model, target, reason) or target)

    @app.command()
    def rollback(
        reason: str = typer.Option(..., "--reason", help="Why (recorded on the version and in the alias history)."),
        name: str = NAME_OPTION,
        params_path: str = PARAMS_OPTION,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Move `champion` back to the previous champion, recording the reason."""
        from lmcore.registry.models import rollback as do_rollback  # lazy: keeps `lmops --help` fast

        _move_champion(name, params_path, as_json, reason, lambda model: do_rollback(model, reason), "rollback: ")
