"""`lmops optimize export --format hf`: transformers loads the export and continues text like lmops."""

from __future__ import annotations

import json

import pytest
from _optimize_helpers import _one_thread, module_home_fixture, register, run_cli, trained_model  # noqa: F401

from lmcore.errors import LmopsError
from lmcore.optimize.export import export_model, verify_hf

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return trained_model(tmp_path_factory.mktemp("export") / "fp32", seed=1)


def test_champion_export_loads_in_transformers_with_same_greedy_text(model_dir, module_home, tmp_path,
                                                                      capsys):
    register(model_dir, "lmops-lm", champion=True)
    register(trained_model(tmp_path / "other", steps=5, seed=2), "lmops-lm")  # a newer challenger, not exported
    out = tmp_path / "hf"
    code, stdout, err = run_cli("optimize", "export", "--format", "hf", str(out), "--json", capsys=capsys)
    assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["version"] == "1" and res["format"] == "hf"  # the champion by default
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    check = verify_hf(out, model_dir, prompt="class Point:\n", new_tokens=20)
    assert check["match"], check
    assert len(check["lmops"]) == 20 and check["lmops_text"] == check["transformers_text"]


def test_export_of_a_folder_with_verify_flag(model_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    code, stdout, err = run_cli("optimize", "export", str(out), "--model", str(model_dir), "--verify", capsys=capsys)
    assert code == 0, err
    assert "verified with transformers" in stdout


def test_export_into_non_empty_folder_needs_force(model_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("optimize", "export", str(out), "--model", str(model_dir), capsys=capsys)
    assert code == 1 and err.startswith("error: ") and "--force" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]  # no temp folder left behind
    export_model(out, name="x", model_dir=model_dir, force=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_export_refuses_quantized_models_and_unknown_formats(model_dir, tmp_path):
    from lmcore.optimize.quantize import save_quantized

    q = save_quantized(model_dir, tmp_path / "int8", {"quantized_from": "3"})
    with pytest.raises(LmopsError, match="version 3"):
        export_model(tmp_path / "hf", name="x", model_dir=q)
    with pytest.raises(LmopsError, match="unknown export format"):
        export_model(tmp_path / "hf", fmt="onnx", name="x", model_dir=model_dir)
    assert not (tmp_path / "hf").exists()


def test_export_of_missing_version_is_one_line(module_home, model_dir, tmp_path, capsys):
    register(model_dir, "lmops-lm")
    code, _, err = run_cli("optimize", "export", str(tmp_path / "hf"), "--version", "42", capsys=capsys)
    assert code == 1 and "42" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
