"""``whisper-batch verify OUTPUT [--repair]``: does a run's output hold what ``run`` promises? And the repair after
which the same ``run`` command redoes exactly what is damaged.

The checks, each finding one :class:`Problem` of a kind:

- every completion record in shards/ is readable JSON (``bad-record``) of a planned shard (``unplanned``);
- its shard file is there (``missing``), has the recorded size and sha256 (a record written before checksums were
  recorded has neither: an info line), reads as Parquet with the recorded row count, and holds exactly the plan's
  rows of its shard, each once, under its shard id (``corrupt``);
- row ids are unique across the committed shards (``duplicate-id``);
- every file in transcripts/ is a committed shard's file: ``stray`` (a file no record names, e.g. a copy under
  another name, which Parquet readers of transcripts/ read too) or ``uncommitted`` (a pending shard's file whose
  commit never finished);
- no staging is left by invocations that have ended (``staging``: ``_staging/<invocation>``, the preflight's probes,
  ``_tmp/``). While a live run holds the lock, its staging and its commits in progress are not judged.

A shard without a record is pending, not a problem: the same ``run`` command does it.

Memory stays flat with the run's size: the records are read a chunk at a time, the shard files one at a time (a few
read ahead), only their ``id``, ``row_index`` and ``shard_id`` columns parsed, and per row only an 8-byte digest of
its id is kept, for the uniqueness check.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .layout import STAGING, RunLayout
from .plan import Plan
from .sink import parquet_source, read_invocations

logger = logging.getLogger(__name__)

# kinds whose repair un-commits the shard: its completion record is removed first, then its file
UNCOMMIT = ("bad-record", "unplanned", "missing", "corrupt", "duplicate-id")
_COLUMNS = ["id", "row_index", "shard_id"]
_RECORD_CHUNK = 512


class VerifyError(RuntimeError):
    """OUTPUT is not a whisper-batch output (no readable plan.json)."""


@dataclass(frozen=True)
class Problem:
    kind: str
    # relative to OUTPUT
    path: str
    detail: str
    shard: int | None = None

    def line(self) -> str:
        """One greppable line: ``PROBLEM kind [shard=N] path: detail``."""
        shard = "" if self.shard is None else f" shard={self.shard}"
        return f"PROBLEM {self.kind}{shard} {self.path}: {self.detail}"


@dataclass
class Verification:
    output: str
    n_shards: int
    n_rows: int
    # shards whose record and file check out, and their rows
    committed: int = 0
    rows: int = 0
    pending: list[int] = field(default_factory=list)
    # checked shards whose record has no checksum (committed by a version that recorded none)
    no_checksum: int = 0
    problems: list[Problem] = field(default_factory=list)
    # the live run's lock.json, when one holds OUTPUT
    live: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def info_lines(self) -> list[str]:
        lines = []
        if self.live:
            lines.append(
                f"INFO a run is live on {self.output} (host {self.live.get('host')}, pid "
                f"{self.live.get('pid')}): its staging and commits in progress are not judged"
            )
        if self.no_checksum:
            lines.append(
                f"INFO {self.no_checksum} shard(s) have no checksum recorded (committed before checksums "
                f"were recorded): checked by their row count and rows"
            )
        if self.pending:
            lines.append(
                f"INFO {len(self.pending)} shard(s) pending ({_ranges(self.pending)}): not committed yet; "
                f"the same `whisper-batch run` command does them"
            )
        return lines

    def summary(self) -> str:
        """``verify OUTPUT: ok|N problem(s) (kind n, ...); shards ...; rows ...``."""
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(Counter(p.kind for p in self.problems).items()))
        state = "ok" if self.ok else f"{len(self.problems)} problem(s) ({kinds})"
        return (
            f"verify {self.output}: {state}; {self.committed}/{self.n_shards} shards committed and sound, "
            f"{len(self.pending)} pending; {self.rows}/{self.n_rows} rows" + (", each once" if self.ok else "")
        )


def _ranges(shards: list[int], shown: int = 8) -> str:
    """``0-3, 7, 9-12`` for sorted shard ids, the first ``shown`` runs of them."""
    runs: list[list[int]] = []
    for s in shards:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:shown])
    return text + (", ..." if len(runs) > shown else "")


def read_plan(layout: RunLayout) -> Plan:
    """The run's plan; :class:`VerifyError` when OUTPUT holds none."""
    try:
        return Plan.from_dict(layout.read_json(layout.plan_json))
    except FileNotFoundError:
        raise VerifyError(f"{layout.display_uri} is not a whisper-batch output: no plan.json") from None
    except (ValueError, TypeError) as e:
        raise VerifyError(f"{layout.display_uri}: plan.json is unreadable ({type(e).__name__}: {e})") from None


