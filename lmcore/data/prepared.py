"""Which prepared-data folder a command trains or evaluates on: one answer for every caller.

``lmops train``/``lmops evaluate`` (``lmcore.cli.train_cmds``), the hyper-parameter sweep
(``lmcore.optimize.sweep``) and the DVC stages (``lmcore.training.stages``) all ask here. The order:

1. ``data`` is a prepared folder (it has ``meta.json``): that folder.
2. ``data`` is a text file or a folder of text files: prepared once, with dataset version
   ``files-<hash of its records>``, into ``text_dir`` when the caller names one (``lmops train``
   keeps it in its run folder, reused on ``--resume`` so a resumed run keeps its tokenizer),
   else into ``<home>/runs/prepared/text-<hash>`` (keyed on the files and the prepare params).
3. no ``data``: the data registry's current version, prepared into the training flow's folder
   (:func:`lmcore.data.prepare.prepared_dir`), so ``lmops run``, ``lmops train`` and a sweep see the
   same tokens;
4. no version in the registry: the workspace's ``data/prepared`` (the DVC ``prepare`` stage's
   output, :data:`WORKSPACE_PREPARED`) if it holds prepared data;
5. otherwise a one-line error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lmcore.data.prepare import (
    META,
    load_prepared,
    params_tokenizer,
    prepare_dataset,
    prepare_key,
    prepared_dir,
    read_text_source,
    training_kinds,
)
from lmcore.data.versions import DataRegistry
from lmcore.errors import LmopsError
from lmcore.locks import file_lock
from lmcore.settings import get_settings

WORKSPACE_PREPARED = Path("data/prepared")  # relative to the workspace; dvc.yaml's prepare output


def workspace_prepared(workspace: Path | None = None) -> Path:
    """The workspace's ``data/prepared`` (``workspace`` default: the settings' workspace)."""
    if workspace is None:
        workspace = get_settings().workspace
    return Path(workspace) / WORKSPACE_PREPARED


def is_prepared(folder: Path) -> bool:
    return (Path(folder) / META).is_file()


def current_dataset(registry: Any, hint: str = "") -> Any:
    """The registry's current dataset version; a one-line error naming the fix when there is none."""
    current = registry.current()
    if current is None:
        raise LmopsError(f"no dataset version yet: run `lmops ingest PATH...` (or `dvc pull` in a clone) first{hint}")
    return current


def text_dataset_version(records: Iterable[tuple]) -> str:
    """``files-<hash>``: the dataset version of text read from files, a hash of its record ids."""
    return "files-" + hashlib.sha256("".join(r[0] for r in records).encode()).hexdigest()[:12]


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _prepare_once(out: Path, records: Callable[[], Iterable[tuple]], params: Any,
                  version: Callable[[Any], str | None]) -> None:
    """Prepare into ``out`` unless a complete folder is there; one process at a time per folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{out.name}.lock"):
        if not is_prepared(out):
            recs = records()
            prepare_dataset(recs, out, params.tokenizer, params.prepare, dataset_version=version(recs),
                            tokenizer=params_tokenizer(params))


def resolve_prepared(data: str | Path | None, params: Any, *, text_dir: Path | None = None,
                     resume: bool = False) -> tuple[Path, str | None]:
    """A prepared folder and its dataset version, by the order in the module doc (preparing if needed).

    ``text_dir``: where text ``data`` is prepared (default: a content-keyed folder under the
    home, reused while complete); an explicit ``text_dir`` is re-prepared unless ``resume``.
    """
    if data is not None:
        path = Path(data)
        if path.is_dir() and is_prepared(path):
            return path, load_prepared(path).dataset_version
        if not path.exists():
            raise LmopsError(f"corpus not found: {path}")
        if text_dir is None:
            stamp = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                             for p in sorted([path] if path.is_file() else path.rglob("*")) if p.is_file())
            prep_hash = prepare_key("text", params)  # the prepare + tokenizer params, and a base's tokenizer
            out = get_settings().runs_dir / "prepared" / f"text-{_key('text', str(path.resolve()), stamp, prep_hash)}"
            _prepare_once(out, lambda: list(read_text_source(path)), params, text_dataset_version)
            return out, load_prepared(out).dataset_version
        out = Path(text_dir)
        if resume and is_prepared(out):
            return out, load_prepared(out).dataset_version
        records = list(read_text_source(path))
        prepared = prepare_dataset(records, out, params.tokenizer, params.prepare,
                                   dataset_version=text_dataset_version(records), tokenizer=params_tokenizer(params))
        return prepared.dir, prepared.dataset_version

    registry = DataRegistry.open()
    current = registry.current()
    if current is not None:
        kinds = training_kinds(current, params)
        out = prepared_dir(current.id, params, kinds)  # the training flow's prepared folder
        _prepare_once(out, lambda: registry.iter_records(current.id, kinds), params, lambda _: current.id)
        return out, current.id
    fallback = workspace_prepared()
    if is_prepared(fallback):
        return fallback, load_prepared(fallback).dataset_version
    raise LmopsError(f"no dataset version yet and no prepared data in {fallback}: run `lmops ingest PATH...` "
                     "first, or pass --data PATH (a text file, a folder of text files or a prepared folder)")
