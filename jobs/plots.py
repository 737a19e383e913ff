"""The report's page: plain HTML with hand-drawn inline SVG plots, no script and no reference to anything outside it.

Every plot is a ``<figure class="plot" id="plot-...">`` holding one ``<svg>``; where there is nothing to draw the
figure says what is missing instead. :data:`PLOT_IDS` lists the plots every page has (one more pair per ``--by``
field).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from typing import Any

from whisper_batch.jobs.report_model import OTHER, SIGNALS, Aggregate, GroupCounts, wer_of

PLOT_IDS = ("language-rows", "language-hours", "failures", "avg_logprob", "no_speech_prob", "compression_ratio",
            "wer", "temperatures", "throughput")
MAX_BARS = 25
WIDTH = 620
BAR_COLOR, DROP_COLOR, ACCENT = "#4c78a8", "#e45756", "#f58518"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1320px;color:#222;
padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.banner{padding:8px 12px;border-radius:4px;margin:12px 0}.warn{background:#fff4e5;border:1px solid #f5a623}
.ok{background:#eef8ee;border:1px solid #6c6}.grid{display:flex;flex-wrap:wrap;gap:16px}
figure.plot{margin:0;border:1px solid #e5e5e5;border-radius:4px;padding:8px;background:#fff}
figcaption{font-weight:600;margin-bottom:4px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f5f5f5}
td.n{text-align:right;font-variant-numeric:tabular-nums}.missing{color:#888;font-style:italic}
code{font-size:12px}.kpi{display:inline-block;margin-right:28px}.kpi b{font-size:20px;display:block}
"""


def esc(value: Any) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.3f} h" if seconds < 36000 else f"{seconds / 3600:,.1f} h"


def pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


# --- SVG primitives ---


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{esc(label)}"><title>{esc(label)}</title>{"".join(body)}</svg>')


def _text(x: float, y: float, s: str, anchor: str = "start", size: int = 11, fill: str = "#333") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}">{esc(s)}</text>'


def figure(plot_id: str, caption: str, content: str) -> str:
    return f'<figure class="plot" id="plot-{esc(plot_id)}"><figcaption>{esc(caption)}</figcaption>{content}</figure>'


def missing(plot_id: str, caption: str, why: str) -> str:
    """A figure that says why it has nothing to draw (still an svg, so the page's layout stays the same)."""
    body = [f'<rect x="0" y="0" width="{WIDTH}" height="60" fill="#fafafa" stroke="#ddd"/>',
            _text(WIDTH / 2, 35, why, "middle", 12, "#888")]
    return figure(plot_id, caption, _svg(WIDTH, 60, body, f"{caption}: {why}"))


def hbars(plot_id: str, caption: str, items: Sequence[tuple[str, float]], fmt: Callable[[float], str],
          color: str = BAR_COLOR, empty: str = "nothing to show", ordered: bool = False) -> str:
    """Horizontal bars, largest first unless ``ordered`` (at most MAX_BARS; the rest are counted in a last line)."""
    items = [(label, value) for label, value in items if value is not None]
    if not items:
        return missing(plot_id, caption, empty)
    shown = (items if ordered else sorted(items, key=lambda kv: kv[1], reverse=True))[:MAX_BARS]
    rest = len(items) - len(shown)
    top = max(v for _, v in shown) or 1.0
    label_w, row_h, pad = 170, 20, 6
    bar_w = WIDTH - label_w - 90
    height = pad * 2 + row_h * len(shown) + (16 if rest else 0)
    body = []
    for i, (label, value) in enumerate(shown):
        y = pad + i * row_h
        w = max(1.0, bar_w * value / top) if value > 0 else 0.0
        name = label if len(label) <= 26 else label[:25] + "…"
        body.append(_text(label_w - 6, y + 14, name, "end"))
        body.append(f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{color}">'
                    f'<title>{esc(label)}: {esc(fmt(value))}</title></rect>')
        body.append(_text(label_w + w + 4, y + 14, fmt(value)))
    if rest:
        body.append(_text(label_w, height - 4, f"… and {rest} more (see the table)", size=10, fill="#888"))
    return figure(plot_id, caption, _svg(WIDTH, height, body, caption))