def verify_output(layout: RunLayout, live: dict[str, Any] | None = None, read_ahead: int = 4) -> Verification:
    """Checks OUTPUT against its plan (see the module's docstring); ``live``: lock.json of a live run holding OUTPUT.

    Raises:
        VerifyError: OUTPUT is not a whisper-batch output.
        OSError: a file could not be read for another reason than its absence (storage unreachable, access denied).
    """
    plan = read_plan(layout)
    v = Verification(layout.display_uri, plan.n_shards, plan.n_rows, live=live)
    recorded = []
    for name in layout.list_names(layout.shards_dir):
        shard = layout.shard_of_record_name(name)
        if shard is None:
            v.problems.append(Problem("stray", f"shards/{name}", "not a completion record's name"))
        elif shard >= plan.n_shards:
            v.problems.append(Problem("unplanned", f"shards/{name}", f"the plan has {plan.n_shards} shards", shard))
        else:
            recorded.append(shard)
    recorded.sort()
    files = set(layout.list_names(layout.transcripts_dir))
    digests = array("Q")  # 8 bytes per committed row
    sound: dict[int, int] = {}  # shard -> rows, of the shards that check out
    for shard, record, data in _read_shards(layout, recorded, files, read_ahead):
        checked = _check_shard(layout, plan, shard, record, data, v)
        if isinstance(checked, Problem):
            v.problems.append(checked)
            continue
        digests.extend(checked)
        sound[shard] = len(checked)
    duplicates = _duplicate_ids(layout, list(sound), digests)
    for problem in duplicates:
        del sound[problem.shard]
    v.problems += duplicates
    v.committed, v.rows = len(sound), sum(sound.values())
    done = set(recorded)
    v.pending = [s for s in range(plan.n_shards) if s not in done]
    v.problems += _unrecorded_files(layout, plan, files, done, live)
    v.problems += _leftover_staging(layout, live)
    return v


def _read_records(layout: RunLayout, shards: list[int]) -> list[Any]:
    """The completion records of ``shards``; an unreadable one is its error."""
    paths = [layout.record_file(s) for s in shards]
    try:
        return layout.read_json_many(paths)
    except (ValueError, FileNotFoundError):  # one of them is damaged (or was removed just now): one by one
        out: list[Any] = []
        for path in paths:
            try:
                out.append(layout.read_json(path))
            except (ValueError, FileNotFoundError) as e:
                out.append(e)
        return out


def _read_file(layout: RunLayout, path: str) -> bytes | FileNotFoundError:
    try:
        return layout.read_bytes(path)
    except FileNotFoundError as e:
        return e


def _read_shards(
    layout: RunLayout, shards: list[int], files: set[str], read_ahead: int
) -> Iterator[tuple[int, Any, bytes | Exception | None]]:
    """(shard, its record or the record's error, its file's bytes, FileNotFoundError, or None when the record is
    unreadable) per shard, in order; up to ``read_ahead`` files are read ahead in threads (object stores)."""
    window: deque[tuple[int, Any, Future | Exception | None]] = deque()
    with ThreadPoolExecutor(max(1, read_ahead), thread_name_prefix="verify-read") as pool:
        for start in range(0, len(shards), _RECORD_CHUNK):
            chunk = shards[start : start + _RECORD_CHUNK]
            for shard, record in zip(chunk, _read_records(layout, chunk)):
                name = layout.shard_file_name(shard).rsplit("/", 1)[-1]
                if isinstance(record, Exception):
                    read = None
                elif name not in files:
                    read = FileNotFoundError(name)
                else:
                    read = pool.submit(_read_file, layout, layout.shard_file(shard))
                window.append((shard, record, read))
                while len(window) > read_ahead:
                    shard_, record_, read_ = window.popleft()
                    yield shard_, record_, read_.result() if isinstance(read_, Future) else read_
        while window:
            shard_, record_, read_ = window.popleft()
            yield shard_, record_, read_.result() if isinstance(read_, Future) else read_


