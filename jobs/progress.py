"""What ``whisper-batch run`` shows while it works: one progress display in rows and audio hours, quiet otherwise.

The driver learns about progress from the small part records that stream back from the graph (rows written, their
audio seconds and error causes) and from shard commits; :class:`Progress` keeps counters (constant work per part, so
a million rows cost nothing) and draws them:

- in a terminal, one live bar (tqdm): rows of this invocation, with the whole run's rows, audio hours, shards
  committed, failed rows by cause, RTFx and time left beside it;
- in a pipe, a job's log or under ``submit --wait``, one concise line every ``interval`` seconds (and a last one).

:func:`quiet_screen` keeps everything else off the screen while the graph runs: Ray Data's per-operator bars are off,
and what Ray, its C++ core and Python warnings write to stderr goes to a log file instead. Log records at ERROR still
reach the screen at once. ``-v`` leaves the screen as Ray has it (operator bars included).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL = 15.0  # seconds between two progress lines when the screen is not a terminal


@dataclass
class Screen:
    """Where the display draws, and where the rest went."""

    stream: TextIO  # the user's stderr (a terminal, a pipe or a job's log)
    log_path: str | None = None  # Ray's and Python's other stderr output, when quieted
    verbose: bool = False

    @property
    def is_terminal(self) -> bool:
        try:
            return self.stream.isatty()
        except (ValueError, AttributeError):
            return False


def log_file_path() -> str:
    """A new log file for one ``run``'s Ray output: $TMPDIR/whisper-batch/logs/run-<UTC time>-<pid>.log."""
    folder = os.path.join(tempfile.gettempdir(), "whisper-batch", "logs")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"run-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log")


def _stderr_fd() -> int | None:
    """The real file descriptor behind sys.stderr, or None (a test runner's in-memory stream)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None
    return fd if fd == 2 else None


@contextlib.contextmanager
def quiet_screen(verbose: bool = False) -> Iterator[Screen]:
    """While inside, stderr (file descriptor 2: Ray's loggers, its C++ core's lines, Python warnings) goes to a log
    file and Ray Data draws no operator bars; log records at ERROR or above are copied to the screen at once.

    With ``verbose`` nothing is redirected and Ray Data's operator bars stay on. Where stderr is not a real file
    descriptor (click's test runner), only the logging side applies.
    """
    _set_ray_data_bars(verbose)
    if verbose:
        yield Screen(sys.stderr, None, verbose=True)
        return
    path = log_file_path()
    logging.captureWarnings(True)  # warnings.warn → the "py.warnings" logger → the file
    fd = _stderr_fd()
    saved = screen = None
    sys.stderr.flush()
    if fd is not None:
        saved = os.dup(fd)
        screen = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
        with open(path, "ab") as f:
            os.dup2(f.fileno(), fd)
    else:
        screen = sys.stderr
    errors = _ScreenErrors(screen)
    loggers = [logging.getLogger(), logging.getLogger("ray"), logging.getLogger("ray.data")]
    quieted = _quiet_ray_consoles() if fd is None else []
    for logger in loggers:
        logger.addHandler(errors)
    file_handler = logging.FileHandler(path) if fd is None else None
    if file_handler:
        logging.getLogger().addHandler(file_handler)
    try:
        yield Screen(screen, path)
    finally:
        for logger in loggers:
            logger.removeHandler(errors)
        if file_handler:
            logging.getLogger().removeHandler(file_handler)
            file_handler.close()
        for handler, level in quieted:
            handler.setLevel(level)
        logging.captureWarnings(False)
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            screen.close()


def _set_ray_data_bars(on: bool) -> None:
    try:
        import ray.data
    except ImportError:  # pragma: no cover - ray is a dependency
        return
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = on
    ctx.enable_operator_progress_bars = on


def _quiet_ray_consoles() -> list[tuple[logging.Handler, int]]:
    """Raises Ray's console handlers to ERROR (where stderr cannot be redirected); returns their old levels."""
    out = []
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if type(handler).__name__ == "PlainRayHandler":
                out.append((handler, handler.level))
                handler.setLevel(logging.ERROR)
    return out


class _ScreenErrors(logging.StreamHandler):
    """ERROR records to the screen, scrubbed of credentials, as one line each: their tracebacks stay in the log file.
    (A StreamHandler, so `mute_console_logs` can still silence it.)"""

    def __init__(self, stream: TextIO):
        from whisper_batch.jobs.logs import ScrubFilter

        super().__init__(stream)
        self.setLevel(logging.ERROR)
        self.addFilter(ScrubFilter())

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname} {record.name}: {record.getMessage()}"


# --- the display ---


