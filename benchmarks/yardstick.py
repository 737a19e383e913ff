"""The accuracy yardstick: WER per set for candidate configurations, and a paired comparison against fp32.

``python -m benchmarks.bench --yardstick`` transcribes every set built by :mod:`benchmarks.make_yardstick` (the two dev
manifests plus noisy, reverberant, telephone and synthetic-voice copies: 12,851 reference words) once per configuration,
through the quick in-process path of ``pipeline/`` (:class:`~whisper_batch.pipeline.features.Featurizer` and
:class:`~whisper_batch.pipeline.transcriber.Transcriber`, as ``whisper-batch transcribe`` uses), and compares each
candidate with the fp32 reference on the same rows: rows better, rows worse, and a bootstrap 95 % interval of the
WER difference (rows resampled with a fixed seed). A change keeps accuracy when that interval contains zero or lies
below it.

:func:`paired_compare` and :func:`row_errors` are pure (numpy, jiwer); transcription results are cached per
configuration and set under the yardstick's cache folder, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np


def file_overrides(path: Path) -> list[str]:
    """A config file's fields as overrides (``section.key=value``, the value in YAML's flow style)."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return [f"{section}.{key}={json.dumps(value)}" for section, fields in data.items() for key, value in fields.items()]


# name -> config overrides; "fp32" (the reference's windows and fallback, in fp32: configs/reference.yaml) is the
# reference every other configuration is compared with
REFERENCE_WINDOWS = ["decode.padding_seconds=null", "decode.temperatures=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]",
                     "decode.probe_logprob_threshold=-0.7"]
CONFIGS: dict[str, list[str]] = {
    "fp32": ["model.dtype=float32", "model.quantize=none", *REFERENCE_WINDOWS],
    "default": [],
    "int8": ["model.quantize=int8"],
    "int8-bf16": ["model.quantize=int8", "model.dtype=bfloat16"],
}
CONFIG_FILES = Path(__file__).resolve().parents[1] / "configs"
for _name in ("reference", "cpu-fast"):  # a checkout: judge the shipped files themselves (a wheel has no configs/)
    if (CONFIG_FILES / f"{_name}.yaml").exists():
        CONFIGS[_name] = file_overrides(CONFIG_FILES / f"{_name}.yaml")
REFERENCE = "fp32"
# the peers, as engines users run today, on the same weights: openai-whisper's sequential transcribe() (its defaults:
# temperature fallback, condition_on_previous_text) and faster-whisper's batched pipeline (batch 8, int8, its VAD)
PEERS = {"openai": "openai", "faster-batched": "faster-batched-int8"}
SEQUENTIAL = "openai"  # the long-form sets are also paired against the reference's sequential decoding
RUN_WORDS = 5  # a deletion (insertion) run: this many or more consecutive reference (hypothesis) words
BOOTSTRAP_SAMPLES = 2000


# ---- statistics (pure) ----


