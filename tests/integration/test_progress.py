"""What a person sees during `whisper-batch run` (real local Ray, real tiny.en, the example speech and one missing
file): in a terminal one live bar in rows with audio/shards/failures beside it, in a pipe one concise line at a
steady interval; never Ray Data's operator bars or Ray's warnings, which go to the log file named on screen."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import termios
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, RUN_TIMEOUT_S, cli_command, cli_env, whisper_batch

pytestmark = pytest.mark.integration

# what Ray prints on its own: operator bars, its executor's banner, warnings, its C++ core's log lines
RAY_NOISE = ("MapBatches(", "StreamingRepartition", "Running Dataset", "ActorPoolMapOperator", "UserWarning",
             "core_worker", "Started a local Ray instance")
LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] (done: )?rows \d+/5 \(\d+%\) · audio [\d.]+ (s|min|h) · shards [01]/1 · "
                  r"failed \d( \(not found 1\))? · RTFx [\d.-]+ · .*(left|elapsed)")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """The four example files and one that does not exist (a failed row: "not found")."""
    path = tmp_path_factory.mktemp("progress") / "manifest.jsonl"
    rows = [json.loads(line) for line in (REPO / "examples" / "manifest.jsonl").read_text().splitlines()]
    rows = [{**r, "audio_filepath": str(REPO / "examples" / r["audio_filepath"])} for r in rows]
    rows.append({"id": "gone", "audio_filepath": str(path.parent / "gone.flac")})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_in_terminal(args: list[str], columns: int = 160, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    """Runs the CLI with a pseudo-terminal as its stdin/stdout/stderr; returns (exit status, what the screen got)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec the CLI in the terminal
        os.chdir(REPO)
        os.execvpe(args[0], args, {**cli_env(), "TERM": "xterm-256color", "COLUMNS": str(columns)})
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    screen, deadline = bytearray(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            screen += data
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), screen.decode("utf-8", errors="replace")


def test_terminal_shows_one_bar_and_no_ray_output(manifest, tmp_path):
    code, screen = run_in_terminal(cli_command("run", manifest, "-o", tmp_path / "out"))
    assert code == 0, screen[-3000:]
    for noise in RAY_NOISE:
        assert noise not in screen, f"{noise!r} on screen:\n{screen[-3000:]}"
    # the bar, redrawn in place (carriage returns), reaching 5/5 rows with the run's figures beside it
    assert re.search(r"\rrows +0%\|", screen), screen[:2000]
    final = re.findall(r"rows 100%\|█+\| 5/5 rows, audio [\d.]+ (?:s|min) · shards 1/1 · failed 1 \(not found 1\) · "
                       r"RTFx [\d.]+ · \dm\d\ds elapsed", screen)
    assert final, screen[-3000:]
    # what Ray said went to the log file named on screen
    log_path = re.search(r"Ray's log: (\S+\.log)", screen).group(1)
    ray_log = Path(log_path).read_text()
    assert "MapBatches(" in ray_log and "Started a local Ray instance" in ray_log
    assert "rows     5/5 done, 1 failed" in screen  # the status after the run


def test_pipe_gets_concise_lines_at_a_steady_interval(manifest, tmp_path):
    t0 = time.monotonic()
    proc = whisper_batch("run", manifest, "-o", tmp_path / "out", "--progress-interval", "1")
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in RAY_NOISE:
        assert noise not in proc.stdout + proc.stderr, noise
    assert "\r" not in proc.stderr and "█" not in proc.stderr  # no bar in a pipe
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert all(LINE.match(line) and len(line) < 160 for line in lines), "\n".join(lines)
    assert lines[-1].startswith("[") and "done: rows 5/5 (100%)" in lines[-1] and "failed 1 (not found 1)" in lines[-1]
    # one line a second while the graph runs (Ray start and model load included), not one per operator or shard
    assert 3 <= len(lines) <= wall + 2, (len(lines), wall)
    seconds = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in (re.match(r"\[(\d+):(\d+):(\d+)\]", x).groups()
                                                                       for x in lines[:-1])]
    assert all(0 <= b - a <= 3 for a, b in zip(seconds, seconds[1:])), lines
