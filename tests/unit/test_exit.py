"""How the console script ends its process: click's exit status and message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_console_script_exits_with_click_status_and_message():
    cli = [sys.executable, "-m", "whisper_batch.jobs.cli"]
    ok = subprocess.run([*cli, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    # the whole help came through the pipe, up to its last command
    assert ok.returncode == 0 and "Usage:" in ok.stdout and "Commands:" in ok.stdout
    assert ok.stdout.rstrip().splitlines()[-1].split()[0] == "verify"
    bad = subprocess.run([*cli, "run", "no-such-manifest.jsonl", "-o", "out"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 1 and "no-such-manifest.jsonl does not exist" in bad.stderr
    wrong = subprocess.run([*cli, "run", "--no-such-flag"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert wrong.returncode == 2 and "No such option" in wrong.stderr