def row_errors(references: list[str], hypotheses: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: word errors (substitutions + deletions + insertions) and reference words, of normalised texts."""
    from whisper_batch.jobs.evaluate import error_counts

    errors, words = [], []
    for ref, hyp in zip(references, hypotheses):
        c = error_counts([ref], [hyp])
        errors.append(c["substitutions"] + c["deletions"] + c["insertions"])
        words.append(c["hits"] + c["substitutions"] + c["deletions"])
    return np.asarray(errors, dtype=np.int64), np.asarray(words, dtype=np.int64)


def part_errors(parts: list[str], hypothesis: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """A long recording scored per utterance it joins: the hypothesis aligned to the normalised ``parts`` joined,
    each error given to the part whose reference word it falls on (an insertion to the word it precedes).

    Returns:
        errors per part, reference words per part, deletion runs and insertion runs (RUN_WORDS or more consecutive
        words missing from, or added to, the reference).
    """
    import jiwer

    owner = np.concatenate([np.full(len(p.split()), k) for k, p in enumerate(parts)] or [np.zeros(0, int)])
    words = np.bincount(owner, minlength=len(parts)).astype(np.int64)
    errors = np.zeros(len(parts), dtype=np.int64)
    ref, hyp = " ".join(parts).split(), hypothesis.split()
    if not ref:
        return errors, words, 0, int(len(hyp) >= RUN_WORDS)
    if not hyp:
        return words.copy(), words, int(len(ref) >= RUN_WORDS), 0
    deletion_runs = insertion_runs = 0
    for chunk in jiwer.process_words(" ".join(ref), " ".join(hyp)).alignments[0]:
        if chunk.type == "equal":
            continue
        if chunk.type == "insert":
            errors[owner[min(chunk.ref_start_idx, len(owner) - 1)]] += chunk.hyp_end_idx - chunk.hyp_start_idx
            insertion_runs += chunk.hyp_end_idx - chunk.hyp_start_idx >= RUN_WORDS
            continue
        np.add.at(errors, owner[chunk.ref_start_idx : chunk.ref_end_idx], 1)
        deletion_runs += chunk.type == "delete" and chunk.ref_end_idx - chunk.ref_start_idx >= RUN_WORDS
    return errors, words, deletion_runs, insertion_runs


def paired_compare(
    ref_errors: Iterable[int], cand_errors: Iterable[int], words: Iterable[int],
    samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = 0.95,
) -> dict[str, Any]:
    """Compare a candidate with the reference on the same rows.

    Args:
        ref_errors, cand_errors: word errors per row of the reference and the candidate.
        words: reference words per row (the same for both).
        samples: bootstrap resamples of the rows (with replacement; ``numpy.random.default_rng(seed)``).

    Returns:
        ``rows``, ``words``, ``ref_wer``, ``cand_wer``, ``diff`` (cand - ref, as a fraction: positive = candidate
        worse), ``better``/``worse``/``same`` (rows with fewer/more/equal errors in the candidate), ``ci`` (low, high)
        percentile interval of the difference over the resamples, and ``keeps`` (the interval's low end <= 0: it
        contains zero or favours the candidate).
    """
    r, c, w = (np.asarray(list(a), dtype=np.float64) for a in (ref_errors, cand_errors, words))
    if not (len(r) == len(c) == len(w)) or len(w) == 0 or w.sum() <= 0:
        raise ValueError("paired_compare needs equally long, non-empty rows with reference words")
    ref_wer, cand_wer = r.sum() / w.sum(), c.sum() / w.sum()
    idx = np.random.default_rng(seed).integers(0, len(w), size=(samples, len(w)))
    tot = w[idx].sum(axis=1)
    diffs = (c[idx].sum(axis=1) - r[idx].sum(axis=1)) / np.where(tot > 0, tot, 1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {
        "rows": len(w), "words": int(w.sum()), "ref_wer": ref_wer, "cand_wer": cand_wer, "diff": cand_wer - ref_wer,
        "better": int((c < r).sum()), "worse": int((c > r).sum()), "same": int((c == r).sum()),
        "ci": (float(low), float(high)), "keeps": bool(low <= 0),
    }


# ---- transcription, cached per configuration and set ----


# the pipeline modules between audio bytes and text (config, storage, graph and the rest do not change a transcript)
TEXT_MODULES = ("audio", "features", "transcriber", "windows", "packing", "device", "vad")


def _code_digest(quantized: bool) -> str:
    """What the transcripts depend on besides the config: the model's sources (model/quantize.py only for a quantised
    configuration) and the pipeline modules that make the text."""
    root = Path(__file__).resolve().parents[1]
    paths = [p for p in root.glob("model/*.py") if quantized or p.name != "quantize.py"]
    paths += [root / "pipeline" / f"{m}.py" for m in TEXT_MODULES if (root / "pipeline" / f"{m}.py").exists()]
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


def config_key(name: str, overrides: list[str], model: str | None) -> str:
    """The cache key of a configuration's transcripts: the settings that make the text (defaults included, so a
    changed default is a new key) and the code's digest."""
    from whisper_batch.pipeline.config import config_fingerprint_fields, load_config

    fields = config_fingerprint_fields(load_config(None, overrides))
    spec = json.dumps([sorted(fields.items()), model, _code_digest(fields["model.quantize"] is not None)], default=str)
    return f"{name}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def manifest_rows(manifest: Path) -> list[dict[str, Any]]:
    """The set's rows with a reference, as the featurizer wants them."""
    from whisper_batch.pipeline.manifest import read_manifest

    rows = []
    for r in read_manifest(str(manifest)):
        if r.reference:
            rows.append({"id": r.id, "uri": r.uri, "audio_filepath": r.audio_filepath, "offset": r.offset,
                         "duration": r.duration, "language": r.language, "reference": r.reference})
    parts = _parts(manifest)
    for r in rows:
        if r["id"] in parts:
            r["parts"] = parts[r["id"]]
    return rows


