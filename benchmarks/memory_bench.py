"""``python -m benchmarks.memory_bench``: whether a long ``whisper-batch run`` keeps its memory flat.

Runs ``whisper-batch run`` in its own process session (as ``benchmarks.bench`` runs an engine) over an hour and more of
audio: the yardstick's long-form sets (``python -m benchmarks.make_yardstick``: files of 4-10 minutes, ``--long``)
spread evenly among MANIFEST's short rows repeated ``--times`` times (the driver stages each shard's rows longest
first: give ``--set manifest.shard_size=50`` so that every shard starts with long files and commits come during the
run; the default 256 makes the 193 rows one shard, its long files all first). Every ``--interval`` seconds it
samples the RSS of each process of the session and sums it by kind (:func:`classify`): the driver, the feature
actors, the model actors, Ray Data's other actors, idle Ray workers, and Ray's own processes (raylet, GCS, agents,
monitors).

Per kind it prints the peak in the first and the last quarter of the steady part of the run, and their ratio
(:func:`quarter_peaks`); a kind passes when its last-quarter peak is within 10 % of its first-quarter peak. The steady
part starts at the first committed shard when that comes in the first half of the run, else at 10 % of the run
(start-up: imports, Ray's start, actors loading the model), and ends at the last sample before Ray's shutdown (the
last commit, or the end of the process). Below, each kind's peak in every tenth of the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .bench import REPO, repeat_manifest, session_processes

YARDSTICK = Path.home() / ".cache" / "whisper-batch" / "yardstick"
LONG_SETS = ("long-silence", "long-gaps", "long-10min")
EVAL_MANIFEST = REPO.parent / "shared" / "data" / "eval" / "manifest.jsonl"
KINDS = ("driver", "featurizer", "model", "ray-data", "idle", "ray-system", "other")
PASS_RATIO = 1.10  # the last quarter's peak may be at most 10 % above the first quarter's
MB = 2**20


# --- pure helpers ---------------------------------------------------------------------------------------------


def classify(cmdline: str, pid: int, driver_pid: int) -> str:
    """The kind of one process of the run's session, from its command line (Ray sets its workers' titles:
    ``ray::IDLE``, ``ray::MapWorker(MapBatches(ArrowFeaturizer))``, ``ray::_StatsActor``, ...)."""
    if pid == driver_pid:
        return "driver"
    if cmdline.startswith("ray::"):
        title = cmdline[5:].split(" ", 1)[0]
        if "Featurizer" in title:
            return "featurizer"
        if "Transcriber" in title:
            return "model"
        if title.startswith("IDLE"):
            return "idle"
        if "Agent" in title:  # the node's dashboard and runtime-env agents, titled as workers
            return "ray-system"
        return "ray-data"  # Ray Data's helper actors: the stats actor, the autoscaling coordinator, ...
    if "default_worker.py" in cmdline:  # a worker not titled yet (just started)
        return "idle"
    if re.search(r"raylet|gcs_server|dashboard|log_monitor|monitor\.py|runtime_env|agent", cmdline):
        return "ray-system"
    return "other"


def short_title(cmdline: str) -> str:
    """A process's name for the report: a Ray worker's title, a script's or module's name, else the program's."""
    words = cmdline.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0][:70]
    for i, w in enumerate(words[1:], 1):
        if w == "-m" and i + 1 < len(words):
            return words[i + 1]
        if w.endswith(".py"):
            return os.path.basename(w)
    return os.path.basename(words[0])


def quarter_peaks(
    samples: list[tuple[float, dict[str, float]]], start: float, end: float
) -> dict[str, tuple[float, float, float | None]]:
    """Per kind, (peak in the first quarter of [start, end], peak in its last quarter, last / first).

    ``samples`` are (seconds, {kind: RSS}); a kind absent from a sample counts as 0 there. The ratio is None where
    the first quarter's peak is 0."""
    quarter = (end - start) / 4
    first: dict[str, float] = defaultdict(float)
    last: dict[str, float] = defaultdict(float)
    kinds: set[str] = set()
    for t, by_kind in samples:
        kinds.update(by_kind)
        if start <= t <= start + quarter:
            for k, v in by_kind.items():
                first[k] = max(first[k], v)
        if end - quarter <= t <= end:
            for k, v in by_kind.items():
                last[k] = max(last[k], v)
    return {k: (first[k], last[k], last[k] / first[k] if first[k] else None) for k in sorted(kinds)}


