"""How a finished command ends its process: exit handlers and streams kept, Python's module teardown skipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROLOGUE = """
import atexit, sys, threading, time
from whisper_batch.jobs.run import exit_process

class Teardown:  # a module-level object: Python's teardown runs its __del__, os._exit does not
    def __del__(self):
        print("teardown", flush=True)

keep = Teardown()
atexit.register(lambda: print("exit handler"))
print("work done")  # stdout is a pipe: block-buffered until the flush
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROLOGUE + code], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_exit_process_keeps_handlers_and_output_and_skips_the_teardown():
    proc = _python("exit_process(3)")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.split() == ["work", "done", "exit", "handler"]  # buffered output flushed, handlers run
    usual = _python("sys.exit(3)")  # the same program, the usual exit: the teardown runs __del__
    assert usual.returncode == 3 and usual.stdout.split()[-1] == "teardown"


def test_exit_process_takes_what_sys_exit_takes():
    assert _python("exit_process(None)").returncode == 0
    proc = _python("exit_process('no such manifest')")
    assert proc.returncode == 1 and "no such manifest" in proc.stderr


def test_a_live_thread_gets_the_usual_exit():
    proc = _python("""
def late():
    time.sleep(0.3)
    print("thread finished")
threading.Thread(target=late).start()
exit_process(0)
""")
    assert proc.returncode == 0, proc.stderr
    assert "thread finished" in proc.stdout and proc.stdout.split()[-1] == "teardown"


def test_the_console_script_exits_with_click_status_and_message():
    cli = [sys.executable, "-m", "whisper_batch.jobs.cli"]
    ok = subprocess.run([*cli, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    # the whole help came through the pipe, up to its last command
    assert ok.returncode == 0 and "Usage:" in ok.stdout and "Commands:" in ok.stdout
    assert ok.stdout.rstrip().splitlines()[-1].split()[0] == "transcribe"
    bad = subprocess.run([*cli, "run", "no-such-manifest.jsonl", "-o", "out"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 1 and "no-such-manifest.jsonl does not exist" in bad.stderr
    wrong = subprocess.run([*cli, "run", "--no-such-flag"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert wrong.returncode == 2 and "No such option" in wrong.stderr
