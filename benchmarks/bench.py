"""``python -m benchmarks.bench``: the same files through whisper-batch's whole pipeline and through the peers users run
today, engines alternating in one run, each in its own process (so one's memory or threads can't help another).

Per engine: audio seconds, wall seconds (model load measured separately), RTFx = audio / wall, the whole process's
seconds (from its start to its exit: imports, model load, audio decoding, Ray start for ours), the start-up's share
of them and the steady rate without it (for ours the start-up runs to the run's first model call: Ray, the actors,
the model load, the first features), WER (Whisper's English normalizer) over rows with a reference, and peak memory
(RSS summed over the engine's process session, sampled). Below the table, whisper-batch's speed as a multiple of the
fastest peer's, on the three clocks (wall, process, steady). ``--times N`` runs a
manifest that repeats MANIFEST's rows N times (ids suffixed ``#k``), a corpus large enough for the start-up not to
dominate. Peers need the optional extra ``bench`` (openai-whisper, faster-whisper); missing ones are reported and
skipped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

REPO = Path(__file__).resolve().parents[1]  # `benchmarks` runs from a checkout, not an install

ENGINES = {
    "whisper-batch": (
        "our whole pipeline: local Ray, feature + model actors, windows of many files batched, Parquet commit"
    ),
    "whisper-batch-int8": "the same with model.quantize=int8 (the rest in fp32)",
    "whisper-batch-int8-bf16": "the same with model.quantize=int8 and model.dtype=bfloat16 (the rest in bf16)",
    "whisper-batch-reference": (
        "the same with configs/reference.yaml (every encoder pass 30 s, the fallback's whole ladder: the old default)"
    ),
    "whisper-batch-fast": "the same with configs/cpu-fast.yaml (encoder passes in 1 s steps)",
    "whisper-batch-vad": "the same with audio.vad=true (speech joined into full windows, the rest left out)",
    "whisper-batch-cond": "the same with decode.condition_on_previous_text=true (a file's windows in order, prompted)",
    "openai": "openai-whisper transcribe(), greedy, fp32",
    "faster-int8": "faster-whisper WhisperModel.transcribe, greedy, int8",
    "faster-fp32": "faster-whisper WhisperModel.transcribe, greedy, float32",
    "faster-batched-int8": "faster-whisper BatchedInferencePipeline (batch 8), greedy, int8",
    "faster-batched-int8-16": "faster-whisper BatchedInferencePipeline (batch 16), greedy, int8",
    "faster-batched-fp32": "faster-whisper BatchedInferencePipeline (batch 8), greedy, float32",
    "ct2-crossfile-int8": (
        "CTranslate2 Whisper.generate on 30 s chunks of many files per batch (8), as WhisperS2T batches, greedy, int8"
    ),
    "ct2-crossfile-int8-16": "the same at batch 16",
}
DEFAULT_ENGINES = ("whisper-batch", "whisper-batch-int8", "openai", "faster-int8", "faster-batched-int8")


def repeat_manifest(manifest: str, times: int, folder: str) -> str:
    """A JSONL manifest in ``folder`` holding ``manifest``'s rows ``times`` times over (ids ``ID#k``, paths
    resolved)."""
    from whisper_batch.pipeline.manifest import read_manifest

    rows = list(read_manifest(manifest))
    path = Path(folder) / f"{Path(manifest).stem}-x{times}.jsonl"
    with path.open("w") as f:
        for k in range(times):
            for r in rows:
                row = {"id": f"{r.id}#{k}", "audio_filepath": r.uri, "offset": r.offset, "duration": r.duration,
                       "text": r.reference}
                f.write(json.dumps({key: v for key, v in row.items() if v is not None}) + "\n")
    return str(path)


def steady_manifest(manifest: str, hours: float, folder: str) -> str:
    """A JSONL manifest in ``folder`` of at least ``hours`` of audio, as corpora run: the yardstick's long-form sets
    (built from ../shared if missing; long recordings) and then ``manifest``'s rows repeated (ids ``ID#k``, short
    files) until the total is reached. Rows need their ``duration``."""
    from benchmarks.make_yardstick import LONG_SETS, yardstick_sets
    from whisper_batch.pipeline.manifest import read_manifest

    long_sets = yardstick_sets(sets=tuple(LONG_SETS))
    rows = [r for name in LONG_SETS for r in read_manifest(str(long_sets[name]))]
    short = list(read_manifest(manifest))
    if any(r.duration is None for r in rows + short):
        raise click.UsageError(f"--hours needs a duration on every row of {manifest}")
    total, out = sum(r.duration for r in rows), [(r, r.id) for r in rows]
    k = 0
    while total < hours * 3600:
        out += [(r, f"{r.id}#{k}") for r in short]
        total += sum(r.duration for r in short)
        k += 1
    path = Path(folder) / f"steady-{hours:g}h.jsonl"
    with path.open("w") as f:
        for r, rid in out:
            row = {"id": rid, "audio_filepath": r.uri, "offset": r.offset, "duration": r.duration, "text": r.reference}
            f.write(json.dumps({key: v for key, v in row.items() if v is not None}) + "\n")
    return str(path)


def read_rows(manifest: str) -> list[dict[str, Any]]:
    from whisper_batch.pipeline.manifest import read_manifest

    return [
        {"id": r.id, "uri": r.uri, "reference": r.reference, "offset": r.offset, "duration": r.duration}
        for r in read_manifest(manifest)
    ]


# ---- engines (run inside the child process) ----


OUR_SETTINGS: dict[str, tuple[str | None, list[str]]] = {  # engine -> (a file of configs/ or None, overrides)
    "whisper-batch": (None, []),
    "whisper-batch-int8": (None, ["model.quantize=int8"]),
    "whisper-batch-int8-bf16": (None, ["model.quantize=int8", "model.dtype=bfloat16"]),
    "whisper-batch-reference": ("reference.yaml", []),
    "whisper-batch-fast": ("cpu-fast.yaml", []),
    "whisper-batch-vad": (None, ["audio.vad=true"]),
    "whisper-batch-cond": (None, ["decode.condition_on_previous_text=true"]),
}


def our_settings(engine: str) -> tuple[str | None, list[str]] | None:
    """A whisper-batch engine's config file and overrides: a name of OUR_SETTINGS, optionally with more overrides as
    ``NAME:KEY=VALUE+KEY=VALUE`` (a candidate measured before it goes into a config file); None for a peer."""
    name, _, extra = engine.partition(":")
    if name not in OUR_SETTINGS:
        return None
    config, overrides = OUR_SETTINGS[name]
    return config, overrides + [o for o in extra.split("+") if o]


def _run_ours(manifest: str, model: str | None, config: str | None, sets: list[str]) -> dict[str, Any]:
    import pyarrow.dataset as pads

    from benchmarks.time_split import first_model_call
    from whisper_batch.jobs.run import init_ray, run, stop_ray
    from whisper_batch.pipeline.config import load_config

    source = str(Path(__file__).resolve().parents[1] / "configs" / config) if config else None
    cfg = load_config(source, sets + ([f"model.name={model}"] if model else []))
    t0 = time.perf_counter()
    init_ray(cfg)
    load = time.perf_counter() - t0
    out = tempfile.mkdtemp(prefix="wb-bench-")
    t0, epoch = time.perf_counter(), time.time()
    run(manifest, out, cfg, echo=lambda *_: None)
    wall = time.perf_counter() - t0
    first_call = first_model_call(epoch)  # before it, the run starts its actors and featurizes the first rows
    first_call = 0.0 if math.isnan(first_call) else first_call  # no model call: every row was silent or failed
    table = pads.dataset(f"{out}/transcripts").to_table(columns=["id", "text", "duration"]).to_pylist()
    stop_ray()  # as `whisper-batch run` does: the process clock ends with Ray's shutdown
    return {
        "load_s": load,
        "wall_s": wall,
        "first_call_s": first_call,
        "texts": {r["id"]: r["text"] or "" for r in table},
        "audio_s": sum(r["duration"] or 0.0 for r in table),
        "note": "load = Ray start; the wall time starts the actors (model load) before its first model call",
    }


def _audio(row: dict[str, Any]):
    from whisper_batch.pipeline.audio import decode_audio, read_bytes

    return decode_audio(read_bytes(row["uri"]), offset=row["offset"] or 0.0, duration=row["duration"])


def _run_openai(rows, model: str | None, threads: int) -> dict[str, Any]:
    import torch
    import whisper

    from whisper_batch.model.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(model)
    ref = whisper.model.Whisper(whisper.model.ModelDimensions(**ckpt.dims.to_dict()))
    ref.load_state_dict(ckpt.state_dict)
    ref = ref.float().eval()
    load = time.perf_counter() - t0
    audios, decode_s = _decode_all(rows)
    t0 = time.perf_counter()
    language = None if ckpt.dims.is_multilingual else "en"
    texts = {r["id"]: whisper.transcribe(ref, a, fp16=False, language=language)["text"] for r, a in zip(rows, audios)}
    return {"load_s": load, "wall_s": time.perf_counter() - t0, "texts": texts, "audio_s": _seconds(audios),
            "decode_s": decode_s}


def _run_faster(rows, model: str | None, threads: int, compute_type: str, batched: bool,
                batch_size: int = 8) -> dict[str, Any]:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from whisper_batch.model.checkpoint import resolve_model

    t0 = time.perf_counter()
    fw = WhisperModel(resolve_model(model), device="cpu", compute_type=compute_type, cpu_threads=threads)
    engine = BatchedInferencePipeline(fw) if batched else fw
    load = time.perf_counter() - t0
    audios, decode_s = _decode_all(rows)
    kwargs = {"batch_size": batch_size} if batched else {}
    t0 = time.perf_counter()
    texts = {}
    for r, a in zip(rows, audios):
        segments, _ = engine.transcribe(a, beam_size=1, language="en", **kwargs)
        texts[r["id"]] = "".join(s.text for s in segments)
    return {"load_s": load, "wall_s": time.perf_counter() - t0, "texts": texts, "audio_s": _seconds(audios),
            "decode_s": decode_s}


def _run_ct2_crossfile(rows, model: str | None, threads: int, batch_size: int) -> dict[str, Any]:
    """Every file cut into 30 s chunks, chunks of all files sorted by length and decoded ``batch_size`` at a time by
    CTranslate2's ``Whisper.generate`` (int8, greedy, no timestamps), texts joined per file: the cross-file batching
    of WhisperS2T, without its VAD."""
    import ctranslate2
    import numpy as np
    import tokenizers
    from faster_whisper.feature_extractor import FeatureExtractor
    from faster_whisper.tokenizer import Tokenizer

    from whisper_batch.model.checkpoint import resolve_model

    t0 = time.perf_counter()
    path = resolve_model(model)
    ct2 = ctranslate2.models.Whisper(path, device="cpu", compute_type="int8", intra_threads=threads)
    tokenizer = Tokenizer(tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json")), ct2.is_multilingual,
                          "transcribe", "en")
    features = FeatureExtractor(feature_size=ct2.n_mels)
    load = time.perf_counter() - t0
    audios, decode_s = _decode_all(rows)
    window = 30 * 16000
    prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
    t0 = time.perf_counter()
    chunks = [(i, a[s : s + window]) for i, a in enumerate(audios) for s in range(0, max(len(a), 1), window)]
    order = sorted(range(len(chunks)), key=lambda k: len(chunks[k][1]))
    pieces: dict[int, str] = {}
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        mel = np.stack([features(np.pad(chunks[k][1], (0, window - len(chunks[k][1]))))[:, :3000] for k in batch])
        out = ct2.generate(ctranslate2.StorageView.from_array(mel.astype(np.float32)), [prompt] * len(batch),
                           beam_size=1, max_length=448)
        for k, r in zip(batch, out):
            pieces[k] = tokenizer.decode([t for t in r.sequences_ids[0] if t < tokenizer.eot])
    texts: dict[str, list[str]] = {r["id"]: [] for r in rows}
    for k, (i, _) in enumerate(chunks):  # chunks are in file order
        texts[rows[i]["id"]].append(pieces[k])
    return {"load_s": load, "wall_s": time.perf_counter() - t0, "audio_s": _seconds(audios), "decode_s": decode_s,
            "texts": {i: "".join(t) for i, t in texts.items()}}


def _decode_all(rows) -> tuple[list, float]:
    """Every row's audio, decoded up front (each peer is timed on its model work), and the seconds that took."""
    t0 = time.perf_counter()
    return [_audio(r) for r in rows], time.perf_counter() - t0