def tenth_peaks(samples: list[tuple[float, dict[str, float]]], end: float, parts: int = 10) -> list[dict[str, float]]:
    """Per tenth of [0, end] (``parts`` of them), each kind's peak in it (0 where it had no process)."""
    out: list[dict[str, float]] = [defaultdict(float) for _ in range(parts)]
    for t, by_kind in samples:
        i = min(parts - 1, max(0, int(t / end * parts))) if end > 0 else 0
        for k, v in by_kind.items():
            out[i][k] = max(out[i][k], v)
    return [dict(d) for d in out]


def steady_window(duration: float, first_commit: float | None, last_work: float | None) -> tuple[float, float, str]:
    """(start, end, how the start was chosen): from the first commit when it came in the first half of the run, else
    from 10 % of the run; to the last commit (``last_work``) when there is one, else the run's end."""
    end = last_work if last_work and last_work > duration / 2 else duration
    if first_commit is not None and first_commit < duration / 2:
        return first_commit, end, f"the first committed shard ({first_commit:.0f} s)"
    return 0.1 * duration, end, f"10 % of the run ({0.1 * duration:.0f} s; the first commit came later)"


# --- the corpus -------------------------------------------------------------------------------------------------


def long_manifests(names: list[str]) -> list[Path]:
    out = []
    for name in names:
        path = Path(name) if os.sep in name or name.endswith(".jsonl") else YARDSTICK / name / "manifest.jsonl"
        if path.is_dir():
            path = path / "manifest.jsonl"
        if not path.exists():
            raise SystemExit(f"{path} not found: build the long-form sets with `python -m benchmarks.make_yardstick`")
        out.append(path)
    return out


