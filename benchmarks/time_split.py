"""Where the time of a run goes: the model's parts in one process, and the whole pipeline's start, work and end.

    python -m benchmarks.time_split MANIFEST [--times N | --hours H] [--set KEY=VALUE ...] [--skip-pipeline]

1. One process, one torch thread, no Ray (what one model actor does, on all of MANIFEST's rows, in model calls as
   the pipeline's featurizer makes them): seconds of features (decode + log-mel), encoder passes
   (``Whisper.embed_audio``, with the windows encoded), decoding at each temperature (greedy, then the fallback
   passes) with its decoder steps, the alignment passes (word timing, the skip check), and the rest (batching,
   segments, text). Beside the encoder and the decoder steps, the bound each meets: the encoder's arithmetic
   (GFLOP/s) against one core's bf16/fp32 matmul peak as oneDNN reaches it here, the decoder steps' memory traffic
   (weights, cross-attention keys and values, the self-attention cache: GB/s) against one core's read bandwidth.
2. The pipeline, ``whisper-batch run``'s code on a local Ray over MANIFEST repeated ``--times`` times (default 4):
   seconds of Ray's start, from the run's start to the first model call, the model calls (per actor), and from the
   last call to the run's end; then the CPU seconds of every process of the Ray session.

``--hours H`` runs both parts on the bench's steady-state corpus instead (the yardstick's long-form sets, then
MANIFEST's rows repeated to H hours: ``benchmarks.bench.steady_manifest``). ``--encoder-profile`` adds torch.profiler's
table of one encoder pass over 4 windows (the ops the encoder's time goes to beside its matmuls); ``--step-profile``
one greedy decoder step's time over 16 windows of 15 s, the vocabulary projection's and the logit rules', and its
table.

Figures are for the machine it runs on; two cores are shared by every process of the pipeline, so part 2's seconds
are wall seconds of a contended machine, part 1's those of one core.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def timed_methods(targets: list[tuple[Any, str, Callable[..., tuple[str, int]]]],
                  totals: dict[str, list[float]]) -> Iterator[None]:
    """Wraps ``owner.name`` so that each call adds its seconds and a count to ``totals[key]``, where
    ``(key, count) = tally(*args)``; restored after."""
    saved = []
    for owner, name, tally in targets:
        real = getattr(owner, name)

        def wrapper(*args, _real=real, _tally=tally, **kwargs):
            t0 = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                key, count = _tally(*args, **kwargs)
                acc = totals.setdefault(key, [0.0, 0])
                acc[0] += time.perf_counter() - t0
                acc[1] += count

        saved.append((owner, name, real))
        setattr(owner, name, wrapper)
    try:
        yield
    finally:
        for owner, name, real in saved:
            setattr(owner, name, real)


def encoder_flops(dims: Any, frames: int) -> float:
    """Floating-point operations (2 per multiply-add) of one encoder pass over ``frames`` mel frames: the two convs,
    then per layer the four attention projections and the MLP (24 T C^2) and the attention itself (4 T^2 C)."""
    c, t = dims.n_audio_state, frames // 2
    convs = 2 * frames * dims.n_mels * c * 3 + 2 * t * c * c * 3
    return convs + dims.n_audio_layer * (24 * t * c * c + 4 * t * t * c)


def decoder_weight_bytes(model: Any) -> int:
    """Bytes of the decoder's weights a step reads once for the whole batch (the token embedding as the vocabulary
    projection; the positional embedding, of which a step reads one row, left out)."""
    return sum(p.numel() * p.element_size() for name, p in model.decoder.named_parameters()
               if "positional_embedding" not in name)


def step_bytes(weights: int, tokens: Any, cache: Any, n_vocab: int) -> float:
    """Bytes one decoder step moves at least once: the weights, every window's cross-attention keys and values, the
    self-attention cache so far, and the fp32 logits it writes."""
    rows, new = tokens.shape
    layers, n_audio, heads, ctx, d = cache.cross_k.shape
    elem = cache.cross_k.element_size()
    positions = sum(cache.cross_lengths) if cache.cross_lengths is not None else n_audio * ctx  # padding is not read
    cross = 2 * layers * heads * positions * d * elem
    own = 2 * layers * rows * heads * (cache.length + new) * d * elem
    return weights + cross + own + rows * new * n_vocab * 4


def core_peaks(dtype: Any, repeats: int = 5) -> dict[str, float]:
    """One core's matmul peak in ``dtype`` (GFLOP/s of a 1536-wide product through the packed oneDNN linear the
    model uses, best of ``repeats``) and its read bandwidth (GB/s of a sum over 1 GiB of fp32, best of 3)."""
    import torch

    from whisper_batch.model.torch_compat import pack_linear_weight, packed_linear

    torch.set_num_threads(1)
    n = 1536
    a, w = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    packed = pack_linear_weight(w)
    product = (lambda: packed_linear(a, packed)) if packed is not None else (lambda: a @ w.T)
    product()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - t0)
    x = torch.ones(1 << 28)  # 1 GiB of fp32
    read = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x.sum()
        read = min(read, time.perf_counter() - t0)
    return {"matmul_gflops": 2 * n**3 / best / 1e9, "read_gbs": x.numel() * 4 / read / 1e9}


def encoder_profile(overrides: list[str], windows: int = 4) -> str:
    """torch.profiler's table (ops by their own CPU time) of one encoder pass over ``windows`` 30 s windows of noise,
    the model as a model actor holds it, one thread."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from whisper_batch.pipeline.config import load_config
    from whisper_batch.pipeline.transcriber import Transcriber

    torch.set_num_threads(1)
    model = Transcriber(load_config(None, overrides)).model
    mel = torch.randn(windows, model.dims.n_mels, 2 * model.dims.n_audio_ctx).to(model.dtype)
    with torch.inference_mode():
        model.embed_audio(mel)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.embed_audio(mel)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)