def _seconds(audios) -> float:
    return sum(len(a) for a in audios) / 16000


def run_engine(engine: str, manifest: str, model: str | None, threads: int) -> dict[str, Any]:
    if (ours := our_settings(engine)) is not None:
        return _run_ours(manifest, model, *ours)
    return run_engine_rows(engine, read_rows(manifest), model, threads)


def run_engine_rows(engine: str, rows: list[dict[str, Any]], model: str | None, threads: int) -> dict[str, Any]:
    """A peer engine over ``rows`` (``id``, ``uri``, ``offset``, ``duration``)."""
    if engine == "openai":
        return _run_openai(rows, model, threads)
    if engine.startswith("ct2-crossfile"):
        return _run_ct2_crossfile(rows, model, threads, 16 if engine.endswith("-16") else 8)
    if engine.startswith("faster"):
        batch = 16 if engine.endswith("-16") else 8
        compute = engine.removesuffix("-16").rsplit("-", 1)[1].replace("fp32", "float32")
        return _run_faster(rows, model, threads, compute, "batched" in engine, batch)
    raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")


# ---- the parent: alternate engines, sample memory, score ----


def session_processes(sid: int) -> list[tuple[int, int, str]]:
    """(pid, RSS bytes, command line) of every process in session ``sid`` (the engine and what it started: Ray's
    workers)."""
    out, page = [], os.sysconf("SC_PAGE_SIZE")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) != sid:
                continue
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        out.append((int(pid), rss, cmd))
    return out