def histogram(plot_id: str, caption: str, counts: Sequence[int], lo: float, hi: float, threshold: float,
              direction: str, empty: str) -> str:
    """Vertical bars over [lo, hi] (edge bins hold what lies beyond), the filter's threshold as a dashed line and
    the bins it drops in red."""
    total = int(sum(counts))
    if total == 0:
        return missing(plot_id, caption, empty)
    left, bottom, top_pad, height = 50, 30, 10, 190
    plot_w, plot_h = WIDTH - left - 10, height - bottom - top_pad
    n, peak = len(counts), max(counts)
    body = [f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#999"/>']
    for i, c in enumerate(counts):
        x0 = lo + (hi - lo) * i / n
        x1 = lo + (hi - lo) * (i + 1) / n
        drops = x1 <= threshold if direction == "below" else x0 >= threshold
        h = plot_h * c / peak
        body.append(f'<rect class="bar" x="{left + plot_w * i / n:.1f}" y="{top_pad + plot_h - h:.1f}" '
                    f'width="{max(plot_w / n - 1, 1):.1f}" height="{h:.1f}" '
                    f'fill="{DROP_COLOR if drops else BAR_COLOR}">'
                    f'<title>{x0:.2f} to {x1:.2f}: {c} segments</title></rect>')
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        x = left + plot_w * k / 4
        body.append(_text(x, height - 12, f"{v:g}", "middle", 10))
    tx = left + plot_w * (threshold - lo) / (hi - lo)
    body.append(f'<line x1="{tx:.1f}" y1="{top_pad}" x2="{tx:.1f}" y2="{top_pad + plot_h}" stroke="#222" '
                f'stroke-dasharray="4 3"/>')
    body.append(_text(tx + 4, top_pad + 12, f"{'<' if direction == 'below' else '>'} {threshold:g} dropped", size=10))
    body.append(_text(left - 6, top_pad + 10, f"{peak:,}", "end", 10))
    body.append(_text(left - 6, top_pad + plot_h, "0", "end", 10))
    return figure(plot_id, caption, _svg(WIDTH, height, body, f"{caption}, {total} segments"))


# --- the page ---


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(headers)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if numeric[i] else ""}>{esc(v)}</td>' for i, v in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _group_section(name: str, g: GroupCounts, plot_prefix: str) -> str:
    rows = sorted(g.rows, key=lambda k: (k == OTHER, -g.rows[k]))
    charts = [
        hbars(f"{plot_prefix}-rows", f"Rows by {name}", [(k, g.rows[k]) for k in rows], lambda v: f"{v:,.0f}",
              empty="no committed rows"),
        hbars(f"{plot_prefix}-hours", f"Audio hours by {name}", [(k, g.audio[k] / 3600) for k in rows],
              lambda v: f"{v:.3f} h", ACCENT, empty="no committed rows"),
    ]
    lines = [(k, f"{g.rows[k]:,}", hours(g.audio[k]), f"{g.failed[k]:,}", _wer_text(g.wer.get(k)))
             for k in rows[:200]]
    more = f'<p class="missing">{len(rows) - 200} more values not listed</p>' if len(rows) > 200 else ""
    return (f'<div class="grid">{"".join(charts)}</div>'
            + table([name, "rows", "audio", "failed", "WER"], lines, [False, True, True, True, True]) + more)


def _wer_text(counts) -> str:
    wer = wer_of(counts) if counts else None
    return "-" if wer is None else f"{100 * wer:.2f}% ({counts['rows_scored']:,} rows)"


def _failures(agg: Aggregate) -> str:
    chart = hbars("failures", "Failed rows by cause", list(agg.causes.items()), lambda v: f"{v:,.0f}", DROP_COLOR,
                  empty="no failed rows")
    examples = [(cause, ex["id"], ex["audio_filepath"], ex["error"]) for cause in agg.causes
                for ex in agg.examples.get(cause, [])]
    listing = table(["cause", "id", "audio_filepath", "error"], examples) if examples else ""
    return f'<div class="grid">{chart}</div>{listing}'