def _id_digest(row_id: str | None) -> int:
    return int.from_bytes(hashlib.blake2b((row_id or "").encode(), digest_size=8).digest(), "little")


def _check_shard(
    layout: RunLayout, plan: Plan, shard: int, record: Any, data: bytes | Exception | None, v: Verification
) -> Problem | list[int]:
    """A committed shard's problem, or the digests of its row ids when it checks out."""
    rel = layout.shard_file_name(shard)
    if isinstance(record, Exception) or not isinstance(record, dict) or not isinstance(record.get("rows"), int):
        why = f"{type(record).__name__}: {record}" if isinstance(record, Exception) else "no row count"
        return Problem("bad-record", layout.relative(layout.record_file(shard)), f"unreadable ({why})", shard)
    if isinstance(data, Exception) or data is None:
        return Problem("missing", rel, f"committed ({layout.relative(layout.record_file(shard))}) but not there", shard)

    def corrupt(detail: str) -> Problem:
        return Problem("corrupt", rel, detail, shard)

    size, checksum = record.get("bytes"), record.get("sha256")
    if size is not None and size != len(data):
        return corrupt(f"{len(data)} bytes, its completion record says {size} (truncated or overwritten)")
    if checksum is None:
        v.no_checksum += 1
    elif hashlib.sha256(data).hexdigest() != checksum:
        return corrupt("its sha256 differs from its completion record's (the file changed after its commit)")
    try:
        table = pq.read_table(parquet_source(data), columns=_COLUMNS, use_threads=False)
    except (pa.ArrowException, OSError, ValueError, KeyError) as e:
        return corrupt(f"not readable as Parquet ({type(e).__name__}: {e})")
    if table.num_rows != record["rows"]:
        return corrupt(f"{table.num_rows} rows, its completion record says {record['rows']}")
    if wrong := _wrong_rows(plan, shard, table):
        return corrupt(wrong)
    return [_id_digest(i) for i in table.column("id").to_pylist()]


def _wrong_rows(plan: Plan, shard: int, table: pa.Table) -> str | None:
    """What differs between the file's rows and the plan's rows of ``shard`` (each once, this shard id), or None."""
    planned = plan.shard_rows(shard)
    index = table.column("row_index").to_numpy(zero_copy_only=False)
    ids = table.column("shard_id").to_numpy(zero_copy_only=False)
    inside = (index >= planned.start) & (index < planned.stop)
    counts = np.bincount(index[inside] - planned.start, minlength=len(planned))
    missing, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    outside, other_id = index[~inside], ids[ids != shard]
    wrong = []
    if len(missing):
        wrong.append(f"{len(missing)} missing (e.g. row {planned.start + int(missing[0])})")
    if len(repeated):
        wrong.append(f"{len(repeated)} more than once (e.g. row {planned.start + int(repeated[0])})")
    if len(outside):
        wrong.append(f"{len(outside)} not of this shard (e.g. row {int(outside[0])})")
    if len(other_id):
        wrong.append(f"{len(other_id)} with shard_id {int(other_id[0])}")
    if not wrong:
        return None
    return f"rows differ from the plan's rows {planned.start}-{planned.stop - 1}: " + ", ".join(wrong)


def _duplicate_ids(layout: RunLayout, shards: list[int], digests: array) -> list[Problem]:
    """A problem per shard holding an id that another row holds too (a second pass over the shards, only when two
    digests are equal)."""
    ordered = np.sort(np.frombuffer(digests, dtype=np.uint64)) if len(digests) else np.empty(0, np.uint64)
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not repeated:
        return []
    holders: dict[str, list[int]] = {}
    for shard in shards:
        data = layout.read_bytes(layout.shard_file(shard))
        for row_id in pq.read_table(parquet_source(data), columns=["id"], use_threads=False)["id"].to_pylist():
            if _id_digest(row_id) in repeated:
                holders.setdefault(row_id, []).append(shard)
    by_shard: dict[int, list[str]] = {}
    for row_id, where in holders.items():
        if len(where) > 1:  # else two ids with one 64-bit digest
            for shard in sorted(set(where)):
                by_shard.setdefault(shard, []).append(row_id)
    return [
        Problem(
            "duplicate-id",
            layout.shard_file_name(shard),
            f"{len(ids)} id(s) that other rows have too (e.g. {ids[0]!r}, in shards "
            f"{', '.join(map(str, sorted(set(holders[ids[0]]))))})",
            shard,
        )
        for shard, ids in sorted(by_shard.items())
    ]