def _parts(manifest: Path) -> dict[str, list[str]]:
    """A long-form row's utterance references in order (``parts`` in make_yardstick's manifests), by row id."""
    from benchmarks.make_yardstick import read_jsonl

    return {row["id"]: [p["text"] for p in row["parts"]] for row in read_jsonl(manifest) if row.get("parts")}


def transcribe_set(transcriber, featurizer, rows, cache: Path, chunk: int = 24, echo=print) -> dict[str, str]:
    """Texts by row id; rows already in ``cache`` (JSON lines) are not transcribed again."""
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                done[d["id"]] = d["text"]
    todo = [r for r in rows if r["id"] not in done]
    cache.parent.mkdir(parents=True, exist_ok=True)
    for b in range(0, len(todo), chunk):
        part = [{**r, "row_index": i} for i, r in enumerate(todo[b : b + chunk])]
        out = transcriber.transcribe_rows(featurizer.featurize_rows(part))
        with cache.open("a") as f:
            for row in out:
                if row.get("error"):
                    raise RuntimeError(f"{row['id']}: {row['error']}")
                done[row["id"]] = row["text"] or ""
                f.write(json.dumps({"id": row["id"], "text": row["text"] or ""}) + "\n")
        echo(f"  {cache.parent.name}/{cache.stem}: {min(b + chunk, len(todo))}/{len(todo)} rows")
    return done


def run_peer(name: str, model: str | None, sets: dict[str, Path], cache_dir: Path, echo=print) -> dict[str, Any]:
    """Transcribe every set with a peer engine (benchmarks.bench's, in this process), cached per set."""
    import os

    from benchmarks.bench import run_engine_rows

    engine = PEERS[name]
    key = f"{name}-{hashlib.sha256(json.dumps([engine, model]).encode()).hexdigest()[:10]}"
    texts, seconds = {}, {}
    for s, manifest in sets.items():
        path = cache_dir / key / f"{s}.jsonl"
        rows = manifest_rows(manifest)
        if not path.exists():
            echo(f"{name} ({engine}): {s}, {len(rows)} rows")
            out = run_engine_rows(engine, rows, model, os.cpu_count() or 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in out["texts"].items()))
            seconds[s] = out["wall_s"]
        texts[s] = {json.loads(line)["id"]: json.loads(line)["text"] for line in path.read_text().splitlines()}
    return {"name": name, "key": key, "dtype": engine, "texts": texts, "seconds": seconds}