def _session_rss(sid: int) -> int:
    """RSS bytes of every process in session ``sid``."""
    return sum(rss for _, rss, _ in session_processes(sid))


def measure(engine: str, manifest: str, model: str | None, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        model = os.path.abspath(model) if model and os.path.exists(model) else model
        cmd = [sys.executable, "-m", "benchmarks.bench", "child", engine, os.path.abspath(manifest), str(out),
               str(threads), model or ""]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        peak = [0]

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], _session_rss(proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, err = proc.communicate()
        process_s = time.perf_counter() - t0
        sampler.join()
        if proc.returncode != 0 or not out.exists():
            return {"engine": engine, "error": err.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]}
        result = json.loads(out.read_text())
    result.update(engine=engine, peak_rss_mb=peak[0] / 2**20, process_s=process_s)
    return result


def score(result: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    from whisper_normalizer.english import EnglishTextNormalizer

    from benchmarks.yardstick import part_errors
    from whisper_batch.jobs.evaluate import word_errors

    norm = EnglishTextNormalizer()
    pairs = [(norm(r["reference"]), norm(result["texts"].get(r["id"], ""))) for r in rows if r.get("reference")]
    pairs = [p for p in pairs if p[0]]
    wer = word_errors([p[0] for p in pairs], [p[1] for p in pairs])["wer"] if pairs else None
    # lost speech: runs of RUN_WORDS or more consecutive reference words missing (a VAD or a skipped window loses
    # whole sentences; a WER alone does not tell that from scattered errors)
    deletion_runs = sum(part_errors([ref], hyp)[2] for ref, hyp in pairs) if pairs else None
    steady_s = result["wall_s"] - result.get("first_call_s", 0.0) + result.get("decode_s", 0.0)
    startup = max(0.0, result["process_s"] - steady_s)
    return {
        "engine": result["engine"],
        "audio_s": result["audio_s"],
        "load_s": result["load_s"],
        "wall_s": result["wall_s"],
        "rtfx": result["audio_s"] / result["wall_s"] if result["wall_s"] else None,
        "process_s": result["process_s"],
        "process_rtfx": result["audio_s"] / result["process_s"],
        # the process's seconds before its steady work and after it: imports, model load, Ray's start and shutdown,
        # and for ours the run's start up to its first model call (its actors' start and model load, the first
        # rows' features); a steady-state run keeps this share small
        "startup_s": startup,
        "startup_share": startup / result["process_s"],
        # the rate of the steady work alone (a corpus of many hours runs at this rate): for a peer its model work and
        # audio decoding, for ours the run from its first model call to its end
        "steady_rtfx": result["audio_s"] / (result["process_s"] - startup),
        "wer": wer,
        "deletion_runs": deletion_runs,
        "peak_rss_mb": result["peak_rss_mb"],
        "note": result.get("note", ""),
    }


def format_table(scores: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | audio s | load s | wall s | RTFx | process s | process RTFx | start-up % | steady RTFx | WER % "
        "| deletion runs | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        if "error" in s:
            lines.append(f"| {s['engine']} | failed: {' '.join(s['error'])[:80]} | | | | | | | | | | |")
            continue
        wer = f"{100 * s['wer']:.2f}" if s["wer"] is not None else "–"
        runs = s.get("deletion_runs")
        lines.append(
            f"| {s['engine']} | {s['audio_s']:.1f} | {s['load_s']:.1f} | {s['wall_s']:.1f} | {s['rtfx']:.1f} | "
            f"{s['process_s']:.1f} | {s['process_rtfx']:.1f} | {100 * s['startup_share']:.1f} | "
            f"{s['steady_rtfx']:.1f} | {wer} | "
            f"{'–' if runs is None else runs} | {s['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines + [f"\n{line}" for line in ratio_lines(scores)])


def ratio_lines(scores: list[dict[str, Any]]) -> list[str]:
    """Each whisper-batch engine's speed over the fastest peer's (RTFx summed over rounds: total audio / total
    seconds), on the wall clock (model work; the peers' audio decoded and model loaded beforehand), on the whole
    process's clock, and at steady state (the process without its start-up and end: see ``score``)."""
    totals: dict[str, list[float]] = {}
    for s in scores:
        if "error" not in s:
            t = totals.setdefault(s["engine"], [0.0, 0.0, 0.0, 0.0])
            t[0], t[1], t[2] = t[0] + s["audio_s"], t[1] + s["wall_s"], t[2] + s["process_s"]
            t[3] += s["process_s"] - s["startup_s"]
    peers = {e: t for e, t in totals.items() if our_settings(e) is None}
    if not peers:
        return []
    lines = _ratios(totals, peers, "the fastest peer")
    wers = {s["engine"]: s["wer"] for s in scores if "error" not in s and s.get("wer") is not None}
    if wers:  # a peer that loses speech is not the one to beat: also against those within 1.25x of the best WER
        limit = ACCURATE_WER_RATIO * min(wers.values())
        accurate = {e: t for e, t in peers.items() if wers.get(e, float("inf")) <= limit}
        lines += (_ratios(totals, accurate, f"the fastest peer with WER <= {100 * limit:.2f} %") if accurate
                  else [f"no peer's WER is within {ACCURATE_WER_RATIO}x of the run's best ({100 * limit:.2f} %)"])
    return lines


ACCURATE_WER_RATIO = 1.25


def _ratios(totals: dict[str, list[float]], peers: dict[str, list[float]], what: str) -> list[str]:
    best = [max(peers, key=lambda e: peers[e][0] / peers[e][k]) for k in (1, 2, 3)]  # per clock: wall, process, steady
    rtfx = [peers[e][0] / peers[e][k] for e, k in zip(best, (1, 2, 3))]
    return [
        f"{engine}: {audio / wall / rtfx[0]:.2f}x {what} ({best[0]}) on the wall clock, "
        f"{audio / process / rtfx[1]:.2f}x ({best[1]}) over the whole process, "
        f"{audio / steady / rtfx[2]:.2f}x ({best[2]}) at steady state"
        for engine, (audio, wall, process, steady) in totals.items() if our_settings(engine) is not None
    ]


def bench(
    manifest: str, engines: list[str], model: str | None, repeat: int, threads: int, echo=print, times: int = 1,
    hours: float | None = None,
) -> list[dict]:
    if times > 1 or hours:
        with tempfile.TemporaryDirectory(prefix="wb-bench-manifest-") as folder:
            built = steady_manifest(manifest, hours, folder) if hours else repeat_manifest(manifest, times, folder)
            return bench(built, engines, model, repeat, threads, echo)
    rows = read_rows(manifest)
    scores = []
    for rnd in range(repeat):
        order = engines if rnd % 2 == 0 else list(reversed(engines))  # alternate, so drift hits all engines
        for engine in order:
            echo(f"round {rnd + 1}/{repeat}: {engine} …")
            result = measure(engine, manifest, model, threads)
            scores.append(result if "error" in result else score(result, rows))
    return scores


def main(argv: list[str]) -> None:
    """Child entry point: ``python -m benchmarks.bench child ENGINE MANIFEST OUT THREADS [MODEL]``."""
    engine, manifest, out, threads = argv[0], argv[1], argv[2], int(argv[3])
    model = argv[4] if len(argv) > 4 and argv[4] else None
    Path(out).write_text(json.dumps(run_engine(engine, manifest, model, threads)))



# --- the command: python -m benchmarks.bench [MANIFEST] [--yardstick] ...

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("manifest", required=False)
@click.option("--engines", default=",".join(("whisper-batch", "whisper-batch-int8", "openai", "faster-int8",
              "faster-batched-int8")), show_default=True,
              help="Comma-separated engines to run, alternating; ours also as NAME:KEY=VALUE+KEY=VALUE (a candidate "
                   "setting on top of the engine's).")
@click.option("--model", "model_spec", default=None, help="Checkpoint for every engine (default: packaged tiny.en).")
@click.option("--repeat", default=1, show_default=True, help="Rounds; the engine order alternates between rounds.")
@click.option("--times", default=1, show_default=True, type=click.IntRange(min=1),
              help="Run a manifest of MANIFEST's rows repeated this many times (a larger corpus, same references).")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Steady state: the yardstick's long-form sets, then MANIFEST's rows repeated, to this many hours "
              "of audio per engine (see the start-up % and steady RTFx columns).")
@click.option("--threads", default=os.cpu_count(), show_default=True, help="CPU threads for the peers.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the figures here.")
@click.option("--yardstick", is_flag=True, help="Accuracy instead: WER per yardstick set for --configs, each paired "
              "with fp32 (rows better/worse, bootstrap 95% interval); no MANIFEST (see benchmarks/make_yardstick.py).")
@click.option("--configs", default="fp32,default,int8", show_default=True, metavar="NAME[:KEY=VALUE+...],...",
              help="--yardstick: configurations by name (fp32, default, int8) or NAME:KEY=VALUE+KEY=VALUE.")
@click.option("--sets", default=None, help="--yardstick: comma-separated sets (default: all).")
def cli(manifest, engines, model_spec, repeat, times, hours, threads, json_out, yardstick, configs, sets) -> None:
    """Side-by-side throughput/WER/memory of whisper-batch and its peers on MANIFEST, in one run."""
    if yardstick:
        from benchmarks.yardstick import format_report, parse_configs
        from benchmarks.yardstick import yardstick as run_yardstick

        try:
            chosen_configs = parse_configs(configs)
            scored, results = run_yardstick(chosen_configs, model_spec, set_names=sets and sets.split(","),
                                            echo=lambda m: click.echo(m, err=True))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"machine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}")
        click.echo(format_report(scored, results))
        if json_out:
            with open(json_out, "w") as f:
                json.dump(scored, f, indent=2)
        return
    if not manifest:
        raise click.UsageError("MANIFEST is required (or --yardstick)")
    chosen = [e.strip() for e in engines.split(",") if e.strip()]
    if unknown := [e for e in chosen if e not in ENGINES and our_settings(e) is None]:
        raise click.UsageError(f"unknown engine(s) {unknown}; choose from: {', '.join(ENGINES)}")
    scores = bench(manifest, chosen, model_spec, repeat, threads, echo=lambda m: click.echo(m, err=True),
                   times=times, hours=hours)
    click.echo(f"machine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}")
    click.echo(format_table(scores))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(scores, f, indent=2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        main(sys.argv[2:])
        # every engine's child, ours and the peers', ends without Python's module teardown: the clock measures the
        # engines' work, the same for each, not the interpreter's exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    cli()
