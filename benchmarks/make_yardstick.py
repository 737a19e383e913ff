"""Build the accuracy yardstick's harder sets from the eval data in ``../shared/data/eval`` (read there, never copied).

``python -m benchmarks.make_yardstick [--data DIR] [--out DIR]`` writes, under ``--out`` (default
``~/.cache/whisper-batch/yardstick``), one folder per derived set with its audio and a ``manifest.jsonl``, and
prints the reference words of every set the yardstick scores (the two dev manifests included). Every LibriSpeech row
of ``manifest.jsonl`` and ``manifest-other.jsonl`` (test-clean and test-other) is made harder four ways:

- ``noise-snr10``: pink noise (1/f, numpy, seed = crc32 of the row id + ``--seed``) added at 10 dB SNR over the
  whole utterance, written as 16-bit WAV;
- ``reverb``: sox ``reverb 80 50 100 100 20`` (reverberance %, HF damping %, room scale %, stereo depth %,
  pre-delay ms: a large room, dry and wet mixed);
- ``telephone-8k``: sox ``sinc 300-3400``, resampled to 8 kHz and stored as G.711 mu-law (a phone line);
- ``espeak``: the test-other reference sentences read by espeak-ng, voices and rates (120, 170, 220 wpm) cycling
  row by row (the texts are fixed; so is espeak-ng's output for a given version).

A set whose manifest exists is kept (delete its folder to rebuild); the same inputs and versions give the same
audio. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import wave
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper-batch" / "yardstick"
DEV_MANIFESTS = {"dev-clean": "manifest.jsonl", "dev-other": "manifest-other.jsonl"}
DERIVED = ("noise-snr10", "reverb", "telephone-8k", "espeak")
SNR_DB = 10.0
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
RATES = (120, 170, 220)
SR = 16000


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def librispeech_rows(data: Path) -> list[dict[str, Any]]:
    """The LibriSpeech rows (with a reference) of both dev manifests, audio paths made absolute."""
    rows = []
    for name in DEV_MANIFESTS.values():
        for r in read_jsonl(data / name):
            if r.get("text") and r["dataset"].startswith("librispeech"):
                rows.append({**r, "audio_filepath": str(data / r["audio_filepath"])})
    return rows


def reference_words(text: str | None) -> int:
    """Reference words after Whisper's English normaliser (what WER divides by)."""
    if not text:
        return 0
    from whisper_normalizer.english import EnglishTextNormalizer

    return len(EnglishTextNormalizer()(text).split())


def _decode(path: str) -> np.ndarray:
    from whisper_batch.pipeline.audio import decode_audio

    return decode_audio(Path(path).read_bytes(), name=path)


def _write_wav(path: Path, audio: np.ndarray, sr: int = SR) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of 1/f noise (white noise shaped in the frequency domain), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    noise = np.fft.irfft(spectrum / np.sqrt(f), n)
    return noise / (np.sqrt(np.mean(noise**2)) or 1.0)


def add_noise(audio: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """``audio`` plus pink noise at ``snr_db`` (signal power over noise power, whole utterance); peak kept below 1."""
    power = float(np.mean(audio.astype(np.float64) ** 2))
    noise = pink_noise(len(audio), np.random.default_rng(seed)) * np.sqrt(power / 10 ** (snr_db / 10))
    mixed = audio + noise
    peak = float(np.max(np.abs(mixed))) if len(mixed) else 0.0
    return (mixed / peak * 0.95 if peak > 0.95 else mixed).astype(np.float32)


def _sox(row, dst: Path, effects: tuple[str, ...], output: tuple[str, ...] = ()) -> None:
    """``sox -R IN [output] DST [effects]`` on the row's audio, decoded first to a temporary WAV IN (sox reads WAV;
    the sources are FLAC/WAV of any rate)."""
    tmp = dst.with_suffix(".in.wav")
    _write_wav(tmp, _decode(row["audio_filepath"]))
    try:
        subprocess.run(["sox", "-R", str(tmp), *output, str(dst), *effects], check=True, capture_output=True)
    finally:
        tmp.unlink(missing_ok=True)


def make_noise(row, dst: Path, seed: int) -> None:
    _write_wav(dst, add_noise(_decode(row["audio_filepath"]), SNR_DB, seed + zlib.crc32(row["id"].encode())))


def make_reverb(row, dst: Path, seed: int) -> None:
    _sox(row, dst, ("reverb", "80", "50", "100", "100", "20", "norm", "-1"))


def make_telephone(row, dst: Path, seed: int) -> None:
    _sox(row, dst, ("sinc", "300-3400"), output=("-r", "8000", "-e", "u-law"))


def make_espeak(row, dst: Path, seed: int) -> None:
    i = row["_index"]
    voice, rate = VOICES[i % len(VOICES)], RATES[i % len(RATES)]
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(dst), row["text"].lower()],
                   check=True, capture_output=True)