def format_duration(seconds: float) -> str:
    seconds = round(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_audio(seconds: float) -> str:
    """Audio in the unit that reads best: seconds, minutes, then hours."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


@dataclass
class Counts:
    """What the display shows. ``*_before``: committed by earlier invocations."""

    rows_total: int  # this invocation's rows
    run_rows_total: int
    run_rows_before: int
    shards_total: int  # this invocation's shards
    run_shards_total: int
    run_shards_before: int
    rows: int = 0
    audio_seconds: float = 0.0
    shards: int = 0
    failed: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    first_rows_at: float | None = None  # rate is measured from the first rows out (Ray and model start-up excluded)
    rows_at_first: int = 0

    def rate(self, now: float) -> float | None:
        """Rows per second since the first rows came out."""
        if self.first_rows_at is None or now - self.first_rows_at < 1.0 or self.rows <= self.rows_at_first:
            return None
        return (self.rows - self.rows_at_first) / (now - self.first_rows_at)

    def summary(self, now: float, with_rows: bool = True) -> str:
        """One line in the user's units; ``with_rows=False`` leaves out what a bar already shows."""
        parts = []
        if with_rows:
            pct = f" ({100.0 * self.rows / self.rows_total:.0f}%)" if self.rows_total else ""
            parts.append(f"rows {self.rows}/{self.rows_total}{pct}")
        if self.run_rows_total != self.rows_total:
            parts.append(f"run {min(self.run_rows_before + self.rows, self.run_rows_total)}/{self.run_rows_total}")
        parts.append(f"audio {format_audio(self.audio_seconds)}")
        parts.append(f"shards {self.run_shards_before + self.shards}/{self.run_shards_total}")
        n_failed = sum(self.failed.values())
        causes = ", ".join(f"{c} {n}" for c, n in self.failed.most_common(3))
        parts.append(f"failed {n_failed}" + (f" ({causes})" if n_failed else ""))
        elapsed = now - self.started
        parts.append(f"RTFx {self.audio_seconds / elapsed:.1f}" if self.audio_seconds and elapsed > 0 else "RTFx -")
        rate = self.rate(now)
        if self.rows >= self.rows_total:
            parts.append(f"{format_duration(elapsed)} elapsed")
        elif rate:
            parts.append(f"{format_duration((self.rows_total - self.rows) / rate)} left")
        else:
            parts.append(f"{format_duration(elapsed)} elapsed, time left -")
        return " · ".join(parts)


class Progress:
    """Counters fed by the graph's part records and commit records, drawn as a bar or as periodic lines.

    Use as a context manager around the graph; ``on_part`` and ``on_commit`` are run_graph's callbacks.
    """

    def __init__(self, counts: Counts, screen: Screen, interval: float = DEFAULT_INTERVAL, bar: bool | None = None):
        self.counts = counts
        self.screen = screen
        self.interval = max(0.5, float(interval))
        # Ray Data's own bars (-v) would fight with ours for the terminal's last lines: lines then
        self.use_bar = screen.is_terminal and not screen.verbose if bar is None else bar
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = None
        self._thread: threading.Thread | None = None
        self._last_line = 0.0

    def __enter__(self) -> Progress:
        self.counts.started = time.monotonic()
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.counts.rows_total, unit="row", desc="rows", file=self.screen.stream, dynamic_ncols=True,
                mininterval=0.5, smoothing=0.1,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows{postfix}",
            )
            self._bar.set_postfix_str(self.counts.summary(time.monotonic(), with_rows=False), refresh=True)
        else:
            self.emit_line()
        self._thread = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix_str(self.counts.summary(time.monotonic(), with_rows=False), refresh=False)
                self._bar.close()
                self._bar = None
            else:
                self.emit_line("done: " if exc_type is None else "stopped: ")

    def _tick(self) -> None:
        # a bar's clock and time left move on even while no part arrives; lines come at a steady interval
        while not self._stop.wait(1.0 if self.use_bar else min(1.0, self.interval)):
            now = time.monotonic()
            with self._lock:
                if self._bar is not None:
                    self._bar.set_postfix_str(self.counts.summary(now, with_rows=False), refresh=True)
                elif now - self._last_line >= self.interval:
                    self.emit_line()

    def emit_line(self, prefix: str = "") -> None:
        now = time.monotonic()
        self._last_line = now
        self._print(f"[{time.strftime('%H:%M:%S')}] {prefix}{self.counts.summary(now)}")

    def _print(self, message: str) -> None:
        try:
            print(message, file=self.screen.stream, flush=True)
        except (OSError, ValueError):  # the screen went away (a closed pipe): the run goes on
            pass

    def write(self, message: str) -> None:
        """A message above the bar (or a plain line)."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(message, file=self.screen.stream)
            else:
                self._print(message)

    def on_part(self, part: dict[str, Any], new_rows: int) -> None:
        """A part file was written: ``new_rows`` of its rows are new (a retried task may resend some)."""
        c = self.counts
        with self._lock:
            if c.first_rows_at is None:
                c.first_rows_at, c.rows_at_first = time.monotonic(), new_rows
            c.rows += new_rows
            c.audio_seconds += float(part.get("audio_seconds") or 0.0)
            for cause in part.get("error_causes") or ():
                c.failed[cause] += 1
            if self._bar is not None:
                self._bar.set_postfix_str(c.summary(time.monotonic(), with_rows=False), refresh=False)
                self._bar.update(new_rows)

    def on_commit(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.counts.shards += 1
        logger.info("committed shard %d (%d rows, %d failed)", record["shard_id"], record["rows"], record["errors"])
