"""Scheduled deployments of the flows, served from one long-running process.

`lmops schedule` is the one-machine way: it starts a local Prefect server on 127.0.0.1 when
none is configured (schedules need a server), then serves the deployments with their cron
schedules until SIGINT/SIGTERM. Teams use `prefect.yaml` with a process work pool instead.

The crons and their time zone come from params.yaml's ``schedule`` section. ``prefect deploy`` reads
only `prefect.yaml`, so that file repeats them; ``prefect_yaml_differences`` (run by the tests) names
every place where it no longer matches ``deployment_specs``.
"""

from __future__ import annotations

import signal
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import prefect.settings
import yaml
from prefect import serve
from prefect.schedules import Cron

from flows.harvest import harvest_flow
from flows.monitor import monitor_flow
from flows.training import training_flow
from flows.ui import start_prefect_server
from lmcore.config import Params
from lmcore.services import stop_service
from lmcore.settings import PREFECT_PORT, get_settings

TRAINING_DEPLOYMENT = "nightly"
HARVEST_DEPLOYMENT = "hourly"
MONITOR_DEPLOYMENT = "monitoring"


def deployment_specs(params: Params) -> dict[str, dict[str, str]]:
    """The scheduled deployments by name: entry point, cron and time zone (from ``params.schedule``)."""
    s = params.schedule
    return {
        TRAINING_DEPLOYMENT: {"entrypoint": "flows/training.py:training_flow", "cron": s.training_cron,
                              "timezone": s.timezone},
        HARVEST_DEPLOYMENT: {"entrypoint": "flows/harvest.py:harvest_flow", "cron": s.harvest_cron,
                             "timezone": s.timezone},
        MONITOR_DEPLOYMENT: {"entrypoint": "flows/monitor.py:monitor_flow", "cron": s.monitor_cron,
                             "timezone": s.timezone},
    }


# Each deployment's flow and description (prefect.yaml repeats the descriptions).
DEPLOYED_FLOWS = {
    TRAINING_DEPLOYMENT: (training_flow, "The whole loop on the configured sources, nightly."),
    HARVEST_DEPLOYMENT: (harvest_flow,
                         "Feedback -> training data, hourly; triggers training past feedback.min_new_records."),
    MONITOR_DEPLOYMENT: (monitor_flow, "Prompt drift, ratings and latency, hourly; a crossed threshold runs "
                                       "harvest, then training."),
}


# Deployments a team's pool runs on demand (no schedule; `lmops schedule` does not serve them).
ON_DEMAND = {"doctor": "flows/doctor.py:probe_flow", "ddp-train": "flows/ddp.py:ddp_training_flow"}


def prefect_yaml_differences(params: Params, path: str | Path) -> list[str]:
    """Where ``prefect.yaml``'s deployments differ from ``deployment_specs(params)``; empty when they agree."""
    declared = {d.get("name"): d for d in (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
                .get("deployments") or []}
    out = []
    for name, spec in deployment_specs(params).items():
        d = declared.pop(name, None)
        if d is None:
            out.append(f"deployment '{name}' is missing")
            continue
        if d.get("entrypoint") != spec["entrypoint"]:
            out.append(f"{name}: entrypoint {d.get('entrypoint')!r}, expected {spec['entrypoint']!r}")
        got = [(s.get("cron"), s.get("timezone")) for s in d.get("schedules") or []]
        if got != [(spec["cron"], spec["timezone"])]:
            out.append(f"{name}: schedules {got}, params.yaml says [{(spec['cron'], spec['timezone'])}]")
    for name, entrypoint in ON_DEMAND.items():
        d = declared.pop(name, None)
        if d is None or d.get("entrypoint") != entrypoint or d.get("schedules"):
            out.append(f"on-demand deployment '{name}' must run {entrypoint}, with no schedule")
    out += [f"deployment '{name}' is not one lmops serves" for name in declared]
    return out


def build_deployments(params: Params, params_path: str | None = None) -> list[Any]:
    specs = deployment_specs(params)
    return [
        flow_.to_deployment(name=name, schedules=[Cron(specs[name]["cron"], timezone=specs[name]["timezone"])],
                            parameters={"params_path": params_path}, description=description, tags=["lmops"])
        for name, (flow_, description) in DEPLOYED_FLOWS.items()
    ]


def serve_schedules(params: Params, params_path: str | None = None, port: int = PREFECT_PORT, echo=print) -> None:
    """Serve the deployments (blocking); start and stop a local Prefect server if none is set."""
    def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so the server we started is stopped
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    with ExitStack() as stack:
        stack.callback(signal.signal, signal.SIGTERM, previous)
        api_url = get_settings().prefect_api_url
        if api_url is None:
            echo("starting a local Prefect server on 127.0.0.1 (10-20 s) ...")
            server = start_prefect_server(port=port)
            stack.callback(stop_service, server)
            api_url = f"{server.url}/api"
            echo(f"Prefect UI: {server.url}  (server pid {server.pid}, log {server.log})")
        stack.enter_context(prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: api_url}))
        deployments = build_deployments(params, params_path)
        specs = deployment_specs(params)
        names = ", ".join(f"{flow_.name}/{name} ({specs[name]['cron']})" for name, (flow_, _) in DEPLOYED_FLOWS.items())
        echo(f"serving deployments {names}, time zone {params.schedule.timezone}; Ctrl-C stops")
        try:
            serve(*deployments, print_starting_message=False)
        except KeyboardInterrupt:
            echo("stopping ...")
