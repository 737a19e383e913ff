"""Scale and storage-latency figures (a command that prints tables; not a test).

``python -m benchmarks.scale_bench --rows 10000,100000,1000000``: for each manifest size, a manifest of that many rows
of one short silent clip (quiet windows skip the model: the figures measure the graph, not Whisper), run through
``whisper-batch run`` as a user runs it, and measured from outside:

- plan s: ``build_plan`` over the manifest (the driver's first pass), in this process;
- stage s: writing every input block as the driver's stager does (no graph to wait for), in this process; and the
  seconds after the driver started that its first block appeared;
- driver peak MB: the driver process's peak resident memory (VmHWM), sampled;
- workers: the most Ray worker processes (task and actor workers, idle ones included) seen at once;
- first commit s: from the driver's start to the first completion record in OUTPUT/shards/;
- commits/s, rows/s: completion records (and their rows) per second after the first one;
- status s: ``whisper-batch status OUTPUT --json`` wall time at the end (a new Python process, as a user runs it).

A run longer than ``--max-seconds`` is stopped there (its process group killed) and its figures are for that
window; the table says so. A one-shard manifest (``--shard-size`` rows) is run first, for its first-commit time.

``python -m benchmarks.scale_bench --latency``: files per second that one featurizer (the feature actor's code, in this
process) reads from a moto S3 server on 127.0.0.1 through a proxy that delays every request by ``--delay-ms``,
without and with prefetch, in the same run. Needs the test extra (moto[server]).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import wave
from dataclasses import replace
from pathlib import Path
from typing import Any

from whisper_batch.jobs.procs import descendants, ray_workers
from whisper_batch.model.constants import SAMPLE_RATE

REPO = Path(__file__).resolve().parents[1]


def write_silence(path: Path, seconds: float) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(b"\0\0" * int(seconds * SAMPLE_RATE))
    return path


def write_manifest(path: Path, rows: int, clip: Path) -> Path:
    line = json.dumps({"audio_filepath": str(clip)})[1:-1]
    with open(path, "w") as f:
        for i in range(rows):
            f.write(f'{{"id": "r{i:08d}", {line}}}\n')
    return path


# --- processes, from /proc --------------------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _count(folder: Path, pattern: str) -> int:
    try:
        return sum(1 for e in os.scandir(folder) if re.fullmatch(pattern, e.name))
    except FileNotFoundError:
        return 0


# --- one scale run --------------------------------------------------------------------------------------------


def plan_and_stage(manifest: Path, shard_size: int, work: Path) -> tuple[float, float, int]:
    """build_plan's seconds, and the seconds to write every input block as the driver's stager does."""
    from whisper_batch.pipeline.config import load_config
    from whisper_batch.pipeline.layout import RunLayout
    from whisper_batch.pipeline.plan import build_plan
    from whisper_batch.pipeline.stager import InputStager

    cfg = load_config(None, [f"manifest.shard_size={shard_size}"])
    t0 = time.perf_counter()
    plan = build_plan(str(manifest), cfg)
    t_plan = time.perf_counter() - t0
    layout = RunLayout(str(work / "stage-only"))
    stager = InputStager(layout, "bench", str(manifest), plan, range(plan.n_shards), cfg, None, range(plan.n_shards))
    t0 = time.perf_counter()
    with stager.running(ahead_blocks=10**9):  # leaving it waits for the last block (and raises staging's error)
        pass
    t_stage = time.perf_counter() - t0
    layout.remove_tree(layout.path())
    return t_plan, t_stage, len(stager.files)


def scale_run(rows: int, shard_size: int, clip: Path, work: Path, max_seconds: float, extra: list[str]) -> dict:
    manifest = write_manifest(work / f"m{rows}.jsonl", rows, clip)
    t_plan, t_stage, blocks = plan_and_stage(manifest, shard_size, work)
    out = work / f"out{rows}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "whisper_batch.jobs.cli", "run", str(manifest), "-o", str(out),
           "--progress-interval", "30", "--set", f"manifest.shard_size={shard_size}", *extra]
    log = open(work / f"run{rows}.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = set()
    most = 0
    peak = 0.0
    first_block = first_commit = None
    commits_at_first = 0
    commits, t_last = 0, None
    stopped = False
    while proc.poll() is None:
        now = time.monotonic() - t0
        if now > max_seconds:
            stopped = True
            break
        below = descendants(proc.pid)
        seen |= below
        most = max(most, len(ray_workers(below)))
        peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
        if first_block is None:
            staging = out / "_staging"
            if staging.is_dir() and any(_count(d / "input", r"block-\d+\.parquet") for d in staging.iterdir()):
                first_block = now
        n = _count(out / "shards", r"\d+\.json")
        if n and first_commit is None:
            first_commit, commits_at_first = now, n
        if n > commits:
            commits, t_last = n, now
        time.sleep(0.25)
    if stopped:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in seen:  # Ray processes the kill left (they also exit on their own once their raylet is gone)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log.close()
    n = _count(out / "shards", r"\d+\.json")
    if n > commits:
        commits, t_last = n, time.monotonic() - t0
    rate = (commits - commits_at_first) / (t_last - first_commit) if first_commit and t_last > first_commit else None
    t1 = time.monotonic()
    status = subprocess.run([sys.executable, "-m", "whisper_batch.jobs.cli", "status", str(out), "--json"], cwd=REPO,
                            env=env, capture_output=True, text=True)
    t_status = time.monotonic() - t1
    done_rows = json.loads(status.stdout)["rows_done"] if status.returncode == 0 else None
    return {
        "rows": rows, "shards": -(-rows // shard_size), "blocks": blocks, "plan_s": t_plan, "stage_s": t_stage,
        "first_block_s": first_block, "driver_peak_mb": peak, "workers": most, "first_commit_s": first_commit,
        "commits": commits, "commits_per_s": rate, "rows_per_s": rate * shard_size if rate else None,
        "status_s": t_status, "rows_done": done_rows, "wall_s": time.monotonic() - t0 - t_status,
        "stopped": stopped, "exit": proc.returncode, "log": str(work / f"run{rows}.log"),
    }


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_scale(results: list[dict]) -> str:
    head = ("rows", "shards", "plan s", "stage s", "1st block s", "driver peak MB", "workers", "1st commit s",
            "commits/s", "rows/s", "status s", "committed", "run")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        run = f"stopped at {r['wall_s']:.0f} s" if r["stopped"] else f"done in {r['wall_s']:.0f} s (exit {r['exit']})"
        cells = [f"{r['rows']:,}", f"{r['shards']:,}", _f(r["plan_s"]), _f(r["stage_s"]), _f(r["first_block_s"]),
                 _f(r["driver_peak_mb"], "{:.0f}"), str(r["workers"]), _f(r["first_commit_s"]),
                 _f(r["commits_per_s"], "{:.2f}"), _f(r["rows_per_s"], "{:.0f}"), _f(r["status_s"]),
                 f"{r['commits']:,} shards / {r['rows_done'] or 0:,} rows", run]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- storage latency ------------------------------------------------------------------------------------------


class DelayProxy:
    """TCP proxy on 127.0.0.1 → ``upstream`` that holds every HTTP request (each chunk from the client that starts
    with an HTTP method, so every request on a kept-alive connection) for ``delay`` seconds before passing it on."""

    METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")

    def __init__(self, upstream: tuple[str, int], delay: float):
        self.upstream, self.delay, self.requests = upstream, delay, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(65536):
                if requests and data.startswith(self.METHODS):
                    self.requests += 1
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


def latency_run(files: int, clip_seconds: float, delay_ms: float, depths: list[int]) -> list[dict]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log

    import fsspec

    from whisper_batch.pipeline.config import RunConfig
    from whisper_batch.pipeline.features import Featurizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = DelayProxy(("127.0.0.1", port), delay_ms / 1000)
    results = []
    try:
        direct = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **direct)
        fs.mkdir("bench")
        with tempfile.TemporaryDirectory() as tmp:
            clip = write_silence(Path(tmp) / "c.wav", clip_seconds).read_bytes()
        for i in range(files):
            fs.pipe_file(f"bench/clips/{i:05d}.wav", clip)
        rows = [{"shard_id": 0, "row_index": i, "id": str(i), "uri": f"s3://bench/clips/{i:05d}.wav", "offset": 0.0,
                 "duration": None} for i in range(files)]
        so = {"endpoint_url": proxy.url, "key": "bench", "secret": "bench"}
        base = RunConfig()
        base = replace(base, storage=replace(base.storage, storage_options=so))
        for depth in depths:
            featurizer = Featurizer(replace(base, audio=replace(base.audio, prefetch=depth)))
            featurizer.featurize_rows(rows[:2])  # warm: imports, the S3 client, its connections
            before = proxy.requests
            t0 = time.perf_counter()
            items = featurizer.featurize_rows(rows)
            wall = time.perf_counter() - t0
            errors = sum(1 for r in items if r["error"])
            results.append({"prefetch": depth, "files": files, "seconds": wall, "files_per_s": files / wall,
                            "requests": proxy.requests - before, "errors": errors})
    finally:
        proxy.close()
        server.stop()
    return results


def format_latency(results: list[dict], delay_ms: float, clip_seconds: float) -> str:
    lines = [f"one featurizer, moto S3 on 127.0.0.1 behind a proxy delaying every request {delay_ms:g} ms, "
             f"{clip_seconds:g} s clips",
             "| audio.prefetch | files | seconds | files/s | requests | errors |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['prefetch']} | {r['files']} | {r['seconds']:.2f} | {r['files_per_s']:.1f} | "
                     f"{r['requests']} | {r['errors']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="10000,100000,1000000", help="manifest sizes, comma-separated")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--clip-seconds", type=float, default=0.2)
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop a run after this long")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override for the runs")
    p.add_argument("--work", default=None, help="folder for manifests and outputs (default: a temporary one)")
    p.add_argument("--latency", action="store_true", help="the storage-latency figures instead")
    p.add_argument("--files", type=int, default=200, help="--latency: files read")
    p.add_argument("--delay-ms", type=float, default=50.0)
    p.add_argument("--prefetch", default="0,8", help="--latency: audio.prefetch values compared")
    args = p.parse_args(argv)
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}", flush=True)
    if args.latency:
        depths = [int(x) for x in args.prefetch.split(",")]
        print(format_latency(latency_run(args.files, args.clip_seconds, args.delay_ms, depths), args.delay_ms,
                             args.clip_seconds))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="wb-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    clip = write_silence(work / "quiet.wav", args.clip_seconds)
    extra = [x for o in args.overrides for x in ("--set", o)]
    results = []
    for rows in [args.shard_size] + [int(x) for x in args.rows.split(",")]:
        r = scale_run(rows, args.shard_size, clip, work, args.max_seconds, extra)
        print(json.dumps(r), flush=True)
        results.append(r)
    print(f"\nshard size {args.shard_size}, {args.clip_seconds:g} s silent clips, runs stopped after "
          f"{args.max_seconds:g} s; the first row is the one-shard manifest")
    print(format_scale(results))


if __name__ == "__main__":
    main()