def _unrecorded_files(
    layout: RunLayout, plan: Plan, files: set[str], recorded: set[int], live: dict[str, Any] | None
) -> list[Problem]:
    """Files in transcripts/ that no completion record names."""
    problems = []
    for name in sorted(files):
        shard = layout.shard_of_file_name(name)
        rel = layout.relative(layout.path("transcripts", name))
        if shard is not None and shard in recorded:
            continue
        if shard is not None and shard < plan.n_shards:
            if live is None:  # else a commit in progress
                problems.append(
                    Problem(
                        "uncommitted",
                        rel,
                        "a pending shard's file without its completion record (its commit never "
                        "finished): Parquet readers of transcripts/ read its rows; the same run command rewrites it",
                        shard,
                    )
                )
        else:
            problems.append(
                Problem(
                    "stray",
                    rel,
                    "no completion record names this file (e.g. a copy under another name): Parquet readers "
                    "of transcripts/ read its rows too",
                )
            )
    return problems


def _leftover_staging(layout: RunLayout, live: dict[str, Any] | None) -> list[Problem]:
    """Staging left by invocations that have ended (a live run's own, and while one is live the temporaries and
    probes of any, are not judged)."""
    problems = []
    names = layout.list_names(layout.path(STAGING))
    try:
        invocations = {inv.get("id"): inv for inv in read_invocations(layout)} if names else {}
    except ValueError:  # a damaged invocation record: the folders are judged as of unknown invocations
        invocations = {}
    for name in sorted(names):
        inv = invocations.get(name)
        if live is not None and (inv is None or _is_live(inv, live)):
            continue
        rel = layout.relative(layout.path(STAGING, name))
        if inv is None:
            problems.append(Problem("staging", rel, "left by a storage preflight or an unknown invocation"))
        else:
            state = "failed" if inv.get("finished_at") else "never finished (killed)"
            problems.append(Problem("staging", rel, f"staging of invocation {name}, which {state}"))
    if live is None and (left := layout.list_names(layout.tmp_dir)):
        problems.append(
            Problem(
                "staging", layout.relative(layout.tmp_dir), f"{len(left)} temporary file(s) left by interrupted writes"
            )
        )
    return problems


def _is_live(invocation: dict[str, Any], live: dict[str, Any]) -> bool:
    return not invocation.get("finished_at") and (invocation.get("host"), invocation.get("pid")) == (
        live.get("host"),
        live.get("pid"),
    )


def repair(layout: RunLayout, v: Verification) -> list[str]:
    """Removes what ``v``'s problems name: a damaged shard's completion record first (the un-commit), then its file;
    stray and uncommitted files; leftover staging. Run under the run lock. Returns one ``REPAIRED`` line each."""
    lines = []
    for p in v.problems:
        if p.kind in UNCOMMIT and p.shard is not None:
            paths = [layout.record_file(p.shard), layout.shard_file(p.shard)]
        else:
            paths = [layout.path(p.path)]
        for path in paths:
            layout.remove_tree(path)
        shard = "" if p.shard is None else f" shard={p.shard}"
        lines.append(f"REPAIRED {p.kind}{shard} {p.path}: removed {', '.join(layout.relative(x) for x in paths)}")
    return lines


def redo_shards(v: Verification) -> list[int]:
    """The planned shards that the next run does after :func:`repair`: the pending and the un-committed ones."""
    uncommitted = {p.shard for p in v.problems if p.kind in UNCOMMIT and p.shard is not None}
    return sorted(set(v.pending) | {s for s in uncommitted if s < v.n_shards})
