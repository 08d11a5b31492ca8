"""The model as an MLflow pyfunc: fresh-process load by alias, `mlflow models serve`, no pickled weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from _registry_helpers import make_home, tiny_model_dir

pytestmark = pytest.mark.model

NAME = "pyfunc-lm"


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    from lmcore.registry.models import log_model, promote, register_version
    from lmcore.registry.tracking import RunTracker, lineage_tags

    base = tmp_path_factory.mktemp("pyfunc")
    old = os.environ.get("LMOPS_HOME")
    home = make_home(base / "home", tmp_path_factory.getbasetemp())
    model_dir = tiny_model_dir(base / "m")
    (model_dir / "trainer_state.pt").write_bytes(b"not to be logged")  # a pickle next to the weights
    tags = lineage_tags("testdata", "abc", "ph", None, "cpu")
    tracker = RunTracker.start("lmops-test", "pyfunc", {}, tags, system_metrics=False)
    uri = log_model(tracker, model_dir)
    tracker.finish()
    version = register_version(uri, NAME, tags, tracker.run_id)
    promote(NAME, version, "test")
    yield {"home": home, "version": version, "uri": uri, "run_id": tracker.run_id, "base": base}
    if old is not None:
        os.environ["LMOPS_HOME"] = old


def _env(home: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # `mlflow models serve` execs `uvicorn` from PATH
    db = f"sqlite:///{home / 'mlflow.db'}"
    return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "LMOPS_HOME": str(home),
            "MLFLOW_TRACKING_URI": db, "MLFLOW_REGISTRY_URI": db}


def test_logged_model_has_safetensors_and_no_pickle(champion):
    from lmcore.registry.models import fetch_model_dir
    from lmcore.registry.tracking import get_client

    local = Path(get_client().download_artifacts(champion["run_id"], "model", str(champion["base"] / "dl")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "artifacts/model_dir/model.safetensors" in files and "MLmodel" in files
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pickle"))], files
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "max_new_tokens" in mlmodel and "prompt" in mlmodel
    reqs = (local / "requirements.txt").read_text()
    assert "torch==" in reqs and "safetensors==" in reqs and "lmops==" in reqs
    folder, info = fetch_model_dir(f"models:/{NAME}@champion")
    assert info["version"] == champion["version"] and "champion" in info["aliases"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_fresh_process_loads_champion_and_predicts(champion):
    code = (
        "import json, mlflow.pyfunc, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "df = pd.DataFrame({'prompt': ['To be', 'ROMEO:']})\n"
        "p = {'max_new_tokens': 12, 'temperature': 0.9, 'seed': 7}\n"
        "a = m.predict(df, params=p)['completion'].tolist(); b = m.predict(df, params=p)['completion'].tolist()\n"
        "print(json.dumps({'a': a, 'b': b}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(champion["home"]), capture_output=True, text=True,
                         timeout=180, cwd=champion["base"])
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(res["a"]) == 2 and all(isinstance(s, str) and s for s in res["a"])
    assert res["a"] == res["b"], "same seed must give the same completions"


def test_mlflow_models_serve_answers_invocations(champion):
    from lmcore.services import free_port, start_service, stop_service

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    old_cwd = os.getcwd()
    os.chdir(champion["base"])  # mlflow writes nothing into the repo
    try:
        svc = start_service("mlflow-serve", cmd, url, f"{url}/ping", champion["base"] / "serve.log",
                            env=_env(champion["home"]), timeout=120)
    finally:
        os.chdir(old_cwd)
    try:
        body = json.dumps({"dataframe_records": [{"prompt": "To be"}],
                           "params": {"max_new_tokens": 8, "seed": 3}}).encode()
        req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            preds = json.loads(resp.read())["predictions"]
        assert isinstance(preds, list) and len(preds) == 1 and isinstance(preds[0]["completion"], str)
    finally:
        stop_service(svc)
    assert svc.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(svc.pid, 0)
