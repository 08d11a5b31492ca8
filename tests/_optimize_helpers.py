"""Tiny trained models, a tiny corpus and registry helpers for the optimize tests (fast on 2 CPU cores)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n\n"
        "The quick brown fox jumps over the lazy dog.\n\n") * 40


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared 2-core box, 2 threads oversubscribe and run ~20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", name="module_home")
def module_home_fixture(tmp_path_factory):
    """One lmops home per test module, its MLflow store copied from a migrated template (saves ~10 s).

    ``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI``, which would pin later homes to
    this store: it is dropped on the way in and out.
    """
    import os

    from _registry_helpers import make_home

    before = os.environ.get("LMOPS_HOME")
    home = make_home(tmp_path_factory.mktemp("lmops-home"), tmp_path_factory.getbasetemp())
    try:
        yield home
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is None:
            os.environ.pop("LMOPS_HOME", None)
        else:
            os.environ["LMOPS_HOME"] = before


def trained_model(folder: Path, steps: int = 60, seed: int = 0, **cfg_overrides) -> Path:
    """A byte-level model folder trained a few dozen steps on ``TEXT`` (so greedy output is not a tie)."""
    import torch

    from lmcore.data.tokenizer import BYTE_VOCAB, Tokenizer
    from lmcore.model.checkpoint import save_model
    from lmcore.model.transformer import ModelConfig, Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=BYTE_VOCAB, **{**dict(n_layer=2, n_head=2, n_kv_head=1, d_model=48,
                                                       block_size=64), **cfg_overrides})
    model = Transformer(cfg)
    tok = Tokenizer.train([], "byte")
    ids = torch.tensor(tok.encode(TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - cfg.block_size - 1, (8,), generator=g)
        x = torch.stack([ids[s : s + cfg.block_size] for s in starts])  # (8, T)
        y = torch.stack([ids[s + 1 : s + 1 + cfg.block_size] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_model(folder, model.eval(), tok, {"dataset_version": "test-data"})


def register(model_dir: Path, name: str, experiment: str = "optimize-tests", champion: bool = False) -> str:
    """Log ``model_dir`` to a real MLflow run and register it; optionally make it the champion."""
    from lmcore.registry.models import log_model, promote, register_version
    from lmcore.registry.tracking import TAG_DATASET_VERSION, RunTracker

    tracker = RunTracker.start(experiment, "train", params={}, tags={TAG_DATASET_VERSION: "test-data"},
                               system_metrics=False)
    uri = log_model(tracker, model_dir)
    version = register_version(uri, name, {TAG_DATASET_VERSION: "test-data"}, tracker.run_id)
    tracker.finish("FINISHED")
    if champion:
        promote(name, version, "test")
    return version


def params_file(tmp_path: Path, values: dict) -> Path:
    """A copy of the repo's params.yaml with dotted ``values`` applied (comments kept)."""
    from lmcore.optimize.apply import apply_params

    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    apply_params(path, values)
    return path


def run_cli(*argv: str, capsys) -> tuple[int, str, str]:
    """The real `lmops` entry point in-process: (exit code, stdout, stderr)."""
    from lmcore.cli import main

    code = 0
    try:
        main(list(argv))
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
