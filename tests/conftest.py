"""Shared fixtures. Every test session gets its own lmops home, so tests never touch ~/.

Tiers (Made-With-ML style) are pytest markers: ``code``, ``data``, ``model``; ``slow`` marks
tests over ~20 s. Run one tier with ``pytest -m data``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SESSION_HOME = Path(os.environ.get("LMOPS_TEST_HOME") or (ROOT / ".lmops" / "test-home"))

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


@pytest.fixture()
def lmops_home(tmp_path, monkeypatch) -> Path:
    """A fresh, isolated lmops home for one test."""
    home = tmp_path / "lmops-home"
    monkeypatch.setenv("LMOPS_HOME", str(home))
    return home
