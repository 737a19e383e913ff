"""Synthetic committed runs for the report's tests and its measurement, written with the real commit path.

``python -m tests.report_data OUT N_ROWS [SHARD_SIZE]`` writes one (for ``whisper-batch report OUT``).
"""

from __future__ import annotations

import json
import random
import sys

from tests.shards import write_shard
from whisper_batch.pipeline.config import load_config
from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.plan import Plan, finish_run, start_run

MODEL = "tiny.en (synthetic)"
CAUSES = ("not found", "decode failed", "timeout")


def synthetic_row(i: int, rng: random.Random, failed: bool, failed_index: int = 0) -> dict:
    dataset = ("librispeech", "podcasts", "meetings")[i % 3]
    row = {"id": f"utt-{i:07d}", "audio_filepath": f"audio/{i:07d}.flac", "row_index": i, "offset": 0.0,
           "language": None, "duration": None, "text": None, "segments": None,
           "reference": f"the quick brown fox number {i % 7} jumps" if i % 4 else None,
           "extra_json": json.dumps({"dataset": dataset, "speaker": f"spk{i % 11}"})}
    if failed:
        cause = CAUSES[failed_index % len(CAUSES)]
        return {**row, "error": f"{cause}: audio/{i:07d}.flac (synthetic)"}
    duration = rng.uniform(1.0, 20.0)
    n_seg = rng.randint(1, 3)
    language = "en" if i % 6 else "de"
    bad = i % 10 == 0  # a tenth of the rows has a segment that every filter drops
    segments = [{"start": duration * k / n_seg, "end": duration * (k + 1) / n_seg, "text": f"segment {k}",
                 "avg_logprob": -1.6 if bad and k == 0 else rng.uniform(-0.9, -0.05),
                 "no_speech_prob": 0.9 if bad and k == 0 else rng.uniform(0.0, 0.5),
                 "compression_ratio": 3.1 if bad and k == 0 else rng.uniform(0.9, 2.2),
                 "temperature": 0.2 if bad and k == 0 else 0.0, "words": None, "language": language,
                 "fallback_failed": bad and k == 0} for k in range(n_seg)]
    if i % 7 == 3:  # a seventh of the rows ends with a stretch of French
        segments.append({**segments[-1], "start": duration, "end": duration, "text": "fin", "language": "fr",
                         "fallback_failed": False})
    hyp = row["reference"] or "some words"
    if i % 5 == 0:
        hyp = hyp.replace("brown", "crown")
    return {**row, "language": language, "duration": duration, "text": hyp, "segments": segments, "error": None}


def make_run(output: str, n_rows: int = 60, shard_size: int = 10, shards_done: int | None = None,
             all_failed: bool = False, fail_every: int = 9, seed: int = 0,
             storage_options: dict | None = None, invocations: int = 1) -> RunLayout:
    """A run of ``n_rows`` rows in shards of ``shard_size``, the first ``shards_done`` shards committed (all by
    default); every ``fail_every``-th row failed (every row with ``all_failed``). The last invocation is left
    running when not every shard is committed."""
    rng = random.Random(seed)
    layout = RunLayout(output, storage_options)
    cfg = load_config(None)
    plan = Plan("synthetic/manifest.jsonl", "jsonl", n_rows, shard_size, f"{seed:064x}",
                {"dataset": "string", "speaker": "string"}, {"id_field": "id"})
    n_shards = plan.n_shards
    shards_done = n_shards if shards_done is None else shards_done
    for k in range(invocations):  # the committed shards split between the invocations, in order
        invocation = start_run(layout, plan, cfg, MODEL)
        mine = range(shards_done * k // invocations, shards_done * (k + 1) // invocations)
        for shard in mine:
            rows = [synthetic_row(i, rng, all_failed or i % fail_every == fail_every - 1, i // fail_every)
                    for i in plan.shard_rows(shard)]
            write_shard(layout, shard, rows, plan.extra_types, MODEL, {"decode_seconds": 0.1})
        if k < invocations - 1 or shards_done == n_shards:
            finish_run(layout, invocation, shards_committed=len(mine))
    return layout


if __name__ == "__main__":
    out, n = sys.argv[1], int(sys.argv[2])
    make_run(out, n, int(sys.argv[3]) if len(sys.argv) > 3 else 256)
    print(f"wrote {n} rows to {out}")