def step_profile(overrides: list[str], rows: int = 16, positions: int = 750, steps: int = 40) -> str:
    """One greedy decoder step as a model actor takes it, one thread: ``rows`` windows of ``positions`` encoder
    positions each (750: a 15 s pass), 30 tokens into their text. The step's mean time, the vocabulary projection's
    and the logit rules' (timed alone), and torch.profiler's table of 10 steps (ops by their own CPU time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from whisper_batch.model.decoding import DecodingOptions, LogitRules, initial_tokens
    from whisper_batch.pipeline.config import load_config
    from whisper_batch.pipeline.transcriber import Transcriber

    torch.set_num_threads(1)
    transcriber = Transcriber(load_config(None, overrides))
    model, tk = transcriber.model, transcriber.tokenizer
    features = torch.randn(rows, positions, model.dims.n_audio_state).to(model.dtype)
    prompt = initial_tokens(tk, DecodingOptions(), "en", model.dims.n_text_ctx)
    tokens = torch.tensor([prompt] * rows)
    text = torch.cat([tokens, torch.full((rows, 30), tk.encode(" the")[0])], dim=1)
    rules = LogitRules(tk, DecodingOptions(), len(prompt), model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    x = torch.randn(rows, 1, model.dims.n_text_state).to(model.dtype)

    def mean_ms(f) -> float:
        f()
        t0 = time.perf_counter()
        for _ in range(steps):
            f()
        return (time.perf_counter() - t0) / steps * 1e3

    with torch.inference_mode():
        cache = model.new_cache(features, max_len=len(prompt) + 30 + steps + 20)
        model.decode_step(text[:, :-1], cache)
        step_ms = mean_ms(lambda: model.decode_step(text[:, -1:], cache))
        logits = model.decode_step(text[:, -1:], cache)[:, -1]
        rules_ms = mean_ms(lambda: rules.apply(logits.clone(), text))
        projection_ms = mean_ms(lambda: model.decoder.project(x))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                model.decode_step(text[:, -1:], cache)
    return (f"{rows} rows x {positions} positions: a step {step_ms:.2f} ms, of which the vocabulary projection "
            f"{projection_ms:.2f} ms; the logit rules {rules_ms:.2f} ms beside it\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def model_split(manifest: str, overrides: list[str]) -> dict[str, Any]:
    """Part 1: one process, one thread; seconds per part of the model stage over the manifest's rows, with the
    encoder's operations and the decoder steps' bytes for their bounds."""
    import torch

    import whisper_batch.model.transcribe as transcribe_module
    from whisper_batch.model.constants import FRAMES_PER_SECOND
    from whisper_batch.model.transcribe import FRAMES_PER_TIMESTAMP
    from whisper_batch.model.whisper import Whisper
    from whisper_batch.pipeline.calls import CallShape, iter_calls
    from whisper_batch.pipeline.cluster import call_windows
    from whisper_batch.pipeline.config import load_config
    from whisper_batch.pipeline.features import Featurizer
    from whisper_batch.pipeline.manifest import read_manifest
    from whisper_batch.pipeline.transcriber import Transcriber

    torch.set_num_threads(1)
    cfg = load_config(None, overrides)
    rows = [{"uri": r.uri, "audio_filepath": r.audio_filepath, "offset": r.offset, "duration": r.duration,
             "language": r.language, "row_index": r.index, "shard_id": 0} for r in read_manifest(manifest)]
    t0 = time.perf_counter()
    transcriber = Transcriber(cfg)
    load_s = time.perf_counter() - t0
    model = transcriber.model
    t0 = time.perf_counter()
    items = Featurizer(cfg, transcriber.n_mels).featurize_rows(rows)
    features_s = time.perf_counter() - t0
    shape = CallShape(cfg.ray.model_batch_size or 4, call_windows(cfg, 0.0), 1, cfg.decode.padding_seconds is not None)
    calls = list(iter_calls(items, shape))  # as one featurizer makes them for a CPU model actor
    totals: dict[str, list[float]] = {}
    work = {"flops": 0.0, "bytes": 0.0}
    weights = decoder_weight_bytes(model)

    def encoder_tally(self, mel):
        work["flops"] += mel.shape[0] * encoder_flops(self.dims, mel.shape[-1])
        return "encoder", mel.shape[0]  # counts windows

    passes: dict[str, list[float]] = {}  # kind -> [windows, seconds of audio, seconds encoded]

    def pass_tally(self, todo, lengths):
        for s, length in zip(todo, lengths):  # a window's first pass, a continuation after a timestamp, a probe of a
            kind = "probe" if s.probe else ("continuation" if s.frame else "first pass")  # rest after a lone one
            p = passes.setdefault(kind, [0, 0.0, 0.0])
            p[0] += 1
            p[1] += (self.frames[s.window] - s.frame) / FRAMES_PER_SECOND
            p[2] += length * FRAMES_PER_TIMESTAMP / FRAMES_PER_SECOND
        return "encoder passes", len(todo)

    def step_tally(self, tokens, cache):
        work["bytes"] += step_bytes(weights, tokens, cache, self.dims.n_vocab)
        return "decoder steps", 1

    targets = [
        (Whisper, "embed_audio", encoder_tally),
        (Whisper, "decode_step", step_tally),
        (transcribe_module.WindowBatch, "encode", pass_tally),
        (transcribe_module, "decode",
         lambda model, tok, feats, opts, *_: (f"decode at T={opts.temperature:g}", 1)),
        (transcribe_module.WindowBatch, "align",
         lambda self, features, todo, *_, **__: ("alignment passes", len(todo))),
    ]
    with timed_methods(targets, totals):
        t0 = time.perf_counter()
        for call in calls:
            transcriber.transcribe_rows(call)
        model_s = time.perf_counter() - t0
    decode = {k: v for k, v in sorted(totals.items()) if k.startswith("decode at")}
    encoder_s, windows = totals.get("encoder", [0.0, 0])
    align_s, aligned = totals.get("alignment passes", [0.0, 0])
    return {
        "rows": len(rows), "audio_s": sum(r["duration"] or 0 for r in rows), "load_s": load_s,
        "features_s": features_s, "model_s": model_s,
        "encoder_s": encoder_s, "encoder_windows": windows, "encoder_flops": work["flops"], "decode": decode,
        "decoder_steps": totals.get("decoder steps", [0.0, 0]), "step_bytes": work["bytes"],
        "align_s": align_s, "aligned_windows": aligned, "dtype": model.dtype, "passes": passes,
        "other_s": model_s - encoder_s - align_s - sum(s for s, _ in decode.values()),
    }


def pipeline_split(manifest: str, overrides: list[str]) -> dict[str, Any]:
    """Part 2: ``run`` on a local Ray; the phases from Ray's task timeline and the processes' CPU seconds."""
    import ray

    from whisper_batch.jobs.run import init_ray, run
    from whisper_batch.pipeline.config import load_config

    cfg = load_config(None, overrides)
    seen: dict[int, tuple[float, str]] = {}  # pid -> (CPU seconds, name), sampled: actors exit before the run ends
    own_before = process_cpu(os.getpid())
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            seen.update(ray_processes())

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.time()
    init_ray(cfg)
    t_ray = time.time()
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="wb-time-split-") as out:
        run(manifest, out, cfg, echo=lambda *_: None)
    t_end = time.time()
    stop.set()
    sampler.join()
    seen.update(ray_processes())
    seen[os.getpid()] = (process_cpu(os.getpid()) - own_before, "this driver")
    inits, calls = actor_calls(t_ray)
    model_actors = [t for t, (_, _, cls) in inits.items() if "ArrowTranscriber" in cls]
    first = min((s for t in model_actors for s, _ in calls[t]), default=float("nan"))
    last = max((s + d for t in model_actors for s, d in calls[t]), default=float("nan"))
    cpu = sorted(((round(c, 2), name) for c, name in seen.values()), reverse=True)
    ray.shutdown()
    return {
        "ray_start_s": t_ray - t0, "run_s": t_end - t_ray, "first_model_call_s": first,
        "actor_init_s": sorted(round(d, 2) for _, d, _ in inits.values() if d > 0.5),
        "model_call_s": {t[-8:]: round(sum(d for _, d in calls[t]), 2) for t in model_actors},
        "after_last_call_s": (t_end - t_ray) - last, "process_cpu_s": cpu,
    }


def actor_calls(t0: float) -> tuple[dict[str, tuple[float, float, str]], dict[str, list[tuple[float, float]]]]:
    """From the connected Ray's task timeline, per actor (worker id): its ``__init__`` (start in seconds after ``t0``,
    a ``time.time()``; duration; the actor's class, e.g. ``MapWorker(MapBatches(ArrowTranscriber))``) and its calls
    (start, duration)."""
    import ray

    calls: dict[str, list[tuple[float, float]]] = {}
    inits: dict[str, tuple[float, float, str]] = {}
    for e in ray.timeline():
        if e.get("ph") != "X":
            continue
        start, dur = e["ts"] / 1e6 - t0, e["dur"] / 1e6
        if e["name"] == "__init__":
            inits[e["tid"]] = (start, dur, e.get("cat", "").removeprefix("task::").removesuffix(".__init__"))
        elif e["name"] == "task:execute" and dur > 0.05:
            calls.setdefault(e["tid"], []).append((start, dur))
    for t, (start, dur, _) in inits.items():  # an actor's creation task runs its __init__: not a call
        calls[t] = [c for c in calls.get(t, []) if c[0] >= start + dur - 1e-3]
    return inits, calls


def first_model_call(t0: float) -> float:
    """Seconds after ``t0`` (a ``time.time()``) at which the run's first model call started (the model actors: the
    ``ArrowTranscriber`` pool's)."""
    inits, calls = actor_calls(t0)
    return min((s for t, (_, _, cls) in inits.items() if "ArrowTranscriber" in cls for s, _ in calls[t]),
               default=float("nan"))


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ray_processes() -> dict[int, tuple[float, str]]:
    """CPU seconds and name of each Ray process on this machine (``ray::`` workers, the GCS, raylets)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmd.startswith("ray::") or "gcs_server" in cmd or "raylet" in cmd:
            name = cmd.split()[0].rsplit("/", 1)[-1]
            out[int(pid)] = (process_cpu(int(pid)), name[:60])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_split", description=__doc__.split("\n\n")[0])
    p.add_argument("manifest")
    p.add_argument("--times", type=int, default=4, help="the pipeline's manifest: MANIFEST's rows this many times")
    p.add_argument("--hours", type=float, default=None,
                   help="both parts on the steady-state corpus: the long-form sets, then MANIFEST repeated, H hours")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-pipeline", action="store_true", help="part 1 only")
    p.add_argument("--encoder-profile", action="store_true", help="also torch.profiler's table of an encoder pass")
    p.add_argument("--step-profile", action="store_true",
                   help="also a decoder step's time and torch.profiler's table (16 windows of 15 s)")
    args = p.parse_args(argv)
    from benchmarks.bench import repeat_manifest, steady_manifest

    if args.encoder_profile:
        print("one encoder pass over 4 windows, one thread:\n" + encoder_profile(args.sets))
    if args.step_profile:
        print("one decoder step, one thread:\n" + step_profile(args.sets))
    with tempfile.TemporaryDirectory(prefix="wb-time-split-") as folder:
        steady = steady_manifest(args.manifest, args.hours, folder) if args.hours else None
        report_model(model_split(steady or args.manifest, args.sets), args.sets)
        if args.skip_pipeline:
            return
        manifest = steady or (repeat_manifest(args.manifest, args.times, folder) if args.times > 1 else args.manifest)
        r = pipeline_split(manifest, args.sets)
    corpus = f"{args.hours:g} h steady-state corpus" if steady else f"the manifest x{args.times}"
    print(f"pipeline (local Ray, {os.cpu_count()} cores, {corpus}):")
    print(f"  Ray start {r['ray_start_s']:.2f} s; run {r['run_s']:.2f} s: first model call at "
          f"{r['first_model_call_s']:.2f} s, the last call ends {r['after_last_call_s']:.2f} s before the run does")
    print(f"  actor start-ups (s): {r['actor_init_s']}; model calls per actor (s): {r['model_call_s']}")
    print("  CPU seconds by process: " + ", ".join(f"{name} {s:.1f}" for s, name in r["process_cpu_s"][:8]))


def report_model(m: dict[str, Any], sets: list[str]) -> None:
    """Part 1's table: seconds and share of the model's time per stage, and the bound the encoder and the decoder
    steps meet on this core."""
    peaks = core_peaks(m["dtype"])
    model_s = m["model_s"]
    print(f"one process, one thread, {m['rows']} rows, {m['audio_s'] / 60:.1f} min of audio "
          f"({' '.join(sets) or 'defaults'}; model in {str(m['dtype']).removeprefix('torch.')}):")
    print(f"  model load {m['load_s']:.2f} s; features (decode + log-mel) {m['features_s']:.2f} s")
    print(f"  model {model_s:.2f} s ({m['audio_s'] / model_s:.1f}x real time on one core):")

    def line(name: str, seconds: float, extra: str = "") -> None:
        print(f"    {name}: {seconds:.2f} s, {100 * seconds / model_s:.1f} %{extra}")

    gflops = m["encoder_flops"] / max(m["encoder_s"], 1e-9) / 1e9
    line("encoder", m["encoder_s"], f" ({m['encoder_windows']} windows; {gflops:.0f} GFLOP/s = "
         f"{100 * gflops / peaks['matmul_gflops']:.0f} % of the core's matmul peak, {peaks['matmul_gflops']:.0f})")
    for kind, (n, audio, encoded) in m["passes"].items():
        print(f"      {kind}: {n} windows, {audio:.0f} s of audio encoded as {encoded:.0f} s")
    for key, (s, n) in m["decode"].items():
        line(key, s, f" over {n} call(s)")
    steps_s, steps = m["decoder_steps"]
    gbs = m["step_bytes"] / max(steps_s, 1e-9) / 1e9
    print(f"      (of the decoding: {steps} decoder steps, {steps_s:.2f} s, {1e3 * steps_s / max(steps, 1):.2f} ms "
          f"a step; {gbs:.1f} GB/s = {100 * gbs / peaks['read_gbs']:.0f} % of the core's read bandwidth, "
          f"{peaks['read_gbs']:.1f})")
    line("alignment passes (word timing, skip check)", m["align_s"], f" over {m['aligned_windows']} windows")
    line("other (batching, segments, text)", m["other_s"])


if __name__ == "__main__":
    main()