def build_corpus(short: list[str], times: int, long: list[Path], folder: str) -> tuple[str, int, float]:
    """One manifest (absolute paths) in ``folder``: the ``short`` manifests' rows ``times`` times over, with the long
    files spread evenly among them, so that every part of the run sees both. Returns (path, rows, audio seconds)."""
    rows: list[dict[str, Any]] = []
    for m in short:
        with open(repeat_manifest(m, times, folder)) as f:
            rows += [json.loads(line) for line in f]
    longs = []
    for m in long:
        for line in m.read_text().splitlines():
            r = json.loads(line)
            r.pop("parts", None)
            r["audio_filepath"] = str((m.parent / r["audio_filepath"]).resolve())
            longs.append(r)
    every = max(1, len(rows) // max(1, len(longs)))
    out: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        if i % every == every // 2 and longs:
            out.append(longs.pop(0))
        out.append(r)
    out += longs
    path = Path(folder) / "memory-corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return str(path), len(out), sum(float(r.get("duration") or 0.0) for r in out)


# --- sampling ---------------------------------------------------------------------------------------------------




def _commits(out: Path) -> int:
    try:
        return sum(1 for e in os.scandir(out / "shards") if e.name.endswith(".json"))
    except FileNotFoundError:
        return 0


def measure_run(
    manifest: str, out: Path, config: str | None, sets: list[str], interval: float, log: Path
) -> dict[str, Any]:
    """Run ``whisper-batch run`` in a session of its own, sampling its processes' RSS by kind."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "whisper_batch.jobs.cli", "run", manifest, "-o", str(out), "--progress-interval",
           "30", *(["--config", config] if config else []), *(a for kv in sets for a in ("--set", kv))]
    samples: list[tuple[float, dict[str, float]]] = []
    counts: list[tuple[float, dict[str, int]]] = []
    titles: dict[str, set[str]] = defaultdict(set)
    totals: list[tuple[float, int]] = []
    first_commit = last_commit = None
    commits = 0
    with open(log, "w") as f:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            t = time.monotonic() - t0
            by_kind: dict[str, float] = defaultdict(float)
            n: dict[str, int] = defaultdict(int)
            procs = session_processes(proc.pid)
            for pid, rss, cmdline in procs:
                if not cmdline:  # a zombie, or a process exiting
                    continue
                kind = classify(cmdline, pid, proc.pid)
                by_kind[kind] += rss
                n[kind] += 1
                titles[kind].add(short_title(cmdline))
            samples.append((t, dict(by_kind)))
            counts.append((t, dict(n)))
            totals.append((t, sum(rss for _, rss, _ in procs)))  # benchmarks.bench's figure: the whole session
            c = _commits(out)
            if c > commits:
                first_commit = t if first_commit is None else first_commit
                last_commit, commits = t, c
            time.sleep(max(0.0, interval - (time.monotonic() - t0 - t)))
        duration = time.monotonic() - t0
    return {"cmd": cmd, "exit": proc.returncode, "duration_s": duration, "samples": samples, "counts": counts,
            "totals": totals, "first_commit_s": first_commit, "last_commit_s": last_commit, "commits": commits,
            "titles": {k: sorted(v) for k, v in titles.items()}}


# --- report -----------------------------------------------------------------------------------------------------


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    duration = result["duration_s"]
    start, end, how = steady_window(duration, result["first_commit_s"], result["last_commit_s"])
    samples = list(result["samples"])
    totals = [(t, {"all": float(v)}) for t, v in result["totals"]]
    peaks = quarter_peaks(samples + totals, start, end)
    most = defaultdict(int)
    for _, n in result["counts"]:
        for k, v in n.items():
            most[k] = max(most[k], v)
    return {"window": (start, end), "window_start": how, "peaks": peaks, "processes": dict(most),
            "tenths": tenth_peaks(samples + totals, duration)}


def format_report(result: dict[str, Any], summary: dict[str, Any]) -> str:
    start, end = summary["window"]
    lines = [
        f"run: {result['duration_s']:.0f} s, exit {result['exit']}, {result['commits']} shard(s) committed "
        f"(first at {result['first_commit_s'] or 0:.0f} s, last at {result['last_commit_s'] or 0:.0f} s); "
        f"{len(result['samples'])} samples",
        f"steady part: {start:.0f}-{end:.0f} s, from {summary['window_start']}; quarters {start:.0f}-"
        f"{start + (end - start) / 4:.0f} s and {end - (end - start) / 4:.0f}-{end:.0f} s",
        "",
        "| kind | processes | first quarter peak MB | last quarter peak MB | last / first | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    order = [k for k in (*KINDS, "all") if k in summary["peaks"]]
    for k in order:
        first, last, ratio = summary["peaks"][k]
        verdict = "-" if ratio is None else ("ok" if ratio <= PASS_RATIO else "GROWS")
        lines.append(f"| {k} | {summary['processes'].get(k, '-')} | {first / MB:.0f} | {last / MB:.0f} | "
                     f"{'-' if ratio is None else f'{ratio:.3f}'} | {verdict} |")
    lines += ["", "peak MB per tenth of the run:", "",
              "| kind | " + " | ".join(f"{10 * (i + 1)} %" for i in range(len(summary["tenths"]))) + " |",
              "|---|" + "---:|" * len(summary["tenths"])]
    for k in order:
        lines.append(f"| {k} | " + " | ".join(f"{t.get(k, 0) / MB:.0f}" for t in summary["tenths"]) + " |")
    lines += ["", "process titles by kind:"]
    lines += [f"  {k}: {', '.join(result['titles'][k])}" for k in KINDS if k in result["titles"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("manifests", nargs="*", metavar="MANIFEST", help=f"short rows (default: {EVAL_MANIFEST})")
    p.add_argument("--times", type=int, default=4, help="MANIFEST's rows this many times over (default 4)")
    p.add_argument("--long", action="append", default=None, metavar="SET",
                   help=f"a long-form yardstick set or manifest (repeatable; default: {', '.join(LONG_SETS)})")
    p.add_argument("--no-long", action="store_true", help="no long-form files (a quick look, not the figure)")
    p.add_argument("--config", default=None, help="whisper-batch's --config (default: the defaults)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="whisper-batch's --set (repeatable)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the samples and figures here")
    p.add_argument("--keep", action="store_true", help="keep the run's output folder and log")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="wb-memory-"))
    longs = [] if args.no_long else long_manifests(args.long or list(LONG_SETS))
    manifest, rows, audio = build_corpus(args.manifests or [str(EVAL_MANIFEST)], args.times, longs, str(work))
    print(f"corpus: {rows} rows, {audio / 60:.1f} min of audio ({manifest})", file=sys.stderr)
    if audio < 3600:
        print("warning: under an hour of audio", file=sys.stderr)
    result = measure_run(manifest, work / "out", args.config, args.sets, args.interval, work / "run.log")
    summary = summarize(result)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"command: {' '.join(result['cmd'][1:])}  ({rows} rows, {audio / 60:.1f} min of audio)")
    print(format_report(result, summary))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "audio_s": audio, **result, **summary}, default=list))
    if result["exit"] != 0:
        print(f"the run failed (exit {result['exit']}): see {work / 'run.log'}", file=sys.stderr)
        return 1
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept: {work}", file=sys.stderr)
    grows = [k for k, (_, _, r) in summary["peaks"].items() if r is not None and r > PASS_RATIO]
    return 2 if grows else 0


if __name__ == "__main__":
    sys.exit(main())
