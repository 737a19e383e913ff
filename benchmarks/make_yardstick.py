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

and joins the same 142 utterances into long recordings (the long-form sets, about 22 minutes each, 68 minutes in all
with the real recordings):

- ``long-silence``: files of about 4 minutes, 0.3-2.0 s of digital silence between utterances;
- ``long-gaps``: files of about 6 minutes; each gap 0.5-8 s of silence, low pink noise or synthetic music (chords
  of sine partials with a beat), the way podcasts and broadcasts put jingles between speech;
- ``long-10min``: files of about 10 minutes, 0.2-1.0 s of low-level noise between utterances (continuous speech);
- ``longform-real``: the real long recordings of ``../shared/data/eval/longform`` that have a reference.

Each long set takes the utterances in its own seeded order; a long row's ``parts`` lists where each utterance lies
(start and end seconds, id), so tests and benchmarks can check times and deletions against known speech.

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
# name -> (target file length s, gap range s, gap kinds): utterances joined into long recordings
LONG_SETS: dict[str, tuple[float, tuple[float, float], tuple[str, ...]]] = {
    "long-silence": (240.0, (0.3, 2.0), ("silence",)),
    "long-gaps": (360.0, (0.5, 8.0), ("silence", "noise", "music")),
    "long-10min": (600.0, (0.2, 1.0), ("noise",)),
}
LONG = (*LONG_SETS, "longform-real")
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


def gap_audio(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """``seconds`` of what goes between two utterances: digital silence, pink noise at -50 dBFS RMS, or music (three
    sine chords with partials and a 4 Hz beat at -20 dBFS, faded in and out)."""
    n = int(round(seconds * SR))
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "noise":
        return (pink_noise(n, rng) * 10 ** (-50 / 20)).astype(np.float32)
    t = np.arange(n) / SR
    music = np.zeros(n)
    root = float(rng.choice([110.0, 146.8, 196.0, 220.0]))
    for ratio in (1.0, 1.26, 1.5):  # a major triad, three partials each
        for k, amp in ((1, 1.0), (2, 0.5), (3, 0.25)):
            music += amp * np.sin(2 * np.pi * root * ratio * k * t + rng.uniform(0, 2 * np.pi))
    music *= 1 + 0.3 * np.sin(2 * np.pi * 4 * t)
    fade = np.minimum(1.0, np.minimum(t, t[::-1] if n else t) / 0.2)
    music *= fade / (np.sqrt(np.mean(music**2)) or 1.0) * 10 ** (-20 / 20)
    return music.astype(np.float32)


def build_long_set(name: str, rows: list[dict[str, Any]], out: Path, seed: int) -> Path:
    """Join every utterance of ``rows`` into long recordings under ``out/name`` (see LONG_SETS)."""
    folder = out / name
    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    target, (gap_lo, gap_hi), kinds = LONG_SETS[name]
    rng = np.random.default_rng(seed + zlib.crc32(name.encode()))
    order = [rows[i] for i in rng.permutation(len(rows))]
    groups: list[list[tuple[dict[str, Any], np.ndarray]]] = [[]]
    length = 0.0
    for row in order:
        audio = _decode(row["audio_filepath"])
        if length >= target:
            groups.append([])
            length = 0.0
        groups[-1].append((row, audio))
        length += len(audio) / SR
    if len(groups) > 1 and sum(len(a) for _, a in groups[-1]) / SR < target / 2:  # no short leftover file
        last = groups.pop()
        groups[-1] += last
    out_rows = []
    for k, group in enumerate(groups):
        pieces, parts, at = [], [], 0
        for j, (row, audio) in enumerate(group):
            if j:
                gap = gap_audio(str(rng.choice(kinds)), float(rng.uniform(gap_lo, gap_hi)), rng)
                pieces.append(gap)
                at += len(gap)
            pieces.append(audio)
            parts.append({"id": row["id"], "text": row["text"], "start": round(at / SR, 3),
                          "end": round((at + len(audio)) / SR, 3)})
            at += len(audio)
        file = folder / f"{name}-{k:02d}.flac"
        _write_flac(file, np.concatenate(pieces))
        out_rows.append({"id": f"{name}/{k:02d}", "audio_filepath": file.name, "dataset": name,
                         "text": " ".join(row["text"] for row, _ in group), "duration": round(at / SR, 3),
                         "parts": parts, "source": f"{len(group)} LibriSpeech rows joined by "
                                                   f"benchmarks/make_yardstick.py {name}, seed {seed}"})
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    tmp.replace(manifest)
    return manifest


def _write_flac(path: Path, audio: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.wav")
    _write_wav(tmp, audio)
    try:
        subprocess.run(["sox", str(tmp), str(path)], check=True, capture_output=True)
    finally:
        tmp.unlink(missing_ok=True)


def build_longform_real(data: Path, out: Path) -> Path:
    """The real long recordings with a reference, audio read in place (paths made absolute)."""
    folder = out / "longform-real"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    rows = [{**r, "audio_filepath": str(data / r["audio_filepath"]), "dataset": "longform-real"}
            for r in read_jsonl(data / "manifest.jsonl") if r["dataset"].startswith("longform") and r.get("text")]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


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
                   sets: tuple[str, ...] = DERIVED + LONG) -> dict[str, Path]:
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
        if name in LONG_SETS:
            manifests[name] = build_long_set(name, rows, out, seed)
        elif name == "longform-real":
            manifests[name] = build_longform_real(data, out)
        else:
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
