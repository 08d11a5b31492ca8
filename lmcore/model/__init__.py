"""The model: the decoder (``transformer``), its one incremental-decoding path (``decode``: KV slots,
an eager or compiled step) used by ``generate``, the server and int8 models, checkpoints, the
Hugging Face mapping (``hf``) and int8 weights (``int8``)."""