def run_config(name: str, overrides: list[str], model: str | None, sets: dict[str, Path], cache_dir: Path,
               echo=print) -> dict[str, Any]:
    """Transcribe every set with one configuration; returns its texts per set, the dtype chosen and seconds."""
    if name in PEERS:
        return run_peer(name, model, sets, cache_dir, echo)
    from whisper_batch.pipeline.config import load_config
    from whisper_batch.pipeline.features import Featurizer
    from whisper_batch.pipeline.transcriber import Transcriber

    key = config_key(name, overrides, model)
    cfg = load_config(None, overrides + ([f"model.name={model}"] if model else []))
    rows = {s: manifest_rows(m) for s, m in sets.items()}
    cached = all((cache_dir / key / f"{s}.jsonl").exists() and len(_cached_ids(cache_dir / key / f"{s}.jsonl"))
                 >= len(rows[s]) for s in sets)
    texts, seconds, dtype = {}, {}, None
    transcriber = featurizer = None
    for s in sets:
        path = cache_dir / key / f"{s}.jsonl"
        if transcriber is None and not cached:
            transcriber = Transcriber(cfg)
            featurizer = Featurizer(cfg, transcriber.n_mels)
            dtype = _describe(transcriber.model)
            echo(f"{name}: {dtype} ({' '.join(overrides) or 'defaults'})")
        t0 = time.perf_counter()
        texts[s] = transcribe_set(transcriber, featurizer, rows[s], path, echo=echo)
        seconds[s] = time.perf_counter() - t0
    meta = cache_dir / key / "meta.json"
    if dtype:
        meta.write_text(json.dumps({"dtype": dtype, "overrides": overrides, "model": model}))
    elif meta.exists():
        dtype = json.loads(meta.read_text())["dtype"]
    return {"name": name, "key": key, "dtype": dtype, "texts": texts, "seconds": seconds}


def _cached_ids(path: Path) -> set[str]:
    return {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}


def _describe(model) -> str:
    import torch

    quantized = any(type(m).__name__ == "Int8Linear" for m in model.modules()) or any(
        "quantized" in type(m).__module__ for m in model.modules())
    return f"{'int8 / ' if quantized else ''}{str(model.dtype).replace('torch.', '')} on {model.device}" + (
        f", {torch.get_num_threads()} threads")


# ---- scoring and the table ----