def _signals(agg: Aggregate) -> str:
    why = ("no segments: every committed row failed" if agg.rows and agg.rows == agg.failed
           else "no segments in the committed rows" if agg.rows else "nothing committed yet")
    charts = [histogram(name, f"{name} per segment", agg.histograms[name].counts.tolist(), lo, hi, threshold,
                        direction, why) for name, (lo, hi), threshold, direction in SIGNALS]
    lines = []
    for name, _, threshold, direction in [*SIGNALS, ("fallback_failed", None, None, None), ("any", None, None, None)]:
        d = agg.dropped.get(name, {})
        rule = ("any of these" if name == "any" else "fallback_failed (failed at every temperature)"
                if name == "fallback_failed" else f"{name} {'<' if direction == 'below' else '>'} {threshold:g}")
        lines.append((rule, f"{d.get('segments', 0):,} ({pct(d.get('segments', 0), agg.segments)})",
                      f"{d.get('rows', 0):,} ({pct(d.get('rows', 0), agg.rows)})",
                      f"{hours(d.get('audio_seconds', 0.0))} ({pct(d.get('audio_seconds', 0.0), agg.audio_seconds)})"))
    note = ("<p>A row counts as dropped when any of its segments fails the filter; shares are of all committed rows "
            "and audio (failed rows have no segments).</p>")
    return (f'<div class="grid">{"".join(charts)}</div>{note}'
            + table(["filter", "segments dropped", "rows dropped", "audio dropped"], lines, [False, True, True, True]))


def _mixed_languages(agg: Aggregate) -> str:
    if not agg.mixed_language_rows:
        return "<p>Every row's segments are in one language.</p>"
    rows = [(ex["id"], ex["languages"]) for ex in agg.mixed_language_examples]
    return (f"<p>{agg.mixed_language_rows:,} rows hold segments in more than one language (a row's language is that "
            f"of most of its speech; each segment carries its own); the first {len(rows)}:</p>"
            + table(["id", "languages"], rows))


def _wer(agg: Aggregate, by: list[str]) -> str:
    if not agg.wer_rows:
        return missing("wer", "WER by group", "no references: the manifest has no text field, or every row with "
                       "one failed")
    items = [(f"all ({agg.wer_all['rows_scored']:,} rows)", wer_of(agg.wer_all))]
    for name in ["language", *by]:
        for key, counts in agg.groups[name].wer.items():
            items.append((f"{name}={key}", wer_of(counts)))
    return hbars("wer", "WER by group (Whisper's English normaliser)",
                 [(k, 100 * v) for k, v in items if v is not None], lambda v: f"{v:.2f}%", "#54a24b", ordered=True)


def _temperatures(agg: Aggregate) -> str:
    items = sorted(agg.temperatures.items(), key=lambda kv: float(kv[0]))
    if not items:
        return missing("temperatures", "Segments by decoding temperature", "no segments")
    fallback = sum(c for t, c in items if float(t) > 0)
    caption = f"Segments by decoding temperature ({pct(fallback, agg.segments)} needed a fallback)"
    return hbars("temperatures", caption, [(f"T={t}", c) for t, c in items], lambda v: f"{v:,.0f}", "#b279a2",
                 ordered=True)


def _throughput(invocations: list[dict[str, Any]]) -> str:
    items = [(f"#{i + 1} {(inv['started_at'] or '')[:19]}", inv["rtfx"]) for i, inv in enumerate(invocations)]
    chart = hbars("throughput", "RTFx (audio seconds per wall second) by invocation", items, lambda v: f"{v:,.1f}x",
                  "#72b7b2", empty="no invocation committed a shard", ordered=True)
    lines = [(i + 1, inv["started_at"], inv["status"], inv["host"], f"{inv['shards']:,}", f"{inv['rows']:,}",
              hours(inv["audio_seconds"]), f"{inv['wall_seconds']:.0f} s",
              "-" if inv["rows_per_s"] is None else f"{inv['rows_per_s']:.2f}",
              "-" if inv["rtfx"] is None else f"{inv['rtfx']:.1f}") for i, inv in enumerate(invocations)]
    return chart + table(["#", "started", "status", "host", "shards", "rows", "audio", "wall", "rows/s", "RTFx"],
                         lines, [True, False, False, False, True, True, True, True, True, True])


