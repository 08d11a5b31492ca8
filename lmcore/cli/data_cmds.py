"""`lmops ingest` and `lmops data versions|show`: the data registry from the command line."""

from __future__ import annotations

import typer

from lmcore.cli._common import JSON_OPTION, PARAMS_OPTION, WIDE_OPTION, emit_json, load_params_cli, print_table
from lmcore.errors import LmopsError

data_app = typer.Typer(help="Dataset versions in the data registry (DVC).", no_args_is_help=True)


def _version_row(v) -> list:
    srcs = ", ".join(f"{k}={n}" for k, n in sorted(v.sources.items()))
    return [v.id, v.created_at, v.kind, v.rows, v.bytes, srcs, v.accepted, v.quarantined, v.skipped_known,
            (v.git_rev or "")[:10]]


_COLUMNS = ["version", "created", "kind", "rows", "bytes", "sources", "accepted", "quarantined", "skipped", "git"]
_DEFAULT_COLUMNS = ["version", "created", "kind", "rows", "quarantined"]  # fit 80 columns; --wide shows all


@data_app.command("versions")
def versions(wide: bool = WIDE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """List every dataset version (oldest first) with rows, bytes, sources and batch counts.

    The table shows version, created, kind, rows and the rows its batch quarantined; --wide adds bytes,
    sources, the batch's accepted and already-known rows and the git commit; --json has every value in full.
    """
    from lmcore.data.versions import DataRegistry  # lazy: keeps `lmops --help` fast

    found = DataRegistry.open().versions()
    if as_json:
        emit_json({"versions": [v.to_dict() for v in found]})
        return
    if not found:
        typer.echo("no dataset versions yet: run `lmops ingest`")
        return
    print_table("dataset versions", _COLUMNS, [_version_row(v) for v in found], default_columns=_DEFAULT_COLUMNS,
                wide=wide)


@data_app.command("show")
def show(version: str = typer.Argument(None, help="Version id or prefix (default: the current one)."),
         as_json: bool = JSON_OPTION) -> None:
    """Show one dataset version (default: current): counts, sources, shards, DVC hashes, git commit."""
    from lmcore.data.versions import DataRegistry  # lazy: keeps `lmops --help` fast

    reg = DataRegistry.open()
    v = reg.get(version) if version else reg.current()
    if v is None:
        raise LmopsError("no dataset versions yet: run `lmops ingest`")
    if as_json:
        emit_json(v.to_dict())
        return
    d = v.to_dict()
    rows = [[k, ", ".join(map(str, val)) if isinstance(val, list) else val] for k, val in d.items()]
    print_table(f"dataset {v.id}", ["field", "value"], rows)


def register(app: typer.Typer) -> None:
    @app.command("ingest")
    def ingest_cmd(
        paths: list[str] = typer.Argument(None, help="Files, folders or built-in corpora (python-stdlib); "
                                                     "default: params data.sources."),
        source: str = typer.Option(None, "--source", help="Source name stored on every record "
                                                          "(must be in data.allowed_sources)."),
        fmt: str = typer.Option("auto", "--format", help="auto|text|jsonl|csv|parquet (auto: by extension), or "
                                                         "chat: JSONL of prompt/completion or messages."),
        text_field: str = typer.Option("text", "--text-field", help="Field/column holding the text."),
        include: list[str] = typer.Option(None, "--include", help="Glob of files to take inside folders "
                                                                  "(repeatable)."),
        exclude: list[str] = typer.Option(None, "--exclude", help="Glob of files to leave out (repeatable)."),
        params_path: str = PARAMS_OPTION,
        as_json: bool = JSON_OPTION,
    ) -> None:
        """Ingest text: clean, validate (Great Expectations), quarantine bad rows, version the rest (DVC)."""
        from lmcore.data.chat import ingest_chat  # lazy: keeps `lmops --help` fast
        from lmcore.data.ingest import ingest

        params = load_params_cli(params_path, None).data
        if fmt == "chat":
            r = ingest_chat(paths or [], params)
        else:
            r = ingest(paths or [], params, source=source, fmt=fmt, text_field=text_field,
                       include=include or None, exclude=exclude or None, progress=not as_json)
        if as_json:
            emit_json(r.to_dict())
            return
        what = f"new version {r.version}" if r.version else "no new version"
        if r.batch_refused:
            what = f"batch REFUSED ({r.failure_rate:.0%} of new rows failed > data.max_failure_rate)"
        typer.echo(f"{r.rows} rows read: {r.accepted} accepted, {r.quarantined} quarantined, "
                   f"{r.skipped_known} already known; {what}")
        for label, n in sorted(r.reasons.items(), key=lambda kv: -kv[1]):
            typer.echo(f"  {n:>8}  {label}")
        if r.quarantine_path:
            typer.echo(f"quarantine: {r.quarantine_path}")
        if r.data_docs:
            typer.echo(f"data docs:  {r.data_docs}")
        for refusal in r.refusals:
            typer.secho(f"refused: {refusal}", fg=typer.colors.YELLOW, err=True)

    app.add_typer(data_app, name="data")
