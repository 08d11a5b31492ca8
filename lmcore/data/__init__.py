"""Data: connectors (sources), cleaning, Great Expectations validation, DVC versions, the tokenizer, prepare.

The pipeline is ``lmcore.data.ingest``: read -> clean -> validate -> version. Record schema
everywhere: ``id`` (sha256 of the normalised text), ``text``, ``source``, ``uri``,
``created_at`` (UTC timestamp) and ``meta`` (a JSON string mapping).
"""

RECORD_COLUMNS = ("id", "text", "source", "uri", "created_at", "meta")