def score(sets: dict[str, Path], results: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """WER, deletion runs and insertion runs per set and configuration, and each candidate's paired comparison with
    fp32 (and with openai-whisper's sequential decoding when it ran), per set and pooled.

    The units paired are rows, and each utterance of a long-form row (:func:`part_errors`), so a long set of a few
    files still gives an interval over its 142 utterances."""
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    refs = {}
    for s, m in sets.items():
        rows = [(r["id"], [norm(t) for t in r.get("parts") or [r["reference"]]]) for r in manifest_rows(m)]
        refs[s] = [(i, parts) for i, parts in rows if any(p.strip() for p in parts)]
    errors: dict[str, dict[str, np.ndarray]] = {}
    words: dict[str, np.ndarray] = {}
    runs: dict[str, dict[str, tuple[int, int]]] = {}
    for res in results:
        errors[res["name"]], runs[res["name"]] = {}, {}
        for s, rows in refs.items():
            scored = [part_errors(parts, norm(res["texts"][s].get(i, ""))) for i, parts in rows]
            errors[res["name"]][s] = np.concatenate([e for e, *_ in scored])
            words[s] = np.concatenate([w for _, w, *_ in scored])
            runs[res["name"]][s] = (sum(d for *_, d, _ in scored), sum(n for *_, n in scored))
    out = {"sets": {s: {"rows": len(refs[s]), "units": len(words[s]), "words": int(words[s].sum())} for s in sets},
           "wer": {}, "runs": runs, "paired": {}}
    for name, per_set in errors.items():
        out["wer"][name] = {s: float(per_set[s].sum() / words[s].sum()) for s in sets}
        total_e = sum(int(per_set[s].sum()) for s in sets)
        out["wer"][name]["all"] = total_e / sum(int(words[s].sum()) for s in sets)
        out["runs"][name]["all"] = tuple(sum(r[k] for r in runs[name].values()) for k in (0, 1))
    for against in (REFERENCE, SEQUENTIAL):
        if against not in errors:
            continue
        ref = errors[against]
        for name, per_set in errors.items():
            if name == against:
                continue
            pooled = [np.concatenate([d[s] for s in sets]) for d in (ref, per_set, words)]
            pairs = {s: paired_compare(ref[s], per_set[s], words[s], seed=seed) for s in sets}
            out["paired"][f"{name} vs {against}"] = {**pairs, "all": paired_compare(*pooled, seed=seed)}
    return out


def format_report(scored: dict[str, Any], results: list[dict[str, Any]]) -> str:
    names = [r["name"] for r in results]
    lines = ["| set | rows | words | " + " | ".join(f"WER % {n}" for n in names) + " | deletion / insertion runs "
             + " / ".join(names) + " |", "|---|---:|---:|" + "---:|" * len(names) + "---|"]
    totals = {"rows": sum(d["rows"] for d in scored["sets"].values()),
              "words": sum(d["words"] for d in scored["sets"].values())}
    for s, d in [*scored["sets"].items(), ("all", totals)]:
        cells = " | ".join(f"{100 * scored['wer'][n][s]:.2f}" for n in names)
        run_cells = " / ".join("{}+{}".format(*scored["runs"][n][s]) for n in names)
        lines.append(f"| {s} | {d['rows']} | {d['words']} | {cells} | {run_cells} |")
    lines.append("")
    lines.append("configurations: " + "; ".join(f"{r['name']} = {r['dtype'] or '?'}" for r in results))
    lines.append(f"runs: deletion+insertion runs of {RUN_WORDS} or more consecutive words")
    for pair, per_set in scored["paired"].items():
        name, against = pair.split(" vs ")
        lines += ["", f"paired: {pair} (difference = {name} - {against}, points of WER; units: rows and the "
                      f"utterances of long-form rows; bootstrap 95 %, {BOOTSTRAP_SAMPLES} resamples, seed fixed)",
                  "| set | units better | units worse | WER diff | 95 % interval | keeps accuracy |",
                  "|---|---:|---:|---:|---|---|"]
        for s, p in per_set.items():
            lo, hi = p["ci"]
            lines.append(f"| {s} | {p['better']} | {p['worse']} | {100 * p['diff']:+.2f} | "
                         f"[{100 * lo:+.2f}, {100 * hi:+.2f}] | {'yes' if p['keeps'] else 'NO'} |")
    return "\n".join(lines)


def yardstick(configs: dict[str, list[str]], model: str | None = None, data: Path | None = None,
              cache_dir: Path | None = None, set_names: list[str] | None = None,
              echo: Callable[[str], None] = print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build the sets if needed, transcribe them with every configuration, score. Returns (scored, results)."""
    from benchmarks.make_yardstick import CACHE_DIR, EVAL_DIR, count_words, yardstick_sets

    cache_dir = cache_dir or CACHE_DIR
    sets = yardstick_sets(data or EVAL_DIR, cache_dir)
    if set_names:
        unknown = [s for s in set_names if s not in sets]
        if unknown:
            raise ValueError(f"unknown set(s) {unknown}; the yardstick has {', '.join(sets)}")
        sets = {s: sets[s] for s in set_names}
    total = sum(w for _, w in count_words(sets).values())
    echo(f"yardstick: {len(sets)} sets, {total} reference words; results cached under {cache_dir / 'results'}")
    results = [run_config(n, o, model, sets, cache_dir / "results", echo=echo) for n, o in configs.items()]
    return score(sets, results), results


def parse_configs(spec: str) -> dict[str, list[str]]:
    """``fp32,default,int8`` or ``NAME:KEY=VALUE+KEY=VALUE`` items -> {name: overrides}; fp32 always included. A
    value may be a list (``decode.temperatures=[0.0,0.2]``): commas inside brackets do not separate items."""
    out: dict[str, list[str]] = {}
    for item in (i.strip() for i in re.split(r",(?![^\[]*\])", spec)):
        if not item:
            continue
        name, _, sets = item.partition(":")
        if sets:
            out[name] = [s for s in sets.split("+") if s]
        elif name in CONFIGS:
            out[name] = CONFIGS[name]
        elif name in PEERS:
            out[name] = []
        else:
            raise ValueError(f"unknown configuration {name!r}: use {', '.join([*CONFIGS, *PEERS])} or "
                             "NAME:KEY=VALUE+KEY=VALUE")
    return {REFERENCE: CONFIGS[REFERENCE], **out}
