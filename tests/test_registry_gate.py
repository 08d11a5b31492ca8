"""Registry and promotion gate against a real MLflow sqlite store: aliases, gate, promote/rollback, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _registry_helpers import make_home, prepared_data, tiny_model_dir, tiny_params, trained_model

from lmcore.errors import LmopsError

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One home for the module: prepared data, a trained and an untrained tiny model."""
    import torch

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("registry")
    old = os.environ.get("LMOPS_HOME")
    make_home(base / "home", tmp_path_factory.getbasetemp())
    data = prepared_data(base / "data")
    trained = trained_model(data, base / "run").model_dir
    untrained = tiny_model_dir(base / "untrained", seed=1)
    yield {"base": base, "data": data, "trained": trained, "untrained": untrained, "params": tiny_params()}
    if old is not None:
        os.environ["LMOPS_HOME"] = old


def _register(model_dir: Path, name: str, run_name: str = "train") -> str:
    from lmcore.registry.models import log_model, register_version
    from lmcore.registry.tracking import RunTracker, lineage_tags

    tags = lineage_tags("testdata", "abc123", "ph", None, "cpu")
    tracker = RunTracker.start("lmops-test", run_name, {"x": 1}, tags, system_metrics=False)
    uri = log_model(tracker, model_dir)
    tracker.finish()
    return register_version(uri, name, tags, tracker.run_id)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from lmcore.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_gate_promotes_first_and_never_promotes_a_worse_model(env):
    from lmcore.registry.models import CHALLENGER, CHAMPION, gate, list_versions, resolve_alias
    from lmcore.registry.tracking import get_client

    name = "gate-lm"
    v1 = _register(env["trained"], name)
    assert resolve_alias(name, CHALLENGER) == v1 and resolve_alias(name, CHAMPION) is None
    d1 = gate(name, v1, env["data"], env["params"])
    assert d1.promoted and d1.champion is None and all(d1.checks.values()), d1
    assert resolve_alias(name, CHAMPION) == v1
    # gating the champion again (a flow re-run that reused it) decides nothing: the same answer the flow gives
    again = gate(name, v1, env["data"], env["params"])
    assert not again.promoted and again.already_champion and "already the champion" in again.reason
    assert again.challenger_bpb == again.champion_bpb and again.checks == {}
    tags_v1 = {v["version"]: v for v in list_versions(name)}[v1]["tags"]
    assert tags_v1["lmops.gate.decision"] == "promoted", "a no-op gate overwrote the champion's gate record"
    assert resolve_alias(name, CHAMPION) == v1

    v2 = _register(env["untrained"], name)  # deliberately worse: random weights
    d2 = gate(name, v2, env["data"], env["params"])
    assert not d2.promoted
    assert d2.champion == v1 and d2.champion_bpb is not None and d2.challenger_bpb > d2.champion_bpb
    assert resolve_alias(name, CHAMPION) == v1, "a failed gate moved the champion"
    assert resolve_alias(name, CHALLENGER) == v2

    versions = {v["version"]: v for v in list_versions(name)}
    assert versions[v2]["tags"]["lmops.gate.decision"] == "rejected"
    assert "does not beat champion" in versions[v2]["tags"]["lmops.gate.reason"]
    assert "Gate FAILED" in versions[v2]["description"]
    assert versions[v1]["tags"]["lmops.dataset_version"] == "testdata"
    assert CHAMPION in versions[v1]["aliases"]
    # the gate run carries the side-by-side comparison and the decision
    client = get_client()
    gate_run = versions[v2]["tags"]["lmops.gate.run_id"]
    files = {f.path for f in client.list_artifacts(gate_run, "gate")}
    assert {"gate/comparison.md", "gate/decision.json", "gate/completions.json"} <= files
    md = Path(client.download_artifacts(gate_run, "gate/comparison.md", str(env["base"] / "dl"))).read_text()
    assert "REJECTED" in md and "ROMEO:" in md
    metrics = client.get_run(gate_run).data.metrics
    assert metrics["challenger_bpb"] > metrics["champion_bpb"]


def test_gate_rejects_model_failing_behaviour_checks_even_without_champion(env, tmp_path):
    from lmcore.registry.models import CHAMPION, gate, resolve_alias

    name = "nan-lm"
    v = _register(tiny_model_dir(tmp_path / "nan", nan=True), name)
    d = gate(name, v, env["data"], env["params"])
    assert not d.promoted and not d.checks["finite_logits"] and not d.checks["finite_loss"]
    assert "failed behaviour checks" in d.reason
    assert resolve_alias(name, CHAMPION) is None


