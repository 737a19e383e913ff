"""Shared helpers and fixtures of the end-to-end tests: the CLI as a subprocess, reading OUTPUT, real speech.

The tests drive `whisper-batch` only through its command line (``python -m whisper_batch.jobs.cli``) and read the output
folder with pyarrow, so they check the product's contract (CLI, exit codes, output layout), not its internals.
Real speech comes from ``../shared/data/eval`` beside the project; tests that need it skip when it is absent.
Derived manifests and audio go to pytest's tmp dirs; nothing is copied into the repository.

Helpers are plain functions (import them with ``from tests.integration.conftest import ...``); fixtures wrap the
parts that need skipping.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import wave
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from whisper_batch.jobs.procs import descendants  # noqa: F401 - the tests stop what they started by its process tree
from whisper_batch.model.constants import SAMPLE_RATE

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# a full local run (Ray start, model load, transcription) on a loaded 2-core machine stays well below this
RUN_TIMEOUT_S = 420


# --- the CLI ---------------------------------------------------------------------------------------------------

# The session's shared Ray head (see _shared_ray): its RayCluster, the address cli_env gives the CLI while a
# JOINS_SHARED_RAY module runs, and the modules done with it.
_shared: dict[str, Any] = {"cluster": None, "address": None, "done": set()}


def shared_ray_address() -> str | None:
    """The shared head's address while a ``JOINS_SHARED_RAY`` module runs (for its in-process runs), else None."""
    return _shared["address"]


