"""Model optimization: hyper-parameter sweeps, int8 quantization for CPU serving (weights: lmcore.model.int8), export.

Submodules are imported on demand (``lmcore.optimize.sweep`` pulls in Optuna and MLflow).
"""
