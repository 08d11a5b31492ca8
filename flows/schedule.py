"""Scheduled deployments of the flows, served from one long-running process.

`lmops schedule` is the one-machine way: it starts a local Prefect server on 127.0.0.1 when
none is configured (schedules need a server), then serves the deployments with their cron
schedules until SIGINT/SIGTERM. Teams use `prefect.yaml` with a process work pool instead.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from lmcore.config import Params

TRAINING_DEPLOYMENT = "nightly"
HARVEST_DEPLOYMENT = "hourly"


def build_deployments(params: Params, params_path: str | None = None) -> list[Any]:
    from prefect.schedules import Cron

    from flows.harvest import harvest_flow
    from flows.training import training_flow

    tz = params.schedule.timezone
    return [
        training_flow.to_deployment(
            name=TRAINING_DEPLOYMENT,
            schedules=[Cron(params.schedule.training_cron, timezone=tz)],
            parameters={"params_path": params_path},
            description="The whole loop on the configured sources, nightly.",
            tags=["lmops"],
        ),
        harvest_flow.to_deployment(
            name=HARVEST_DEPLOYMENT,
            schedules=[Cron(params.schedule.harvest_cron, timezone=tz)],
            parameters={"params_path": params_path},
            description="Feedback -> training data, hourly; triggers training past feedback.min_new_records.",
            tags=["lmops"],
        ),
    ]


def serve_schedules(params: Params, params_path: str | None = None, port: int = 4200, echo=print) -> None:
    """Serve the deployments (blocking); start and stop a local Prefect server if none is set."""
    import signal

    import prefect.settings
    from prefect import serve

    from lmcore.settings import get_settings

    def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so the server we started is stopped
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    with ExitStack() as stack:
        stack.callback(signal.signal, signal.SIGTERM, previous)
        api_url = get_settings().prefect_api_url
        if api_url is None:
            from lmcore.ui import start_prefect_server, stop_service

            echo("starting a local Prefect server on 127.0.0.1 (10-20 s) ...")
            server = start_prefect_server(port=port)
            stack.callback(stop_service, server)
            api_url = f"{server.url}/api"
            echo(f"Prefect UI: {server.url}  (server pid {server.pid}, log {server.log})")
        stack.enter_context(prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: api_url}))
        deployments = build_deployments(params, params_path)
        echo(
            f"serving deployments training/{TRAINING_DEPLOYMENT} ({params.schedule.training_cron}) and "
            f"harvest/{HARVEST_DEPLOYMENT} ({params.schedule.harvest_cron}), time zone {params.schedule.timezone}; "
            "Ctrl-C stops"
        )
        try:
            serve(*deployments, print_starting_message=False)
        except KeyboardInterrupt:
            echo("stopping ...")
