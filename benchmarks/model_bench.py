"""Throughput of our batched decoding beside the reference openai-whisper on the same log-mel windows.

    python -m benchmarks.model_bench [--batches 1,8,32] [--windows 32] [--model PATH] [--beam-size N] [--repeats 1]

Windows come from the LibriSpeech files of ``../shared/data/eval`` (beside the project) when present, otherwise from
speech made with espeak-ng. Every batch size processes the same windows in chunks of that size; the engines take turns
on every chunk (ours, reference, ours ...) so that a slow-down of the machine hits them alike; with ``--repeats`` the
best total counts. Model loading is timed apart.

The reference is a test-only dependency: it is imported here lazily, and its columns are left out when it is missing.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from whisper_batch.model.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from whisper_batch.model.checkpoint import load_model
from whisper_batch.model.decoding import DecodingOptions, decode
from whisper_batch.model.transcribe import TranscribeOptions, transcribe_windows
from whisper_batch.pipeline.audio import decode_audio

logger = logging.getLogger(__name__)

EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Open the door and turn on the light in the kitchen.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "We are going to the park this afternoon.",
)


@dataclass
class Timing:
    batch: int
    engine: str
    seconds: float  # wall time for all windows, best of the repeats
    windows: int
    audio_seconds: float


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.platform()} ({cpu}), {os.cpu_count()} cores, python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
    )


def read_audio(paths: list[Path]) -> list[np.ndarray]:
    return [decode_audio(p.read_bytes(), name=str(p)) for p in paths]


def librispeech_paths(data_dir: Path) -> list[Path]:
    manifest = data_dir / "manifest.jsonl"
    if not manifest.exists():
        return []
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [data_dir / r["audio_filepath"] for r in rows if r["dataset"].startswith("librispeech")]


def espeak_paths(out_dir: Path) -> list[Path]:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError(f"no LibriSpeech files under {EVAL_DIR} and no espeak-ng to make speech: nothing to decode")
    paths = []
    for i, sentence in enumerate(SENTENCES):
        path = out_dir / f"speech-{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), sentence], check=True)
        paths.append(path)
    return paths


def make_windows(audios: list[np.ndarray], n: int) -> tuple[torch.Tensor, list[int]]:
    """``n`` windows (n, 80, 3000) made as transcription makes them, cycling through ``audios``; frames of audio."""
    mels, frames = [], []
    for i in range(n):
        audio = audios[i % len(audios)][:N_SAMPLES]
        mel = log_mel_spectrogram(audio, padding=N_SAMPLES)[:, : len(audio) // HOP_LENGTH]
        mels.append(pad_or_trim(mel, N_FRAMES))
        frames.append(len(audio) // HOP_LENGTH)
    return torch.stack(mels), frames


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def reference_engine(ckpt, beam_size: int | None) -> Callable[[torch.Tensor], object] | None:
    """``whisper.decode`` on a mel batch (one window per call for beam search), or None without openai-whisper."""
    try:
        import whisper
    except ImportError:
        logger.warning("openai-whisper is not installed: reference columns left out")
        return None
    ref = whisper.model.Whisper(whisper.model.ModelDimensions(**ckpt.dims.to_dict()))
    ref.load_state_dict(ckpt.state_dict)
    ref = ref.float().eval()
    language = "en" if not ckpt.dims.is_multilingual else None
    options = whisper.DecodingOptions(fp16=False, language=language, beam_size=beam_size)

    def run(mel: torch.Tensor):
        mel = mel.float()
        if beam_size is None:
            return whisper.decode(ref, mel, options)
        # the installed reference's batched beam search does not repeat the audio features per beam
        return [whisper.decode(ref, mel[i : i + 1], options)[0] for i in range(len(mel))]

    return run


def run_bench(args: argparse.Namespace) -> tuple[list[Timing], dict[str, float], str]:
    start = time.perf_counter()
    model, tokenizer, ckpt = load_model(args.model, dtype=getattr(torch, args.dtype))
    if args.quantize != "none":  # as the pipeline's Transcriber does for model.quantize=int8
        from whisper_batch.model.quantize import quantize_int8

        model = quantize_int8(model, projection="float" if args.quantize == "int8-float-projection" else "int8",
                              fused=args.fused, decoder=args.quantize != "int8-encoder")
    model.pack_cpu_weights()  # as the pipeline's CPU model actors do (a no-op off the CPU; int8 layers stay int8)
    loads = {"ours: load_model": time.perf_counter() - start}
    start = time.perf_counter()
    reference = None if args.no_reference else reference_engine(ckpt, args.beam_size)
    if reference is not None:
        loads["openai-whisper: build + load_state_dict"] = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        paths = librispeech_paths(Path(args.data)) or espeak_paths(Path(tmp))
        source = f"{len(paths)} files from {paths[0].parent}" if paths else ""
        mel, frames = make_windows(read_audio(paths), args.windows)
        mel = mel.to(model.dtype)
    decoding = DecodingOptions(beam_size=args.beam_size)
    engines: dict[str, Callable[[torch.Tensor, list[int]], object]] = {
        "ours: transcribe_windows": lambda m, f: transcribe_windows(
            model, tokenizer, m, f, TranscribeOptions(decoding=decoding)
        ),
        **(
            {
                "ours: transcribe_windows + word times": lambda m, f: transcribe_windows(
                    model, tokenizer, m, f, TranscribeOptions(decoding=decoding, word_timestamps=True)
                )
            }
            if args.words
            else {}
        ),
        "ours: embed_audio + decode": lambda m, f: decode(model, tokenizer, model.embed_audio(m), decoding),
        "ours: embed_audio alone": lambda m, f: model.embed_audio(m),  # the encoder's share of the above
    }
    if reference is not None:
        engines["openai-whisper: decode"] = lambda m, f: reference(m)

    timings = []
    with torch.no_grad():
        engines["ours: embed_audio + decode"](mel[:1], frames[:1])  # warm-up (allocator, kernels)
        for batch in args.batches:
            best = {name: float("inf") for name in engines}
            for _ in range(args.repeats):
                totals = dict.fromkeys(engines, 0.0)
                for i in range(0, len(mel), batch):
                    for name, engine in engines.items():  # engines take turns on every chunk
                        totals[name] += timed(functools.partial(engine, mel[i : i + batch], frames[i : i + batch]))
                for name, seconds in totals.items():
                    best[name] = min(best[name], seconds)
                    logger.info("batch %d, %s: %.2f s", batch, name, seconds)
            audio_s = sum(frames) * HOP_LENGTH / SAMPLE_RATE
            timings += [Timing(batch, name, s, len(mel), audio_s) for name, s in best.items()]
    return timings, loads, source


def table(timings: list[Timing]) -> str:
    ours_key, ref_key = "ours: embed_audio + decode", "openai-whisper: decode"
    lines = [
        "| batch | engine | windows | audio s | wall s | windows/s | audio s/s | speed-up vs reference |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_batch = {(t.batch, t.engine): t for t in timings}
    for t in timings:
        ref = by_batch.get((t.batch, ref_key))
        compared = ref is not None and t.engine not in (ref_key, "ours: embed_audio alone")
        speedup = f"{ref.seconds / t.seconds:.2f}x" if compared else ""
        lines.append(
            f"| {t.batch} | {t.engine} | {t.windows} | {t.audio_seconds:.1f} | {t.seconds:.2f} | "
            f"{t.windows / t.seconds:.2f} | {t.audio_seconds / t.seconds:.1f} | {speedup} |"
        )
    ours = [by_batch[b, ours_key] for b in sorted({t.batch for t in timings}) if (b, ref_key) in by_batch]
    if ours:
        ratios = ", ".join(f"batch {t.batch}: {by_batch[t.batch, ref_key].seconds / t.seconds:.2f}x" for t in ours)
        lines.append(f"\nSpeed-up of ours (embed_audio + decode) over openai-whisper decode: {ratios}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--windows", type=int, default=32, help="windows decoded at every batch size (default 32)")
    parser.add_argument("--model", default=None, help="model spec or path (default: the bundled tiny.en)")
    parser.add_argument("--beam-size", type=int, default=None, help="beam search instead of greedy decoding")
    parser.add_argument("--repeats", type=int, default=1, help="runs per engine and batch size; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--data", default=str(EVAL_DIR), help="eval data directory with manifest.jsonl")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="our model's dtype (the reference runs in fp32 on the CPU)")
    parser.add_argument("--quantize", default="none",
                        choices=("none", "int8", "int8-float-projection", "int8-encoder"),
                        help="int8 layers (model/quantize.py; needs --dtype float32); int8-float-projection keeps the "
                             "vocabulary projection in fp32, int8-encoder quantises the encoder only")
    parser.add_argument("--fused", action="store_true",
                        help="int8 layers' quantisation and rescale compiled (torch.compile), as model.compile does")
    parser.add_argument("--no-reference", action="store_true", help="leave openai-whisper out (ours only)")
    parser.add_argument("--words", action="store_true",
                        help="also time transcribe_windows with word timestamps (their cost per window)")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not args.batches or min(args.batches) < 1 or args.windows < 1 or args.repeats < 1:
        parser.error("--batches, --windows and --repeats need positive integers")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    timings, loads, source = run_bench(args)
    decoding = f"beam search ({args.beam_size} beams)" if args.beam_size else "greedy"
    print(f"\nMachine: {machine()}")
    model = args.model or "tiny.en"
    print(f"Windows: {args.windows} x 30 s windows cycling through {source}; {decoding} decoding; model {model}")
    print("Model load: " + ", ".join(f"{name} {s:.2f} s" for name, s in loads.items()) + "\n")
    print(table(timings))


if __name__ == "__main__":
    main()
