"""flows: Prefect orchestration over lmcore. Tasks are thin wrappers over one lmcore function."""

from lmcore.settings import apply_environment

apply_environment()