def _banner(data: dict[str, Any]) -> str:
    agg: Aggregate = data["agg"]
    notes = []
    if data["shards_done"] == 0:
        notes.append("Nothing is committed yet: this page has no rows to show.")
    elif not data["complete"]:
        notes.append(f"This run is not complete: {data['shards_done']:,} of {data['shards_total']:,} shards are "
                     f"committed, and this report covers only those.")
    if data["running"]:
        notes.append(f"{len(data['running'])} invocation(s) have no finish time (a driver is running, or was killed): "
                     + ", ".join(esc(inv["started_at"]) for inv in data["running"]))
    if agg.rows and agg.failed == agg.rows:
        notes.append(f"Every committed row failed ({agg.failed:,}): there are no transcripts or confidence signals; "
                     f"see the failures below.")
    if agg.unreadable:
        notes.append("Unreadable shard files (left out): " + "; ".join(agg.unreadable[:5]))
    if data["identity"]["run_json_missing"]:
        notes.append("run.json is missing: the model, config and versions are unknown.")
    if not notes:
        return f'<div class="banner ok">Complete: all {data["shards_total"]:,} shards committed.</div>'
    return "".join(f'<div class="banner warn">{esc(n)}</div>' for n in notes)


def _identity(ident: dict[str, Any]) -> str:
    rows = [("input", ident["input"]), ("output", ident["output"]), ("model", ident["model"]),
            ("created", ident["created_at"]), ("manifest fingerprint", ident["manifest_fingerprint"]),
            ("config fingerprint", ident["config_fingerprint"]),
            ("plan", f"{ident['n_rows']} rows in {ident['n_shards']} shards of {ident['shard_size']}")]
    versions = ", ".join(f"{k} {v}" for k, v in ident["versions"].items() if v)
    rows.append(("versions", versions or None))
    config = [(k, json.dumps(v)) for k, v in ident["results_config"].items()]
    return (table(["", ""], rows) + "<details><summary>Settings that change results</summary>"
            + table(["setting", "value"], config) + "</details>")


def render_page(data: dict[str, Any]) -> str:
    """The whole page, from :func:`whisper_batch.jobs.report.build_report`'s data."""
    agg: Aggregate = data["agg"]
    ident = data["identity"]
    kpis = [
        ("rows committed", f"{agg.rows:,} of {ident['n_rows'] or 0:,}"),
        ("failed rows", f"{agg.failed:,} ({pct(agg.failed, agg.rows)})"),
        ("audio", hours(agg.audio_seconds)),
        ("segments", f"{agg.segments:,}"),
        ("shards", f"{data['shards_done']:,} of {data['shards_total']:,}"),
    ]
    sections = [
        ("Rows and audio by language", _group_section("language", agg.groups["language"], "language")
         + _mixed_languages(agg)),
        *[(f"Rows and audio by {name}", _group_section(name, agg.groups[name], f"by-{name}")) for name in data["by"]],
        ("Failures by cause", _failures(agg)),
        ("Confidence signals and what common filters would drop", _signals(agg)),
        ("WER by group", _wer(agg, data["by"])),
        ("Fallback temperatures", _temperatures(agg)),
        ("Throughput over the run's invocations", _throughput(data["invocations"])),
        ("Run identity", _identity(ident)),
    ]
    body = "".join(f"<h2>{esc(title)}</h2>{content}" for title, content in sections)
    kpi = "".join(f'<span class="kpi"><b>{esc(v)}</b>{esc(k)}</span>' for k, v in kpis)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>whisper-batch report: '
            f'{esc(ident["output"])}</title><style>{CSS}</style></head><body><h1>whisper-batch report</h1>'
            f'<div><code>{esc(ident["output"])}</code></div>{_banner(data)}<div>{kpi}</div>{body}</body></html>\n')
