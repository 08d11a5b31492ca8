"""The `lmops` console entry: lmcore's verbs plus the orchestration verbs that need flows."""

from __future__ import annotations

from lmcore.cli import main as _lmcore_main


def _register_flow_verbs() -> None:
    return None


_register_flow_verbs()


def main() -> None:
    _lmcore_main()


if __name__ == "__main__":
    main()
