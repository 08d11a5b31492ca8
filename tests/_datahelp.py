"""Helpers shared by the data-registry tests: a throwaway workspace with params + suites."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_workspace(path: Path, git: bool = False, **data_overrides) -> Path:
    """A workspace folder: params.yaml (data.* overridable), expectations/, optionally ``git init``."""
    import yaml

    path.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(data_overrides)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(ROOT / "expectations", path / "expectations", dirs_exist_ok=True)
    if git:
        subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
        for k, v in (("user.email", "t@example.com"), ("user.name", "test")):
            subprocess.run(["git", "-C", str(path), "config", k, v], check=True)
    return path


def data_params(**overrides):
    from lmcore.config import DataParams

    return dataclasses.replace(DataParams(), **overrides)


def env_for(workspace: Path, home: Path) -> dict:
    env = dict(os.environ, LMOPS_HOME=str(home), LMOPS_WORKSPACE=str(workspace))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env
