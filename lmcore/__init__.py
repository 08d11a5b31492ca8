"""lmcore: the lmops library. Pure, typed, testable without Prefect; never imports `flows`."""

__version__ = "0.1.0"
