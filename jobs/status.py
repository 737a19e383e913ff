"""`whisper-batch status OUTPUT`: progress and throughput of a run, from its records only (never credentials)."""

from __future__ import annotations

from typing import Any

from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.sink import collect_stats


def run_status(layout: RunLayout) -> dict[str, Any]:
    """Shards/rows total and done, failures by cause, fallbacks per temperature, audio hours, wall time, RTFx.

    Raises:
        FileNotFoundError: OUTPUT holds no run (no plan.json).
    """
    if not layout.exists(layout.plan_json):
        raise FileNotFoundError(f"no run at {layout.display_uri}: {layout.plan_json} is missing")
    stats = collect_stats(layout)
    run = layout.read_json(layout.run_json) if layout.exists(layout.run_json) else {}
    n_shards, n_rows = stats["n_shards"] or 0, stats["n_rows"] or 0
    return {
        "output": layout.display_uri,
        "input": stats["input_uri"],
        "model": run.get("model"),
        "created_at": run.get("created_at"),
        "shards_total": n_shards,
        "shards_done": stats["shards_done"],
        "rows_total": n_rows,
        "rows_done": stats["rows_done"],
        "rows_failed": stats["rows_failed"],
        "complete": n_shards > 0 and stats["shards_done"] == n_shards,
        "audio_hours": stats["audio_seconds"] / 3600.0,
        "wall_seconds": stats["wall_seconds"],
        "rtfx": stats["rtfx"],
        "invocations": stats["invocations"],
        "failures_by_cause": stats["failures_by_cause"],
        "fallbacks": stats["fallbacks"],
    }


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def format_status(d: dict[str, Any]) -> str:
    """Human-readable lines for `run_status`'s dict."""
    lines = [
        f"run      {d['output']}" + ("  (complete)" if d["complete"] else ""),
        f"input    {d['input']}",
        f"model    {d['model']}",
        f"shards   {d['shards_done']}/{d['shards_total']} done ({_percent(d['shards_done'], d['shards_total'])})",
        f"rows     {d['rows_done']}/{d['rows_total']} done, {d['rows_failed']} failed "
        f"({_percent(d['rows_failed'], d['rows_done'])} of done)",
        f"audio    {d['audio_hours']:.3f} h",
        f"wall     {_duration(d['wall_seconds'])} over {d['invocations']} invocation(s)",
        f"RTFx     {d['rtfx']:.1f}" if d["rtfx"] else "RTFx     -",
    ]
    if d["failures_by_cause"]:
        lines.append("failures " + ", ".join(f"{cause}: {n}" for cause, n in d["failures_by_cause"].items()))
    if d["fallbacks"]:
        lines.append("fallback segments by temperature " + ", ".join(f"{t}: {n}" for t, n in d["fallbacks"].items()))
    return "\n".join(lines)