def job_server_missing() -> bool:
    """Whether this Ray lacks what `ray start` needs for the dashboard and its job server (ray[default])."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return True
    return False


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a `whisper-batch` subprocess: a private local Ray (in a ``JOINS_SHARED_RAY`` module, the
    session's shared head: :func:`_shared_ray`; ``RAY_ADDRESS: ""`` in ``extra`` still starts a local one), no
    usage-stats upload."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join someone else's cluster
    if _shared["address"]:
        env["RAY_ADDRESS"] = _shared["address"]
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])  # this environment's tools
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    if not env.get("RAY_ADDRESS"):  # "" in extra: a local Ray
        env.pop("RAY_ADDRESS", None)
    return env


def cli_command(*args: Any) -> list[str]:
    return [sys.executable, "-m", "whisper_batch.jobs.cli", *map(str, args)]


def start_whisper_batch(*args: Any, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts ``whisper-batch ARGS`` in the background, stdout and stderr to ``log``, in a session of its own (so a
    kill of its process group takes the driver and what it started there)."""
    with open(log, "w") as f:
        return subprocess.Popen(
            cli_command(*args), cwd=REPO, env=cli_env(env), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def whisper_batch(*args: Any, timeout: float = RUN_TIMEOUT_S, env: dict[str, str] | None = None):
    """Runs ``whisper-batch ARGS`` to the end; returns the CompletedProcess (stdout and stderr as text)."""
    t0 = time.monotonic()
    proc = subprocess.run(
        cli_command(*args), cwd=REPO, env=cli_env(env), capture_output=True, text=True, timeout=timeout
    )
    logger.info("whisper-batch %s -> %d in %.1fs", " ".join(map(str, args[:3])), proc.returncode, time.monotonic() - t0)
    return proc


def output_of(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout or "") + (proc.stderr or "")


def whisper_batch_ok(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess:
    """Like :func:`whisper_batch`, failing the test with the output's tail when the exit status is not 0."""
    proc = whisper_batch(*args, **kwargs)
    assert proc.returncode == 0, (
        f"`whisper-batch {' '.join(map(str, args))}` exited {proc.returncode}:\n{output_of(proc)[-4000:]}"
    )
    return proc


def status_json(out: Path) -> dict[str, Any]:
    return json.loads(whisper_batch_ok("status", out, "--json").stdout)


# --- manifests and outputs -------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_manifest(path: Path, rows: Iterable[dict[str, Any]], base: Path | None = None) -> Path:
    """Writes JSON lines; with ``base``, relative ``audio_filepath``s are made absolute against it."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            row = dict(row)
            if base is not None and not os.path.isabs(row["audio_filepath"]):
                row["audio_filepath"] = str(base / row["audio_filepath"])
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_rows(out: Path) -> list[dict[str, Any]]:
    """Every row in OUTPUT/transcripts read as one dataset (what any Parquet reader sees), in manifest order."""
    import pyarrow.dataset as ds

    folder = out / "transcripts"
    if not folder.is_dir():
        return []
    rows = ds.dataset(str(folder), format="parquet").to_table().to_pylist()
    return sorted(rows, key=lambda r: r["row_index"])


def completion_records(out: Path) -> dict[int, dict[str, Any]]:
    """shard id -> its completion record (OUTPUT/shards/NNNNN.json)."""
    folder = out / "shards"
    if not folder.is_dir():
        return {}
    return {int(p.stem): json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def count_ids(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["id"]] += 1
    return dict(counts)


def mtimes(out: Path, *subdirs: str) -> dict[str, int]:
    """Relative path -> mtime_ns of every file under the given parts of OUTPUT (files or folders)."""
    found: dict[str, int] = {}
    for sub in subdirs:
        target = out / sub
        files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        for p in files:
            found[str(p.relative_to(out))] = p.stat().st_mtime_ns
    return found


# --- text ------------------------------------------------------------------------------------------------------

_normalizer = None


def normalize(text: str | None) -> str:
    """Whisper's English normaliser (as `whisper-batch eval` uses)."""
    global _normalizer
    if _normalizer is None:
        from whisper_normalizer.english import EnglishTextNormalizer

        _normalizer = EnglishTextNormalizer()
    return _normalizer(text or "")


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus-level WER after normalising both sides."""
    import jiwer

    return jiwer.wer([normalize(r) for r in references], [normalize(h) for h in hypotheses])


def word_recall(reference: str, hypothesis: str | None) -> float:
    """Share of the reference's distinct (normalised) words that occur in the hypothesis."""
    words = set(normalize(reference).split())
    return len(words & set(normalize(hypothesis).split())) / max(1, len(words))


# --- audio -----------------------------------------------------------------------------------------------------


def load_audio(path: Path | str) -> np.ndarray:
    """Any container → float32 mono 16 kHz, decoded with PyAV (independent of the product's decoder)."""
    import av

    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = [
            frame.to_ndarray().ravel()
            for packet_frame in container.decode(audio=0)
            for frame in resampler.resample(packet_frame)
        ]
        chunks += [frame.to_ndarray().ravel() for frame in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def write_wav(path: Path, audio: np.ndarray) -> Path:
    """16-bit PCM mono 16 kHz WAV with the standard library."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(pcm.tobytes())
    return path


def concat_audio(paths: list[Path], out: Path, gap_s: float = 0.7) -> list[tuple[float, float]]:
    """Concatenates ``paths`` with ``gap_s`` of silence between them into ``out`` (.wav, or .flac via ffmpeg).

    Returns:
        (start, end) seconds of each piece in ``out``.
    """
    gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
    pieces, spans, t = [], [], 0.0
    for i, p in enumerate(paths):
        audio = load_audio(p)
        if i:
            pieces.append(gap)
            t += len(gap) / SAMPLE_RATE
        spans.append((t, t + len(audio) / SAMPLE_RATE))
        pieces.append(audio)
        t += len(audio) / SAMPLE_RATE
    wav = out.with_suffix(".wav")
    write_wav(wav, np.concatenate(pieces))
    if out.suffix != ".wav":
        cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), str(out)]
        subprocess.run(cmd, check=True, capture_output=True)
        wav.unlink()
    return spans


def level_db(audio: np.ndarray) -> float:
    """Mean power in dB relative to full scale."""
    return float(10.0 * np.log10(np.mean(np.square(audio, dtype=np.float64)) + 1e-12))


def check_segments_cover(row: dict[str, Any], audio: np.ndarray | None = None, tail_s: float = 3.0) -> None:
    """Segments have absolute times that increase and cover the audio from its start to its last speech.

    The end is covered when the last segment ends within ``tail_s`` of the duration, or (recordings that end
    in silence or room noise) when the audio after the last segment is at least 5 dB below the file's level.
    """
    segments, duration = row["segments"], row["duration"]
    where = f"row {row['id']} ({duration:.1f} s)"
    assert segments, f"{where}: no segments"
    starts = [s["start"] for s in segments]
    assert starts[0] < 2.0, f"{where}: first segment starts at {starts[0]}"
    assert all(a <= b for a, b in zip(starts, starts[1:])), f"{where}: starts not increasing: {starts}"
    assert all(s["start"] <= s["end"] for s in segments), f"{where}: a segment ends before it starts: {segments}"
    last_end = max(s["end"] for s in segments)
    assert last_end <= duration + 0.5, f"{where}: a segment ends at {last_end}, past the audio"
    if duration - last_end <= tail_s:
        return
    assert audio is not None, f"{where}: last segment ends at {last_end:.2f}, more than {tail_s} s before the end"
    tail, whole = level_db(audio[int(last_end * SAMPLE_RATE) :]), level_db(audio)
    assert tail <= whole - 5.0, (
        f"{where}: last segment ends at {last_end:.2f} s but the {duration - last_end:.1f} s after it are at "
        f"{tail:.1f} dB, close to the file's {whole:.1f} dB (speech left untranscribed?)"
    )


# --- processes -------------------------------------------------------------------------------------------------

def alive(pids: Iterable[int]) -> set[int]:
    """The pids that still run (zombies count as gone)."""
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            out.add(pid)
    return out


def wait_until(
    predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S, poll: float = 0.05
) -> bool:
    """Polls ``predicate`` until it holds (True), or until ``proc`` ends or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False


def sigkill(proc: subprocess.Popen, group: bool = False) -> bool:
    """SIGKILLs ``proc`` (its whole process group with ``group``) and reaps it; returns whether it was still running
    when the kill came — False means the kill interrupted nothing."""
    running = proc.poll() is None
    kill = os.killpg if group else os.kill
    try:
        kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    return running


def stop_processes(pids: set[int], timeout: float = 30.0) -> set[int]:
    """Waits up to ``timeout`` for ``pids`` to end; kills (by pid) and returns those still alive then."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive(pids)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


# --- fixtures (eval_dir: ../shared/data/eval or a skip, from tests/conftest.py) -------------------------------


@pytest.fixture(scope="session")
def eval_rows(eval_dir: Path) -> list[dict[str, Any]]:
    """The eval manifest's rows as written (audio paths relative to ``eval_dir``)."""
    return read_jsonl(eval_dir / "manifest.jsonl")


@pytest.fixture(scope="session")
def librispeech_rows(eval_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [r for r in eval_rows if str(r.get("dataset", "")).startswith("librispeech")]
    if not rows:
        pytest.skip("the eval manifest has no LibriSpeech rows")
    return rows


def _joins_shared_ray(item: pytest.Item) -> bool:
    return bool(getattr(getattr(item, "module", None), "JOINS_SHARED_RAY", False))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ``JOINS_SHARED_RAY`` modules' tests run one after another (from where the first of them is), so the shared
    head lives only while they run, not idle beside the modules between them."""
    shared = [item for item in items if _joins_shared_ray(item)]
    if shared:
        rest = [item for item in items if not _joins_shared_ray(item)]
        first = items.index(shared[0])
        items[:] = rest[:first] + shared + rest[first:]


@pytest.fixture(scope="module", autouse=True)
def _shared_ray(request):
    """Runs a module's `whisper-batch` commands on one shared `ray start` head when the module sets
    ``JOINS_SHARED_RAY = True``: for modules whose runs are about the output, not about Ray's start or stop.

    A local Ray of a run's own costs 13-18 s on 2 cores (Ray's daemons, the API server it waits for, Ray Data's
    detached helper actors, the shutdown); joining a running head costs none of it, and the helpers are reused. The
    head starts with the first such module and stops (by pid, as every test cluster does) after the last one, so it
    does not idle beside the other tests. Each run is still a job of its own: its actors and workers end with it.
    """
    module = request.module
    if not getattr(module, "JOINS_SHARED_RAY", False):
        yield
        return
    if _shared["cluster"] is None:
        from tests.integration.ray_cluster import RayCluster

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        cluster = RayCluster(env=env)
        try:
            cluster.start_head(num_cpus=os.cpu_count() or 1)
        except BaseException:
            cluster.stop()
            raise
        _shared["cluster"] = cluster
    _shared["address"] = _shared["cluster"].address
    try:
        yield
    finally:
        _shared["address"] = None
        _shared["done"].add(module.__name__)
        later = {item.module.__name__ for item in request.session.items if _joins_shared_ray(item)} - _shared["done"]
        if not later:
            _shared["cluster"].stop()
            _shared["cluster"] = None