def test_promote_rollback_cli_records_reasons(env, capsys):
    from lmcore.registry.models import CHAMPION, alias_history, promote, resolve_alias

    name = "manual-lm"
    v1 = _register(env["trained"], name)
    v2 = _register(env["untrained"], name)
    promote(name, v1, "initial")
    code, out, _ = _cli(["promote", v2, "--reason", "try the new one", "--name", name], capsys)
    assert code == 0 and f"-> v{v2}" in out
    assert resolve_alias(name, CHAMPION) == v2
    code, out, _ = _cli(["models", "--name", name, "--json"], capsys)
    listing = json.loads(out)
    by_v = {v["version"]: v for v in listing["versions"]}
    assert "champion" in by_v[v2]["aliases"] and "challenger" in by_v[v2]["aliases"]
    assert by_v[v2]["tags"]["lmops.champion.reason"] == "promote: try the new one"
    code, out, _ = _cli(["rollback", "--reason", "regression reported", "--name", name], capsys)
    assert code == 0 and resolve_alias(name, CHAMPION) == v1
    from lmcore.registry.models import list_versions

    tags_v2 = {v["version"]: v for v in list_versions(name)}[v2]["tags"]
    assert "regression reported" in tags_v2["lmops.rolled_back"] and f"to v{v1}" in tags_v2["lmops.rolled_back"]
    hist = alias_history(name)
    assert [(h["action"], h["version"]) for h in hist] == [("promote", v1), ("promote", v2), ("rollback", v1)]
    assert hist[-1]["reason"] == "regression reported" and hist[-1]["previous"] == v2
    # nothing older to go back to: error, champion stays
    code, _, err = _cli(["rollback", "--reason", "again", "--name", name], capsys)
    assert code == 1 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    assert resolve_alias(name, CHAMPION) == v1
    code, out, _ = _cli(["models", "--name", name], capsys)
    assert code == 0 and "champion" in out


def test_unknown_model_and_version_are_one_line_errors(env, capsys):
    from lmcore.registry.models import CHAMPION, promote, resolve_alias

    code, _, err = _cli(["models", "--name", "no-such-model"], capsys)
    assert code == 1 and "registered model 'no-such-model' not found" in err and len(err.strip().splitlines()) == 1
    name = "errs-lm"
    v1 = _register(env["trained"], name)
    promote(name, v1, "baseline")
    code, _, err = _cli(["promote", "99", "--reason", "x", "--name", name], capsys)
    assert code == 1 and f"model version {name}/99 not found" in err and len(err.strip().splitlines()) == 1
    assert resolve_alias(name, CHAMPION) == v1
    with pytest.raises(LmopsError, match="reason is required"):
        promote(name, v1, "  ")


def test_corrupt_model_artifact_is_a_clean_error_and_moves_nothing(env):
    from lmcore.registry.models import CHAMPION, fetch_model_dir, gate, promote, resolve_alias
    from lmcore.registry.tracking import get_client

    name = "corrupt-lm"
    v1 = _register(env["trained"], name)
    promote(name, v1, "baseline")
    v2 = _register(env["trained"], name)
    # truncate the registered weights in the artifact store
    src = get_client().get_model_version_download_uri(name, v2).removeprefix("file://")
    weights = Path(src) / "artifacts" / "model_dir" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(LmopsError, match=rf"model {name}/{v2} is corrupt") as exc:
        fetch_model_dir(f"models:/{name}/{v2}")
    assert "\n" not in str(exc.value)
    with pytest.raises(LmopsError, match="corrupt"):
        gate(name, v2, env["data"], env["params"])
    assert resolve_alias(name, CHAMPION) == v1
    # the good champion still fetches (and is cached in the home)
    folder, info = fetch_model_dir(f"models:/{name}@champion")
    assert info["version"] == v1 and (folder / "model.safetensors").is_file()
    with pytest.raises(LmopsError, match="no version with alias 'nope'"):
        fetch_model_dir(f"models:/{name}@nope")


def test_a_rollback_during_a_gate_waits_for_it_and_is_not_overwritten(env, tmp_path):
    """Issue 25, finding 10: the gate, promote and rollback take one registry lock; a process that holds it
    (a gate between reading the champion and moving it) makes a rollback wait, then the rollback stands."""
    import subprocess
    import sys
    import threading
    import time

    from lmcore.registry.models import CHAMPION, promote, resolve_alias, rollback

    name = "locked-lm"
    v1, v2 = _register(env["trained"], name), _register(env["untrained"], name)
    promote(name, v1, "first")
    promote(name, v2, "second")
    held, release = tmp_path / "held", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, time\nfrom lmcore.registry.models import registry_lock\nwith registry_lock():\n"
        f"    pathlib.Path({str(held)!r}).touch()\n"
        f"    while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.05)\n")], env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
            time.sleep(0.05)
        done: list[str] = []
        t = threading.Thread(target=lambda: done.append(rollback(name, "bad answers")))
        t.start()
        t.join(1.5)
        assert t.is_alive() and not done and resolve_alias(name, CHAMPION) == v2  # waits for the lock
        release.touch()
        t.join(60)
        assert done == [v1] and resolve_alias(name, CHAMPION) == v1
    finally:
        release.touch()
        holder.wait(30)