MAKERS: dict[str, Callable] = {
    "noise-snr10": make_noise, "reverb": make_reverb, "telephone-8k": make_telephone, "espeak": make_espeak,
}


def build_set(name: str, rows: list[dict[str, Any]], out: Path, seed: int, workers: int = 2) -> Path:
    """Build one derived set under ``out/name`` (kept if its manifest exists); returns its manifest path."""
    folder = out / name
    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    if name == "espeak":  # the test-other sentences, read by the synthesiser
        rows = [r for r in rows if r["dataset"] == "librispeech-test-other"]
    rows = [{**r, "_index": i} for i, r in enumerate(rows)]
    maker = MAKERS[name]

    def one(row):
        dst = folder / f"{row['id']}.wav"
        maker(row, dst, seed)
        return {"id": f"{name}/{row['id']}", "audio_filepath": dst.name, "text": row["text"], "dataset": name,
                "source": f"{row['id']} ({row['dataset']}) via benchmarks/make_yardstick.py {name}, seed {seed}"}

    with ThreadPoolExecutor(workers) as pool:
        out_rows = list(pool.map(one, rows))
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    tmp.replace(manifest)  # the manifest last: a set with a manifest is complete
    return manifest


def yardstick_sets(data: Path = EVAL_DIR, out: Path = CACHE_DIR, seed: int = 0,
                   sets: tuple[str, ...] = DERIVED) -> dict[str, Path]:
    """Every set's manifest by name: the dev manifests as they are, the derived sets built if missing."""
    if not (data / "manifest.jsonl").exists():
        raise FileNotFoundError(f"no eval data at {data} (expected manifest.jsonl and manifest-other.jsonl)")
    missing = [t for t in ("sox", "espeak-ng") if shutil.which(t) is None]
    if missing and not all((out / s / "manifest.jsonl").exists() for s in sets):
        raise RuntimeError(f"{' and '.join(missing)} needed to build the yardstick's sets "
                           "(apt-get install sox espeak-ng)")
    manifests = {name: data / file for name, file in DEV_MANIFESTS.items()}
    rows = librispeech_rows(data)
    for name in sets:
        manifests[name] = build_set(name, rows, out, seed)
    return manifests


def count_words(manifests: dict[str, Path]) -> dict[str, tuple[int, int]]:
    """Per set: (rows with a reference, normalised reference words)."""
    counts = {}
    for name, path in manifests.items():
        rows = [r for r in read_jsonl(path) if r.get("text")]
        counts[name] = (len(rows), sum(reference_words(r["text"]) for r in rows))
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=EVAL_DIR,
                   help="eval data folder (manifest.jsonl, manifest-other.jsonl)")
    p.add_argument("--out", type=Path, default=CACHE_DIR, help="where the derived sets are written")
    p.add_argument("--seed", type=int, default=0, help="noise seed (added to each row id's crc32)")
    args = p.parse_args(argv)
    manifests = yardstick_sets(args.data, args.out, args.seed)
    counts = count_words(manifests)
    for name, (rows, words) in counts.items():
        print(f"{name:14s} {rows:5d} rows {words:7d} words  {manifests[name]}")
    print(f"{'total':14s} {sum(r for r, _ in counts.values()):5d} rows {sum(w for _, w in counts.values()):7d} words")


if __name__ == "__main__":
    main()
