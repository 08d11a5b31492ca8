"""The whole track/register/load path over HTTP against a real `mlflow server` (one per module)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _registry_helpers import template_db, tiny_model_dir

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:<free port>, sqlite backend + proxied artifacts in tmp, stopped by PID."""
    import shutil

    from lmcore.services import free_port, start_service, stop_service

    base = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(template_db(tmp_path_factory.getbasetemp()), base / "server.db")  # skip the migrations
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{base / 'server.db'}",
           "--artifacts-destination", str(base / "artifacts"), "--serve-artifacts"]
    url = f"http://127.0.0.1:{port}"
    svc = start_service("mlflow", cmd, url, f"{url}/health", base / "server.log",
                        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, timeout=120)
    yield {"url": url, "base": base, "svc": svc}
    stop_service(svc)
    assert svc.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(svc.pid, 0)


def test_track_register_and_load_over_http(server, tmp_path, monkeypatch):
    from lmcore.registry.models import fetch_model_dir, gate, list_versions, log_model, register_version, resolve_alias
    from lmcore.registry.tracking import RunTracker, configure_mlflow, lineage_tags

    monkeypatch.setenv("LMOPS_HOME", str(tmp_path / "client-home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["url"])
    assert configure_mlflow() == server["url"]
    tags = lineage_tags("testdata", "abc", "ph", None, "cpu")
    tracker = RunTracker.start("lmops-http", "train", {"a": 1}, tags, system_metrics=False)
    for step in range(60):
        tracker.log_metrics(step, {"train_loss": 1.0 / (step + 1)})
    uri = log_model(tracker, tiny_model_dir(tmp_path / "m"))
    tracker.finish()
    assert len(tracker.client.get_metric_history(tracker.run_id, "train_loss")) == 60
    version = register_version(uri, "http-lm", tags, tracker.run_id)
    assert resolve_alias("http-lm", "challenger") == version
    # the artifacts went through the server, not onto this side's disk
    assert list((server["base"] / "artifacts").rglob("model.safetensors"))
    folder, info = fetch_model_dir("models:/http-lm@challenger")
    assert info["version"] == version and (folder / "model.safetensors").is_file()
    assert str(folder).startswith(str(tmp_path / "client-home"))
    [row] = list_versions("http-lm")
    assert row["tags"]["lmops.dataset_version"] == "testdata" and row["aliases"] == ["challenger"]

    from _registry_helpers import corpus_text, tiny_params

    from lmcore.config import TokenizerParams
    from lmcore.data.prepare import prepare_split_texts

    text = corpus_text(6000)
    data = prepare_split_texts([text[:5000]], [text[5000:]], tmp_path / "data", TokenizerParams(kind="byte"))
    decision = gate("http-lm", version, data.dir, tiny_params())
    assert decision.promoted and resolve_alias("http-lm", "champion") == version

    # a fresh process loads the champion as a pyfunc over HTTP
    code = ("import json, mlflow.pyfunc, pandas as pd\n"
            "m = mlflow.pyfunc.load_model('models:/http-lm@champion')\n"
            "print(json.dumps(m.predict(pd.DataFrame({'prompt': ['hi']}), params={'max_new_tokens': 5, 'seed': 1})"
            "['completion'].tolist()))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["url"]}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(json.loads(out.stdout.strip().splitlines()[-1])) == 1
