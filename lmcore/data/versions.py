"""The data registry: append-only Parquet shards tracked by DVC, and a catalogue of dataset versions.

Layout in the workspace (the folder holding ``params.yaml``)::

    data/raw/shard-<utc>-<rand>.parquet    accepted ingested records (kind "raw")
    data/feedback/shard-...parquet         harvested feedback records (kind "feedback")
    data/raw.dvc, data/feedback.dvc        DVC pointers (one .dir hash per kind)
    data/versions.jsonl                    the catalogue: one DatasetVersion per line, newest last
    data/quarantine/*.parquet              rejected rows + the expectations they failed (not versioned)
    data/.staging/                         shards being written (moved into place under the lock)

A *version* is every shard of every kind at one moment. Its id is the first 12 hex digits of the
md5 of the DVC ``.dir`` hashes of its kinds (``"feedback:<md5>\\nraw:<md5>"``), so the same data
has the same id everywhere. Each ``add_shard`` makes a new version and pushes it to the default
remote, a local folder in the lmops home (``.dvc/config.local``; a team remote configured in
``.dvc/config`` with ``core.remote`` wins). Any earlier version reads back exactly from the DVC
cache through the ``.dir`` manifest recorded for it; when the cache lacks it (fresh clone) the
error says to run ``dvc pull`` or to re-ingest.

Git: when ``data.git_commit`` is true and the workspace is a git repo, lmops commits only the
registry's own files (``data/*.dvc``, ``data/versions.jsonl``, ``data/.gitignore`` and the DVC
setup files) as ``lmops: dataset <id>``; ``git_rev`` is resolved from that commit. When false,
lmops never commits and ``git_rev`` is null.

Atomicity: writers hold ``.dvc/tmp/lmops-registry.lock`` (flock; released if the process dies).
The catalogue line is written last (temp file + rename), so a writer killed mid-way leaves the
previous version current and readable; the next writer (``ensure_initialized``) puts back the
``.dvc`` pointers of the current version and removes shards no version names.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from dvc.repo import Repo

from lmcore.config import DataParams, from_dict
from lmcore.data import RECORD_COLUMNS
from lmcore.data.served import split_served
from lmcore.errors import LmopsError
from lmcore.locks import file_lock
from lmcore.services import pid_alive as _alive
from lmcore.settings import get_settings

KINDS = ("raw", "feedback", "chat", "preference")
TEXT_KINDS = ("raw", "feedback", "chat")  # what SFT trains on; preference pairs are read by the DPO stage and the gate
CATALOG = "data/versions.jsonl"
QUARANTINE = "data/quarantine"
STAGING = "data/.staging"
# Shard Parquet codec: ids are hex sha256, which zstd stores in half the bytes snappy needs, so DVC
# hashes, caches and pushes half as much (and writing costs about the same).
COMPRESSION = "zstd"


@dataclass(frozen=True)
class DatasetVersion:
    """One dataset version: all shards of all kinds at one moment.

    ``rows``/``bytes``/``sources`` describe the whole version; ``accepted``/``quarantined``/
    ``skipped_known`` the batch that made it (``kind`` says which: "ingest" or "feedback").
    ``dirs`` maps a shard kind to DVC's ``{"md5": "<hash>.dir", "size", "nfiles"}``.
    """

    id: str
    created_at: str
    kind: str
    rows: int
    bytes: int
    sources: dict[str, int]
    accepted: int
    quarantined: int
    git_rev: str | None
    shards: tuple[str, ...]
    dirs: dict[str, dict] = field(default_factory=dict)
    parent: str | None = None
    skipped_known: int = 0
    rows_by_kind: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards"] = list(self.shards)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetVersion:
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        d["shards"] = tuple(d.get("shards", ()))
        return cls(**d)


def version_id(dirs: dict[str, dict]) -> str:
    payload = "\n".join(f"{k}:{dirs[k]['md5']}" for k in sorted(dirs))
    return hashlib.md5(payload.encode()).hexdigest()[:12]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _quiet_dvc() -> Any:
    """``dvc.repo.Repo`` with DVC's INFO chatter off (it logs to stdout, which ``--json`` owns)."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")

    for name in ("dvc", "dvc_data", "dvc_objects"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return Repo


class DataRegistry:
    """Dataset versions of one workspace, with DVC state and its default remote in ``home``."""

    def __init__(self, workspace: Path, home: Path, git_commit: bool = False) -> None:
        self.workspace = Path(workspace).resolve()
        self.home = Path(home).resolve()
        self.git_commit = git_commit

    @classmethod
    def open(cls, settings: Any = None, git_commit: bool | None = None) -> DataRegistry:
        """The registry of the current workspace (``lmcore.settings.get_settings()``)."""
        settings = settings or get_settings()
        if git_commit is None:
            git_commit = False
            with contextlib.suppress(LmopsError):
                if settings.params_path.is_file():
                    raw = yaml.safe_load(settings.params_path.read_text(encoding="utf-8")) or {}
                    git_commit = from_dict(DataParams, raw.get("data"), "data").git_commit
        return cls(settings.workspace, settings.home, git_commit=git_commit)

    # -- paths ------------------------------------------------------------------------------

    @property
    def catalog_path(self) -> Path:
        return self.workspace / CATALOG

    @property
    def quarantine_dir(self) -> Path:
        return self.workspace / QUARANTINE

    @property
    def staging_dir(self) -> Path:
        return self.workspace / STAGING

    @property
    def remote_dir(self) -> Path:
        return self.home / "dvc-remote"

    def kind_dir(self, kind: str) -> Path:
        return self.workspace / "data" / kind

    def staging_path(self, suffix: str = ".parquet") -> Path:
        """A fresh staging file name (pid-tagged, so recovery never removes a live writer's file)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return self.staging_dir / f"{os.getpid()}-{secrets.token_hex(6)}{suffix}"

    @property
    def is_git(self) -> bool:
        return (self.workspace / ".git").exists()

    # -- setup ------------------------------------------------------------------------------

    def ensure_initialized(self) -> None:
        """``dvc init`` if needed (``--no-scm`` outside git), local config, then crash recovery."""
        Repo = _quiet_dvc()  # noqa: N806

        self.home.mkdir(parents=True, exist_ok=True)
        with file_lock(self.home / "locks" / "dvc-init.lock"):  # two first runs at once: one inits
            if not (self.workspace / ".dvc").is_dir():
                try:
                    Repo.init(str(self.workspace), no_scm=not self.is_git)
                except Exception as e:
                    raise LmopsError(f"dvc init failed in {self.workspace}: {str(e).splitlines()[0]}") from None
            self.remote_dir.mkdir(parents=True, exist_ok=True)
            self._write_local_config()
        for kind in KINDS:
            self.kind_dir(kind).mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._recover()

    def _write_local_config(self) -> None:
        shared = configparser.ConfigParser()
        shared.read(self.workspace / ".dvc" / "config")
        has_team_remote = shared.has_option("core", "remote")
        path = self.workspace / ".dvc" / "config.local"
        cfg = configparser.ConfigParser()
        cfg.read(path)
        want = {("core", "analytics"): "false", ("core", "site_cache_dir"): str(self.home / "dvc-site-cache")}
        if not has_team_remote:
            want[("core", "remote")] = "lmops"
            want[('remote "lmops"', "url")] = str(self.remote_dir)
        changed = False
        for (section, key), value in want.items():
            if not cfg.has_section(section):
                cfg.add_section(section)
            if cfg.get(section, key, fallback=None) != value:
                cfg.set(section, key, value)
                changed = True
        if changed:
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                cfg.write(f)
            os.replace(tmp, path)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        lock_dir = self.workspace / ".dvc" / "tmp"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / "lmops-registry.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- the catalogue ----------------------------------------------------------------------

    def _catalog(self) -> list[DatasetVersion]:
        if not self.catalog_path.is_file():
            return []
        out = []
        for i, line in enumerate(self.catalog_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(DatasetVersion.from_dict(json.loads(line)))
            except (ValueError, TypeError) as e:
                raise LmopsError(f"{self.catalog_path} line {i} is not a dataset version: {e}") from None
        return out

    def versions(self) -> list[DatasetVersion]:
        """Every version, oldest first (``git_rev`` filled from lmops commits when in git)."""
        found = self._catalog()
        if not found or not self.is_git:
            return found
        revs = self._git_revs()
        return [DatasetVersion.from_dict({**v.to_dict(), "git_rev": revs.get(v.id, v.git_rev)}) for v in found]

    def current(self) -> DatasetVersion | None:
        found = self.versions()
        return found[-1] if found else None

    def get(self, version_id: str) -> DatasetVersion:
        """A version by id or unique id prefix."""
        found = self.versions()
        hits = [v for v in found if v.id == version_id] or [v for v in found if v.id.startswith(version_id)]
        if not hits:
            known = ", ".join(v.id for v in found[-5:]) or "none yet: run `lmops ingest`"
            raise LmopsError(f"unknown dataset version '{version_id}' (latest: {known})")
        if len({v.id for v in hits}) > 1:
            raise LmopsError(f"dataset version prefix '{version_id}' is ambiguous")
        return hits[-1]

    def _git_revs(self) -> dict[str, str]:
        try:
            out = subprocess.run(["git", "log", "--format=%H %s", "--grep=^lmops: dataset "], cwd=self.workspace,
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        revs: dict[str, str] = {}
        for line in out.stdout.splitlines():
            sha, _, subject = line.partition(" ")
            if subject.startswith("lmops: dataset "):
                revs.setdefault(subject.split()[-1], sha)
        return revs

    # -- reading ----------------------------------------------------------------------------

    def _cache_root(self) -> Path:
        root = self.workspace / ".dvc" / "cache"
        for name in ("config", "config.local"):
            cfg = configparser.ConfigParser()
            cfg.read(self.workspace / ".dvc" / name)
            if cfg.has_option("cache", "dir"):
                root = (self.workspace / ".dvc" / cfg.get("cache", "dir")).resolve()
        return root / "files" / "md5"

    def _cache_file(self, md5: str) -> Path:
        return self._cache_root() / md5[:2] / md5[2:]

    def _files(self, version: DatasetVersion, kinds: tuple[str, ...]) -> list[tuple[str, Path]]:
        """``(kind/relpath, cache path)`` of every shard of a version, checked present in the cache."""
        out: list[tuple[str, Path]] = []
        missing = 0
        for kind in kinds:
            info = version.dirs.get(kind)
            if not info:
                continue
            manifest = self._cache_file(info["md5"])
            if not manifest.is_file():
                missing += int(info.get("nfiles") or 1)
                continue
            for entry in sorted(json.loads(manifest.read_text()), key=lambda e: e["relpath"]):
                path = self._cache_file(entry["md5"])
                if not path.is_file():
                    missing += 1
                out.append((f"{kind}/{entry['relpath']}", path))
        if missing:
            raise LmopsError(
                f"dataset version {version.id} is not in the DVC cache ({missing} file(s) missing): "
                f"run `dvc pull` (remote: {self._remote_url()}) or re-ingest with `lmops ingest`")
        return out

    def _remote_url(self) -> str:
        cfg = configparser.ConfigParser()
        for name in ("config", "config.local"):
            cfg.read(self.workspace / ".dvc" / name)
        name = cfg.get("core", "remote", fallback=None)
        return cfg.get(f'remote "{name}"', "url", fallback="none configured") if name else "none configured"

    def _resolve(self, version_id: str | None) -> DatasetVersion | None:
        if version_id is None:
            return self.current()
        return self.get(version_id)

    def read(self, version_id: str | None = None, kinds: tuple[str, ...] = KINDS) -> Any:
        """The records of a version (default: current), exactly as versioned, shard by shard."""
        v = self._resolve(version_id)
        if v is None:
            return pd.DataFrame({c: pd.Series([], dtype="str") for c in RECORD_COLUMNS})
        tables = [pq.read_table(p) for _, p in self._files(v, kinds)]
        if not tables:
            return pd.DataFrame({c: pd.Series([], dtype="str") for c in RECORD_COLUMNS})

        return pa.concat_tables(tables, promote_options="default").to_pandas().reset_index(drop=True)

    def iter_records(self, version_id: str | None = None,
                     kinds: tuple[str, ...] = TEXT_KINDS) -> Iterator[tuple[str, str, str | None]]:
        """``(id, text, split_hint)`` of a version in a stable order, streaming (for ``prepare_dataset``).

        The hint is the ``split`` a feedback record's meta carries (train / holdout / negative),
        None for ingested text. A feedback record whose meta marks where its prompt ends comes as a
        served document (:mod:`lmcore.data.served`), so its prompt is masked out of the loss.
        """
        v = self._resolve(version_id)
        if v is None:
            return
        for rel, path in self._files(v, kinds):
            kind = rel.split("/", 1)[0]
            columns = ["id", "text", "meta"] if kind == "feedback" else ["id", "text"]
            for rb in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=65536):
                ids, texts = rb.column(0).to_pylist(), rb.column(1).to_pylist()
                if kind != "feedback":
                    yield from ((rid, text, None) for rid, text in zip(ids, texts, strict=True))
                    continue
                for rid, text, meta in zip(ids, texts, map(_meta_dict, rb.column(2).to_pylist()), strict=True):
                    yield rid, split_served(text, meta), split_hint(meta)

    def known_ids(self, include_quarantine: bool = True) -> set[str]:
        """Ids in the current version, plus rows quarantined for a row-level reason (no re-flood)."""
        ids: set[str] = set()
        v = self.current()
        if v is not None:
            for _, path in self._files(v, KINDS):
                ids.update(pq.read_table(path, columns=["id"]).column(0).to_pylist())
        if include_quarantine and self.quarantine_dir.is_dir():
            for path in sorted(self.quarantine_dir.glob("*.parquet")):
                with contextlib.suppress(Exception):
                    t = pq.read_table(path, columns=["id", "reasons"]).to_pandas()
                    ids.update(t.loc[t["reasons"] != "batch_refused", "id"].dropna().tolist())
        return ids

    # -- writing ----------------------------------------------------------------------------

    def add_shard(self, df: Any, kind: str, stats: dict | None = None) -> DatasetVersion:
        """Version ``df`` (record schema) as a new shard of ``kind``; returns the new version."""
        staged = self.staging_path()
        table = pa.Table.from_pandas(df, preserve_index=False, schema=shard_schema())
        pq.write_table(table, staged, compression=COMPRESSION)
        return self.add_shard_file(staged, kind, stats or {})

    def add_shard_file(self, staged: Path, kind: str, stats: dict) -> DatasetVersion:
        """Move a staged Parquet shard into ``data/<kind>/``, ``dvc add`` + push, record the version."""
        if kind not in KINDS:
            raise LmopsError(f"unknown shard kind '{kind}' (choose from {', '.join(KINDS)})")
        self.ensure_initialized()
        meta = pq.read_metadata(staged)
        n_new = meta.num_rows
        src_counts = dict(stats.get("sources") or {})
        with self._lock():
            self._recover()
            prev = self.current()
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            dest = self.kind_dir(kind) / f"shard-{stamp}-{secrets.token_hex(4)}.parquet"
            dvc_file = self.workspace / "data" / f"{kind}.dvc"
            old_pointer = dvc_file.read_text() if dvc_file.exists() else None
            os.replace(staged, dest)
            repo = None
            try:
                repo = self._repo()
                info = self._dvc_add(repo, kind)
                dirs = dict(prev.dirs) if prev else {}
                dirs[kind] = info
                vid = version_id(dirs)
                rows_by_kind = dict(prev.rows_by_kind) if prev else {}
                rows_by_kind[kind] = rows_by_kind.get(kind, 0) + n_new
                sources = dict(prev.sources) if prev else {}
                for s, n in src_counts.items():
                    sources[s] = sources.get(s, 0) + int(n)
                shards = tuple(sorted({*(prev.shards if prev else ()), str(dest.relative_to(self.workspace))}))
                version = DatasetVersion(
                    id=vid, created_at=_now(), kind="feedback" if kind == "feedback" else "ingest",
                    rows=sum(rows_by_kind.values()),
                    bytes=sum(int(d.get("size") or 0) for d in dirs.values()),
                    sources=sources, accepted=int(stats.get("accepted", n_new)),
                    quarantined=int(stats.get("quarantined", 0)), git_rev=None, shards=shards, dirs=dirs,
                    parent=prev.id if prev else None, skipped_known=int(stats.get("skipped_known", 0)),
                    rows_by_kind=rows_by_kind,
                    stats={k: v for k, v in stats.items()
                           if k not in ("sources", "accepted", "quarantined", "skipped_known")},
                )
                self._push(repo, kind)
                self._append(version)
            except BaseException:
                with contextlib.suppress(OSError):
                    dest.unlink()
                if old_pointer is None:
                    with contextlib.suppress(OSError):
                        dvc_file.unlink()
                else:
                    dvc_file.write_text(old_pointer)
                raise
            finally:
                if repo is not None:
                    repo.close()
            if self.git_commit and self.is_git:
                self._git_commit(version.id)
        return self.get(version.id)

    def _repo(self) -> Any:
        """One DVC repo object for an add and its push (opening one costs more than a small add)."""
        Repo = _quiet_dvc()  # noqa: N806

        try:
            return Repo(str(self.workspace))
        except Exception as e:
            raise LmopsError(f"cannot open the DVC repo in {self.workspace}: {str(e).splitlines()[0]}") from None

    def _dvc_add(self, repo: Any, kind: str) -> dict:
        try:
            repo.add([str(self.kind_dir(kind))])
        except Exception as e:
            raise LmopsError(f"dvc add data/{kind} failed: {str(e).splitlines()[0]}") from None
        return self._pointer(kind)

    def _pointer(self, kind: str) -> dict:
        path = self.workspace / "data" / f"{kind}.dvc"
        if not path.is_file():
            return {}
        out = (yaml.safe_load(path.read_text()) or {}).get("outs", [{}])[0]
        return {"md5": out.get("md5"), "size": out.get("size"), "nfiles": out.get("nfiles")}

    def _push(self, repo: Any, kind: str) -> None:
        try:
            repo.push(targets=[str(self.workspace / "data" / f"{kind}.dvc")])
        except Exception as e:
            raise LmopsError(f"dvc push of data/{kind} to {self._remote_url()} failed: "
                             f"{str(e).splitlines()[0]}") from None

    def _append(self, version: DatasetVersion) -> None:
        self.catalog_path.parent.mkdir(parents=True, exist_ok=True)
        old = self.catalog_path.read_text(encoding="utf-8") if self.catalog_path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        tmp = self.catalog_path.with_name(f".{self.catalog_path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(old + json.dumps(version.to_dict(), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.catalog_path)

    def _recover(self) -> None:
        """Undo what a killed writer left: pointers back to the current version, orphan shards gone."""
        current = self.current()
        named = set(current.shards) if current else set()
        for kind in KINDS:
            folder = self.kind_dir(kind)
            if folder.is_dir():
                for p in folder.glob("shard-*.parquet"):
                    if str(p.relative_to(self.workspace)) not in named:
                        p.unlink()
            dvc_file = self.workspace / "data" / f"{kind}.dvc"
            want = current.dirs.get(kind) if current else None
            have = self._pointer(kind)
            if want and have.get("md5") != want.get("md5"):
                dvc_file.write_text(_pointer_text(kind, want))
            elif not want and dvc_file.exists():
                dvc_file.unlink()
        if self.staging_dir.is_dir():
            for p in self.staging_dir.iterdir():
                pid = p.name.split("-", 1)[0]
                if pid.isdigit() and not _alive(int(pid)):
                    with contextlib.suppress(OSError):
                        p.unlink()
        for tmp in self.catalog_path.parent.glob(f".{self.catalog_path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _git_commit(self, vid: str) -> None:
        paths = [CATALOG, "data/.gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore"]
        paths += [f"data/{k}.dvc" for k in KINDS]
        paths = [p for p in paths if (self.workspace / p).exists()]
        env = dict(os.environ)
        probe = subprocess.run(["git", "config", "user.email"], cwd=self.workspace, capture_output=True, text=True)
        if not probe.stdout.strip():
            env.update(GIT_AUTHOR_NAME="lmops", GIT_AUTHOR_EMAIL="lmops@localhost",
                       GIT_COMMITTER_NAME="lmops", GIT_COMMITTER_EMAIL="lmops@localhost")
        for cmd in (["git", "add", "--", *paths],
                    ["git", "commit", "--quiet", "--no-verify", "-m", f"lmops: dataset {vid}", "--", *paths]):
            r = subprocess.run(cmd, cwd=self.workspace, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                msg = (r.stderr or r.stdout).strip().splitlines()
                raise LmopsError(f"git commit of dataset {vid} failed: {msg[-1] if msg else r.returncode} "
                                 "(the version is recorded; commit data/*.dvc and data/versions.jsonl yourself)")

    def check(self) -> list[str]:
        """Problems between the catalogue, the ``.dvc`` pointers and the cache (empty = consistent)."""
        problems = []
        current = self.current()
        for kind in KINDS:
            want = (current.dirs.get(kind) or {}).get("md5") if current else None
            have = self._pointer(kind).get("md5")
            if want != have:
                problems.append(f"data/{kind}.dvc points at {have} but the current version has {want}")
        if current:
            try:
                self._files(current, KINDS)
            except LmopsError as e:
                problems.append(str(e))
        return problems


def _pointer_text(kind: str, info: dict) -> str:
    return ("outs:\n"
            f"- md5: {info['md5']}\n"
            f"  size: {info.get('size') or 0}\n"
            f"  nfiles: {info.get('nfiles') or 0}\n"
            "  hash: md5\n"
            f"  path: {kind}\n")


def _meta_dict(meta: str | dict | None) -> dict:
    """A record's meta as a dict ({} if none or unreadable)."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta else {}
        except ValueError:
            return {}
    return meta if isinstance(meta, dict) else {}


def split_hint(meta: str | dict | None) -> str | None:
    """The ``split`` a record's meta names (feedback: train / holdout / negative), None if none or unreadable."""
    return _meta_dict(meta).get("split")


def shard_schema() -> Any:
    """Arrow schema of every shard: the record schema, ``created_at`` a UTC timestamp."""
    return pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("uri", pa.string()),
                      ("created_at", pa.timestamp("us", tz="UTC")), ("meta", pa.string())])
