"""Model optimization: hyper-parameter sweeps, int8 dynamic quantization for CPU serving, export.

Submodules are imported on demand (``lmcore.optimize.sweep`` pulls in Optuna and MLflow).
"""
