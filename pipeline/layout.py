"""Where everything lives under OUTPUT, and the few primitive writes the commit protocol needs.

```
OUTPUT/run.json                        run record (written once)
OUTPUT/plan.json                       the plan (written once)
OUTPUT/transcripts/shard-NNNNN.parquet one complete file per shard, deterministic name
OUTPUT/shards/NNNNN.json               completion record: the shard is done iff this (and its file) exists
OUTPUT/invocations/<start>-<tag>.json  one record per `run` invocation (start/finish time, for wall time)
OUTPUT/stats.json                      run statistics, rewritten at the end of each invocation
OUTPUT/lock.json                       the run lock: the live driver's heartbeat
OUTPUT/_staging/<invocation>/input/block-NNNNNN.parquet  the graph's input: pending manifest records
OUTPUT/_staging/<invocation>/input/ABORT                 the driver's staging failed: its error
OUTPUT/_staging/<invocation>/parts/NNNNN/<uuid>.parquet  a model call's rows of one shard, deleted at its commit
OUTPUT/_staging/.preflight-<uuid>      the storage preflight's write probe (object stores), deleted at once
OUTPUT/_tmp/                           local temporaries only
```

Everything goes through fsspec, so `s3://bucket/prefix` behaves like a local folder. Atomic writes: locally a
temporary under `_tmp/` then `os.replace`; on object stores a single PUT to the final key (an object appears only
when its upload completes, and `mv` there is copy + delete, so never rename). A write that finds the storage full
raises :class:`NoSpace`, naming OUTPUT; what it began leaves nothing at the final name.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import re
import uuid
from typing import Any

import fsspec

from whisper_batch.pipeline.secrets import redact_uri

logger = logging.getLogger(__name__)

_RECORD_NAME = re.compile(r"^(\d+)\.json$")
_SHARD_NAME = re.compile(r"^shard-(\d+)\.parquet$")
_INVOCATION_ID = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{6}$")  # plan.start_run's ids: UTC start time + random tag
STAGING = "_staging"
_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left; disk quota exceeded


class NoSpace(OSError):
    """OUTPUT's storage is full (no space left, or a quota reached); the message names OUTPUT and says how to go on."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # Ray pickles a worker's error: rebuilt from the message alone
        return type(self), (self.strerror,)


