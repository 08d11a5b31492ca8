"""The `ddp-train` flow: `torchrun` trains on the registry's prepared data, as a deployment on the team pool.

The registry's current dataset version is prepared by the cached ``prepare_task`` (the same folder
`lmops run` trains on); then ``torchrun --nproc_per_node N`` runs `lmops train` on it, one process per
rank (gloo on CPU, NCCL on GPU: ``lmcore.training.loop`` sets DDP up from torchrun's environment and
only rank 0 writes). One node uses ``--standalone``; with ``nnodes`` > 1 every node runs this same
command against the c10d rendezvous at ``$LMOPS_RDZV_ENDPOINT`` (see the README's two-node recipe).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.tasks import prepare_task
from flows.training import run_cached
from lmcore.config import load_params
from lmcore.data.prepare import training_kinds
from lmcore.data.prepared import current_dataset
from lmcore.data.versions import DataRegistry
from lmcore.errors import LmopsError
from lmcore.services import console_script, log_tail
from lmcore.settings import get_settings


def torchrun_command(nproc: int, nnodes: int, run_id: str, data: str, out: Path, params_path: str | None,
                     overrides: dict[str, Any]) -> list[str]:
    """``torchrun ... --no-python lmops train --data DATA --out OUT --json``, rendezvous by ``nnodes``."""
    if nnodes > 1:
        endpoint = os.environ.get("LMOPS_RDZV_ENDPOINT")
        if not endpoint:
            raise LmopsError("nnodes > 1 needs LMOPS_RDZV_ENDPOINT=host:port (rank 0's machine, reachable by all)")
        rdzv = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
    else:
        rdzv = ["--standalone"]
    sets = [a for k, v in overrides.items() for a in ("-S", f"{k}={json.dumps(v)}")]
    return [sys.executable, "-m", "torch.distributed.run", *rdzv, "--nproc_per_node", str(nproc), "--no-python",
            console_script("lmops"), "train", "--data", data, "--out", str(out), "--json",
            *(["--params", params_path] if params_path else []), *sets]


@flow(name="ddp-train", log_prints=True)
def ddp_training_flow(nproc_per_node: int | None = None, nnodes: int = 1, rdzv_id: str | None = None,
                      params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train with DDP on ``nproc_per_node`` processes (default: stack.nproc_per_node) on each of ``nnodes``
    nodes; with ``nnodes`` > 1 start one run per node, all with the same ``rdzv_id``."""
    params = load_params(params_path, overrides)
    current = current_dataset(DataRegistry.open())
    version = current.id
    prepared = run_cached(prepare_task, lambda d: (Path(d) / "meta.json").is_file(), version, params,
                          list(training_kinds(current, params))).result()
    run_id = str(flow_run.get_id() or "local")
    out = get_settings().runs_dir / "ddp" / run_id
    if nnodes > 1 and not rdzv_id:
        raise LmopsError("nnodes > 1 needs rdzv_id: the same id for the run on every node")
    out.mkdir(parents=True, exist_ok=True)
    nproc = nproc_per_node or params.stack.nproc_per_node
    cmd = torchrun_command(nproc, nnodes, rdzv_id or run_id, prepared, out, params_path, overrides or {})
    log = out / "torchrun.log"
    with open(log, "wb") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise LmopsError(f"torchrun exited with {proc.returncode}: {log_tail(log)}")
    summary = json.loads((out / "train_summary.json").read_text())  # rank 0's
    print(f"ddp-train: {nproc} x {nnodes} process(es), {summary['steps']} steps on dataset {version}, "
          f"model {summary['model_dir']}")
    return {"dataset_version": version, "prepared_dir": prepared, "nproc_per_node": nproc, "nnodes": nnodes,
            "world_size": nproc * nnodes, **summary}
