"""Training: the loop (``loop``: setup / resume / step / finish), optimizers, evaluation, and the
DVC stage entry points (``stages``: ``python -m lmcore.training.stages <stage>``)."""