def is_no_space(error: BaseException | None) -> bool:
    """Whether ``error``, or one it wraps (its cause or context, a Ray task error's cause, or one whose text Ray
    relayed), is a :class:`NoSpace` of OUTPUT's writes. A bare ENOSPC is not: it may be another disk's (Ray's spill
    folder, a log), and every write to OUTPUT raises NoSpace."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, NoSpace) or "NoSpace: no space left on" in str(error):
            return True
        error = error.__cause__ or error.__context__ or getattr(error, "cause", None)
    return False


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


class RunLayout:
    """Path templates and the fsspec filesystem of one OUTPUT location."""

    def __init__(self, output_uri: str, storage_options: dict[str, Any] | None = None):
        self.output_uri = output_uri
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(output_uri, **self.storage_options)
        self.is_local = is_local_fs(self.fs)
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")

    def __repr__(self) -> str:
        return f"RunLayout({self.display_uri!r})"

    def __getstate__(self) -> dict:
        # Ray pickles the layout into workers; the filesystem object is rebuilt there
        return {"output_uri": self.output_uri, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["output_uri"], state["storage_options"])

    @property
    def display_uri(self) -> str:
        return redact_uri(self.output_uri)

    def no_space(self, path: str | None = None) -> NoSpace:
        """The error of a write to ``path`` (or, unknown, somewhere) under OUTPUT that found the storage full."""
        where = f" (writing {self.relative(path)})" if path else ""
        return NoSpace(
            f"no space left on {self.display_uri}{where}: free space there and run the same command again to resume "
            f"(committed shards are kept; a shard whose commit failed is redone)"
        )

    # --- path templates (all absolute paths on self.fs) ---

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def relative(self, path: str) -> str:
        """``path`` relative to OUTPUT (as messages and completion records name files)."""
        return path[len(self.root) + 1 :] if path.startswith(self.root + "/") else path

    @property
    def run_json(self) -> str:
        return self.path("run.json")

    @property
    def plan_json(self) -> str:
        return self.path("plan.json")

    @property
    def stats_json(self) -> str:
        return self.path("stats.json")

    @property
    def transcripts_dir(self) -> str:
        return self.path("transcripts")

    @property
    def shards_dir(self) -> str:
        return self.path("shards")

    @property
    def invocations_dir(self) -> str:
        return self.path("invocations")

    @property
    def tmp_dir(self) -> str:
        return self.path("_tmp")

    @property
    def lock_json(self) -> str:
        return self.path("lock.json")

    def invocation_file(self, invocation_id: str) -> str:
        return self.path("invocations", f"{invocation_id}.json")

    def remove_tree(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def staging_dir(self, invocation_id: str) -> str:
        """Worker-visible scratch of one invocation: input blocks and per-shard part files (never read as output)."""
        return self.path(STAGING, invocation_id)

    def input_block(self, invocation_id: str, block: int) -> str:
        """An input block of the graph: manifest records of whole pending shards, written by the driver."""
        return self.path(STAGING, invocation_id, "input", f"block-{block:06d}.parquet")

    def staging_abort(self, invocation_id: str) -> str:
        """Written beside the input blocks when the driver's staging fails (its error): readers stop waiting."""
        return self.path(STAGING, invocation_id, "input", "ABORT")

    def new_part_file(self, invocation_id: str, shard_id: int) -> str:
        """A fresh name for a part file: some rows of one shard, written by a model actor, merged at the commit."""
        return self.path(STAGING, invocation_id, "parts", f"{shard_id:05d}", f"{uuid.uuid4().hex}.parquet")

    @staticmethod
    def preflight_probe(root: str) -> str:
        """A fresh name for the storage preflight's write probe under the OUTPUT path ``root`` (on the preflight's own
        filesystem, before any layout exists)."""
        return posixpath.join(root.rstrip("/"), STAGING, f".preflight-{uuid.uuid4().hex}")

    def list_staged_invocations(self) -> list[str]:
        """Invocation ids that have a folder under ``_staging/`` (not the storage preflight's ``.preflight-*``
        probes), in start order."""
        return sorted(n for n in self._list_names(self.path(STAGING)) if _INVOCATION_ID.match(n))

    @staticmethod
    def shard_file_name(shard_id: int) -> str:
        """Path of a shard's data file relative to OUTPUT (as stored in its completion record)."""
        return f"transcripts/shard-{shard_id:05d}.parquet"

    @staticmethod
    def shard_of_file_name(name: str) -> int | None:
        """The shard whose data file is named ``name`` in transcripts/ (exactly as :meth:`shard_file_name` names it),
        else None."""
        m = _SHARD_NAME.match(name)
        return int(m.group(1)) if m and name == f"shard-{int(m.group(1)):05d}.parquet" else None

    @staticmethod
    def shard_of_record_name(name: str) -> int | None:
        """The shard whose completion record is named ``name`` in shards/ (exactly as :meth:`record_file` names it),
        else None."""
        m = _RECORD_NAME.match(name)
        return int(m.group(1)) if m and name == f"{int(m.group(1)):05d}.json" else None

    def shard_file(self, shard_id: int) -> str:
        return self.path(self.shard_file_name(shard_id))

    def record_file(self, shard_id: int) -> str:
        return self.path("shards", f"{shard_id:05d}.json")

    # --- listing ---

    def list_names(self, folder: str) -> list[str]:
        """Names of the entries (files and folders) in ``folder``, which may be missing (no entries)."""
        return self._list_names(folder)

    def _list_names(self, folder: str) -> list[str]:
        # other processes (Ray workers) commit here: never answer from a stale listings cache
        self.fs.invalidate_cache(folder)
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []

    def list_recorded_shards(self) -> set[int]:
        """Shard ids with a completion record (one listing of shards/)."""
        return {int(m.group(1)) for name in self._list_names(self.shards_dir) if (m := _RECORD_NAME.match(name))}

    def list_shard_files(self) -> set[int]:
        """Shard ids with a data file (one listing of transcripts/)."""
        names = self._list_names(self.transcripts_dir)
        return {int(m.group(1)) for name in names if (m := _SHARD_NAME.match(name))}

    def list_done_shards(self) -> set[int]:
        """Done shards: a completion record and a data file both exist (two listings)."""
        return self.list_recorded_shards() & self.list_shard_files()

    # --- reads and writes ---

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        return self.fs.exists(path)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def read_json_many(self, paths: list[str]) -> list[Any]:
        """Reads many JSON files; async filesystems (s3) fetch them concurrently."""
        if not paths:
            return []
        data = self.fs.cat(paths, on_error="raise")
        return [json.loads(data[p]) for p in paths]

    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomically creates or replaces `path`: readers see the old content or all of the new, never part.

        Raises:
            NoSpace: the storage is full; `path` is as it was.
        """
        try:
            self._write_bytes(path, data)
        except OSError as e:
            if e.errno in _FULL and not isinstance(e, NoSpace):
                raise self.no_space(path) from e
            raise

    def _write_bytes(self, path: str, data: bytes) -> None:
        if not self.is_local:
            self.fs.pipe_file(path, data)  # one PUT to the final key
            return
        tmp = self._local_tmp(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def create_bytes(self, path: str, data: bytes) -> bool:
        """Exclusive create: writes `path` only if absent; returns False when it already existed.

        Raises:
            NoSpace: the storage is full; `path` is as it was.
        """
        try:
            return self._create_bytes(path, data)
        except OSError as e:
            if e.errno in _FULL and not isinstance(e, NoSpace):
                raise self.no_space(path) from e
            raise

    def _create_bytes(self, path: str, data: bytes) -> bool:
        if self.is_local:
            tmp = self._local_tmp(path)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.link(tmp, path)  # atomic, fails if path exists, and the content is complete when it appears
                return True
            except FileExistsError:
                return False
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        try:
            with self.fs.open(path, "xb") as f:  # s3fs: PUT with If-None-Match
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):
            logger.warning("%s has no exclusive create; falling back to exists-then-write", self.fs.protocol)
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True

    def write_json(self, path: str, obj: Any, exclusive: bool = False) -> bool:
        data = (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()
        if exclusive:
            return self.create_bytes(path, data)
        self.write_bytes(path, data)
        return True

    def _local_tmp(self, path: str) -> str:
        os.makedirs(self.tmp_dir, exist_ok=True)
        return os.path.join(self.tmp_dir, f"{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
