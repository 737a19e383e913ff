"""`whisper-batch evaluate OUTPUT`: word error rate of the committed transcripts against the manifest's references.

Both sides go through Whisper's English text normaliser first (as in the Whisper paper), and WER is the corpus-level
rate: total substitutions + deletions + insertions over total reference words.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.schema import extra_column_name
from whisper_batch.pipeline.sink import iter_committed

_COUNTS = ("hits", "substitutions", "deletions", "insertions")


def word_errors(references: list[str], hypotheses: list[str]) -> dict[str, Any]:
    """Corpus-level WER over already-normalised, non-empty references."""
    return _rates(error_counts(references, hypotheses))


def error_counts(references: list[str], hypotheses: list[str]) -> Counter:
    """Hits, substitutions, deletions, insertions and rows: they add up over parts of a corpus (each row is aligned
    on its own), so a corpus is scored shard by shard in bounded memory."""
    if not references:
        return Counter()
    out = jiwer.process_words(references, hypotheses)
    return Counter({**{k: int(getattr(out, k)) for k in _COUNTS}, "rows_scored": len(references)})


def _rates(c: Counter) -> dict[str, Any]:
    counts = {k: c[k] for k in _COUNTS}
    words = counts["hits"] + counts["substitutions"] + counts["deletions"]
    if not c["rows_scored"] or not words:
        return {"wer": None, "rows_scored": c["rows_scored"], "reference_words": words, **counts}
    wer = (counts["substitutions"] + counts["deletions"] + counts["insertions"]) / words
    return {"wer": wer, "rows_scored": c["rows_scored"], "reference_words": words, **counts}


def evaluate(layout: RunLayout, group_field: str = "dataset") -> dict[str, Any]:
    """WER over committed rows that have a reference and no error, overall and per `group_field` if present.

    The committed shards are read one at a time and scored as they come (the counts add up), so memory does not
    grow with the run.

    Returns:
        {"wer", "rows_scored", "reference_words", hits/substitutions/deletions/insertions, "rows_total",
         "rows_with_reference", "rows_failed_with_reference", "rows_empty_reference", "by_<group_field>": {...}}
    """
    normalize = EnglishTextNormalizer()
    group_column = extra_column_name(group_field)
    scored: dict[str | None, Counter] = defaultdict(Counter)
    counts = {"rows_total": 0, "rows_with_reference": 0, "rows_failed_with_reference": 0, "rows_empty_reference": 0}
    extra_types = layout.read_json(layout.plan_json).get("extra_types", {}) if layout.exists(layout.plan_json) else {}
    columns = ["reference", "text", "error"] + ([group_column] if group_field in extra_types else [])
    for _, table in iter_committed(layout, columns):
        pairs: dict[str | None, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        groups = table.column(group_column).to_pylist() if group_column in table.column_names else None
        values = [table.column(c).to_pylist() for c in ("reference", "text", "error")]
        for i, (reference, text, error) in enumerate(zip(*values)):
            counts["rows_total"] += 1
            if reference is None:
                continue
            counts["rows_with_reference"] += 1
            if error is not None:
                counts["rows_failed_with_reference"] += 1
                continue
            ref = normalize(reference)
            if not ref.strip():
                counts["rows_empty_reference"] += 1  # WER is undefined without reference words
                continue
            refs, hyps = pairs[groups[i] if groups else None]
            refs.append(ref)
            hyps.append(normalize(text or ""))
        for key, (refs, hyps) in pairs.items():
            scored[key] += error_counts(refs, hyps)
    result = {**_rates(sum(scored.values(), Counter())), **counts}
    if any(key is not None for key in scored):
        result[f"by_{group_field}"] = {str(key): _rates(scored[key]) for key in sorted(scored, key=str)}
    return result


def format_evaluation(d: dict[str, Any], group_field: str = "dataset") -> str:
    """Human-readable lines for `evaluate`'s dict."""
    wer = "-" if d["wer"] is None else f"{100 * d['wer']:.2f}%"
    lines = [
        f"WER {wer} over {d['rows_scored']} rows ({d['reference_words']} reference words; "
        f"S={d['substitutions']} D={d['deletions']} I={d['insertions']})",
        f"rows: {d['rows_total']} committed, {d['rows_with_reference']} with a reference, "
        f"{d['rows_failed_with_reference']} of those failed, {d['rows_empty_reference']} empty after normalising",
    ]
    for name, sub in d.get(f"by_{group_field}", {}).items():
        sub_wer = "-" if sub["wer"] is None else f"{100 * sub['wer']:.2f}%"
        lines.append(f"  {name}: WER {sub_wer} over {sub['rows_scored']} rows")
    return "\n".join(lines)
