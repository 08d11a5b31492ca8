"""The model registry: MLflow tracking (``tracking``), model versions and aliases (``models``), the
gate as a pure decision (``gate``), the pyfunc flavour (``pyfunc``, ``pyfunc_entry``) and reports."""
