"""`lmops train/evaluate/generate` end to end, and one-line errors (no traceback) for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _lm_helpers import ROOT, TINY, write_corpus

from lmcore.cli import main

pytestmark = pytest.mark.code

LMOPS = str(Path(sys.executable).parent / "lmops")
PARAMS = ["--params", str(ROOT / "params.yaml")]
TINY_SETS = [x for k, v in TINY.items() for x in ("-S", f"{k}={v}")] + ["-S", "train.max_steps=10"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """The real CLI in-process (fast): exit code, stdout, stderr."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One real `lmops train` subprocess shared by the tests below."""
    base = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(base / "corpus", n_files=6)
    env = {"LMOPS_HOME": str(base / "home"), "PATH": str(Path(sys.executable).parent)}
    import os

    env = {**os.environ, **env}
    proc = subprocess.run([LMOPS, "train", "--data", str(corpus), *PARAMS, *TINY_SETS, "--json"],
                          cwd=base, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return base, corpus, env, summary


def test_train_evaluate_generate_via_console_script(trained_run):
    base, _, env, summary = trained_run
    assert summary["steps"] == 10 and summary["out_dir"] == str(base / "home" / "runs" / "latest")
    model = summary["model_dir"]
    ev = subprocess.run([LMOPS, "evaluate", "--model", model, *PARAMS, "-S", "eval.n_samples=1", "--json"],
                        cwd=base, env=env, capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])
    assert {"val_loss", "perplexity", "bits_per_byte", "accuracy", "tokens", "samples"} <= metrics.keys()
    assert metrics["data_dir"] == summary["data_dir"]  # defaults to the data the model was trained on
    assert metrics["dataset_version"].startswith("files-")  # a content hash of the corpus records


def test_generate_is_seeded_and_streams(trained_run, capsys, monkeypatch):
    base, _, env, summary = trained_run
    monkeypatch.setenv("LMOPS_HOME", env["LMOPS_HOME"])
    args = ["generate", "the model", "--max-new-tokens", "12", "--seed", "3", "--temperature", "1.0"]
    c1, a, _ = run_cli(capsys, *args, "--no-stream")
    c2, b, _ = run_cli(capsys, *args, "--stream")
    assert c1 == c2 == 0 and a == b and a.startswith("the model") and len(a) > len("the model\n")
    c4, compiled, _ = run_cli(capsys, *args, "--no-stream", "--compile")
    assert c4 == 0 and compiled == a  # the compiled decode step samples the same text
    c3, greedy, _ = run_cli(capsys, "generate", "the", "--temperature", "0", "--model", summary["model_dir"])
    assert c3 == 0 and greedy.startswith("the")


def test_help_on_every_verb(capsys):
    for verb in ("train", "evaluate", "generate"):
        code, out, _ = run_cli(capsys, verb, "--help")
        assert code == 0 and "Usage" in out
        assert ("--resume" if verb == "train" else "--model") in out


def test_missing_and_empty_corpus(tmp_path, capsys, lmops_home):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "nope.txt"), *PARAMS)
    assert_one_line_error(code, err, "corpus not found")
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "empty.txt"), *PARAMS)
    assert_one_line_error(code, err, "empty")
    assert not (lmops_home / "runs" / "latest" / "checkpoint").exists()


def test_no_data_at_all_says_how_to_get_it(tmp_path, capsys, lmops_home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "train", *PARAMS)
    assert_one_line_error(code, err, "--data")


def test_corpus_smaller_than_one_block(tmp_path, capsys, lmops_home):
    (tmp_path / "small.txt").write_text("just a few words\n\nand a few more\n")
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "small.txt"), *PARAMS, *TINY_SETS)
    assert_one_line_error(code, err, "fewer than one block")
    assert not (lmops_home / "runs" / "latest" / "checkpoint").exists()


@pytest.mark.parametrize(("sets", "words"), [
    (["-S", "train.lr=-0.001"], ["train.lr must be > 0"]),
    (["-S", "train.learning_rate=1"], ["unknown params key 'train.learning_rate'"]),
    (["-S", "train.optimizer=sgd"], ["train.optimizer"]),
])
def test_bad_params(trained_run, capsys, lmops_home, sets, words):
    _, corpus, _, _ = trained_run
    code, _, err = run_cli(capsys, "train", "--data", str(corpus), *PARAMS, *sets)
    assert_one_line_error(code, err, *words)


def _copy_model(src: str, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_and_mismatched_model_folders(trained_run, tmp_path, capsys):
    _, _, _, summary = trained_run
    corrupt = _copy_model(summary["model_dir"], tmp_path / "corrupt")
    w = corrupt / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    for verb in (["generate", "hi"], ["evaluate", "--data", summary["data_dir"], *PARAMS]):
        code, _, err = run_cli(capsys, *verb, "--model", str(corrupt))
        assert_one_line_error(code, err, "cannot read weights")
    mismatched = _copy_model(summary["model_dir"], tmp_path / "mismatched")
    cfg = json.loads((mismatched / "config.json").read_text())
    cfg["model"]["d_model"] = 64
    (mismatched / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(mismatched))
    assert_one_line_error(code, err, "do not match its config")
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(tmp_path / "none"))
    assert_one_line_error(code, err, "no model at")


def test_resume_from_corrupt_or_mismatched_checkpoint(trained_run, tmp_path, capsys, lmops_home):
    import shutil

    _, corpus, _, summary = trained_run
    run = tmp_path / "run"
    shutil.copytree(summary["out_dir"], run)
    code, _, err = run_cli(capsys, "train", "--data", str(corpus), "--out", str(run), "--resume", *PARAMS,
                           *TINY_SETS, "-S", "model.d_model=64")
    assert_one_line_error(code, err, "does not match the model params", "d_model")
    w = run / "checkpoint" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    code, _, err = run_cli(capsys, "train", "--data", str(corpus), "--out", str(run), "--resume", *PARAMS,
                           *TINY_SETS, "-S", "train.max_steps=20")
    assert_one_line_error(code, err, "corrupt")


def test_resume_continues_via_cli(trained_run, tmp_path, capsys, lmops_home):
    import shutil

    _, corpus, _, summary = trained_run
    run = tmp_path / "run"
    shutil.copytree(summary["out_dir"], run)
    code, out, err = run_cli(capsys, "train", "--data", str(corpus), "--out", str(run), "--resume", *PARAMS,
                             *TINY_SETS, "-S", "train.max_steps=15", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 15
