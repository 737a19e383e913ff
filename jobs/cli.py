"""``whisper-batch``: the command line. Thin click wrappers over ``pipeline/`` and ``jobs/`` functions; the cluster-job
commands are in :mod:`whisper_batch.jobs.cli_jobs`."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import posixpath
import sys
import time
from urllib.parse import urlsplit

import click

from whisper_batch.jobs.cli_jobs import jobs_group, resume, submit
from whisper_batch.jobs.cli_options import SET_HELP, load_cli_config, shortcut_options
from whisper_batch.jobs.logs import configure_logging, mute_console_logs
from whisper_batch.pipeline.secrets import scrub


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Batch transcription with Whisper: one machine or a Ray cluster, resumable, exactly-once Parquet output."""
    with contextlib.suppress(ValueError):  # a native library's crash prints every thread's Python stack, not a bare
        faulthandler.enable()  # exit status (a stderr without a file descriptor, as click's test runner's: nothing)
    configure_logging(verbose)


# the cluster-job commands (jobs/cli_jobs.py)
main.add_command(submit)
main.add_command(resume)
main.add_command(jobs_group)


_OUTPUT_FORMATS = ("txt", "srt", "vtt", "json")


def _stem(path: str) -> str:
    """A file's base name without its extension: `a/fox.flac` and `s3://b/a/fox.flac?v=1` are `fox`."""
    if "://" in path:
        path = urlsplit(path).path
    stem = posixpath.splitext(posixpath.basename(path.replace(os.sep, "/").rstrip("/")))[0]
    if stem in ("", ".", ".."):
        from whisper_batch.jobs.export import safe_name

        stem = safe_name(path)
    return stem


def _render(row: dict, fmt: str) -> str:
    """One transcribed row as the text of a `.txt`, `.srt`, `.vtt` (the writers of `whisper-batch export`) or
    `.json` file (openai-whisper's json: text, segments, language, and the duration)."""
    from whisper_batch.jobs.export import to_srt, to_txt, to_vtt

    if fmt == "json":
        doc = {"text": row.get("text") or "", "segments": list(row.get("segments") or []),
               "language": row.get("language"), "duration": row.get("duration")}
        return json.dumps(doc, ensure_ascii=False) + "\n"
    return {"txt": to_txt, "srt": to_srt, "vtt": to_vtt}[fmt](row)


@main.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@shortcut_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file and line.")
@click.option("-f", "--output-format", "--output_format", "output_format",
              type=click.Choice([*_OUTPUT_FORMATS, "all"]), default=None,
              help="Also write one file per FILE in this format (all: txt, srt, vtt and json), named after the "
                   "FILE's base name: fox.flac -> fox.srt. Into --output-dir, default the current directory.")
@click.option("-o", "--output-dir", "--output_dir", "output_dir", type=click.Path(file_okay=False), default=None,
              metavar="DIR",
              help="Folder for those files (created if missing; files there are overwritten). Alone, it writes "
                   "--output-format all. Two FILES with the same base name are an error: nothing is transcribed.")
def transcribe(files, shortcuts, config, overrides, as_json, output_format, output_dir) -> None:
    """Transcribe FILES (any audio container; local paths or URIs) in this process, without Ray.

    Prints one line per file (FILE: text, or with --json one JSON object). With --output-format/--output-dir it also
    writes the files and lists them on stderr. A failed file is reported on stderr (with --json: in its object's
    `error`) and gets no output file. The exit status is 1 only when every file failed.
    """
    from whisper_batch.pipeline.features import Featurizer
    from whisper_batch.pipeline.transcriber import RESULT_KEYS, Transcriber, transcribe_files

    formats: tuple[str, ...] = ()
    if output_format or output_dir:
        formats = _OUTPUT_FORMATS if output_format in (None, "all") else (output_format,)
        output_dir = output_dir or "."
        seen: dict[str, str] = {}
        for path in files:
            stem = _stem(path)
            if stem in seen:
                raise click.UsageError(f"{seen[stem]} and {path} would both be written as "
                                       f"{os.path.join(output_dir, stem)}.{'|'.join(formats)}: transcribe them with "
                                       f"different --output-dir, or rename one")
            seen[stem] = path
    cfg = load_cli_config(config, overrides, shortcuts)
    if formats:
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            raise click.ClickException(f"cannot create --output-dir {output_dir}: {e}") from None
    try:
        transcriber = Transcriber(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    featurizer = Featurizer(cfg, transcriber.n_mels)
    failed = 0
    for row in transcribe_files(transcriber, featurizer, files):
        failed += bool(row.get("error"))
        if as_json:
            click.echo(json.dumps({k: row.get(k) for k in RESULT_KEYS}, ensure_ascii=False))
        elif row.get("error"):
            click.echo(f"{row['audio_filepath']}: ERROR {row['error']}", err=True)
        else:
            click.echo(f"{row['audio_filepath']}: {row['text']}")
        if formats and not row.get("error"):
            written = []
            for fmt in formats:
                target = os.path.join(output_dir, f"{_stem(row['audio_filepath'])}.{fmt}")
                try:
                    with open(target, "w", encoding="utf-8") as f:
                        f.write(_render(row, fmt))
                except OSError as e:
                    raise click.ClickException(f"cannot write {target}: {e}") from None
                written.append(target)
            click.echo(f"wrote {', '.join(written)}", err=True)
    if failed == len(files):
        sys.exit(1)


def _layout(output: str, config: str | None = None, overrides: tuple[str, ...] = ()):
    from whisper_batch.pipeline.layout import RunLayout

    cfg = load_cli_config(config, overrides)
    layout = RunLayout(output, cfg.storage.storage_options)
    if not layout.exists(layout.plan_json):
        raise click.ClickException(f"{layout.display_uri} holds no whisper-batch run (no plan.json); start one with "
                                   f"`whisper-batch run INPUT -o {output}`")
    return layout


@main.command()
@click.argument("input_uri", metavar="INPUT")
@click.option("-o", "--output", required=True, help="Output folder or URI (local, s3://, gs://).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@shortcut_options
@click.option("--retry-failed", is_flag=True, help="Redo only the committed rows whose `error` is set.")
@click.option("--progress-interval", type=click.FloatRange(min=0.5), default=15.0, show_default=True,
              envvar="WHISPER_BATCH_PROGRESS_INTERVAL", metavar="SECONDS",
              help="Seconds between progress lines when the screen is not a terminal (a pipe, a job's log).")
@click.option("--lock-wait", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="Wait this long for another run holding OUTPUT to end before refusing (submitted jobs wait 60 s: "
                   "a stopped job's driver may still be exiting).")
def run(input_uri, output, config, overrides, shortcuts, retry_failed, progress_interval, lock_wait) -> None:
    """Transcribe INPUT (a manifest .jsonl/.csv/.parquet, or a folder or glob of audio) into OUTPUT.

    Rerunning the same command resumes: committed shards are skipped. Failed rows are data (an `error` column),
    not a failed run: the exit status is non-zero only when the run itself fails.

    Progress shows as one bar in a terminal, or as a line every --progress-interval seconds elsewhere; Ray's own
    output goes to a log file (its path is printed) unless -v.
    """
    from whisper_batch.jobs.lock import LockHeld
    from whisper_batch.jobs.progress import quiet_screen
    from whisper_batch.jobs.run import run as run_job
    from whisper_batch.jobs.run import stop_ray
    from whisper_batch.jobs.status import format_status, run_status
    from whisper_batch.pipeline.cluster import ActorStartError
    from whisper_batch.pipeline.graph import Incomplete, Stalled
    from whisper_batch.pipeline.layout import NoSpace
    from whisper_batch.pipeline.manifest import ManifestError
    from whisper_batch.pipeline.plan import PlanMismatch

    cfg = load_cli_config(config, overrides, shortcuts)
    try:
        with quiet_screen(verbose=click.get_current_context().find_root().params.get("verbose", 0) > 0) as screen:
            if screen.log_path:
                click.echo(f"Ray's log: {screen.log_path} (-v shows it here)")
            summary = run_job(input_uri, output, cfg, retry_failed=retry_failed, echo=click.echo, screen=screen,
                              progress_interval=progress_interval, lock_wait=lock_wait)
            stop_ray()  # while Ray's output still goes to its log
    except (Stalled, Incomplete, ActorStartError, NoSpace) as e:
        mute_console_logs()  # Ray tears the stalled graph down at exit: its tracebacks would bury the message
        raise click.ClickException(str(e)) from None
    except (PlanMismatch, ManifestError, LockHeld, FileNotFoundError, ValueError) as e:
        raise click.ClickException(scrub(str(e))) from None
    from whisper_batch.pipeline.layout import RunLayout

    click.echo("")
    click.echo(format_status(run_status(RunLayout(output, cfg.storage.storage_options))))
    click.echo(f"\ntranscripts: {summary.output}/transcripts/*.parquet — read them with e.g.")
    click.echo(f"  python -c \"import pandas as pd; print(pd.read_parquet('{summary.output}/transcripts')"
               "[['id','text','error']])\"")
    click.echo(f"  whisper-batch export {summary.output} --format srt -o subs/")


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML config (storage options).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def status(output, as_json, config, overrides) -> None:
    """Progress of the run in OUTPUT: shards, rows, failures, audio hours, RTFx."""
    from whisper_batch.jobs.status import format_status, run_status

    d = run_status(_layout(output, config, overrides))
    click.echo(json.dumps(d, indent=2) if as_json else format_status(d))


@main.command(name="eval")
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML config (storage options).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def eval_(output, as_json, config, overrides) -> None:
    """WER of the committed rows that have a reference text (Whisper's English normalizer)."""
    from whisper_batch.jobs.evaluate import evaluate, format_evaluation

    d = evaluate(_layout(output, config, overrides))
    click.echo(json.dumps(d, indent=2) if as_json else format_evaluation(d))


@main.command()
@click.argument("output")
@click.option("-o", "--out", "target", default=None,
              help="Where to write the page (a path or URI; default: OUTPUT/report.html).")
@click.option("--by", "by", multiple=True, metavar="FIELD",
              help="Also group by this manifest field (repeatable), e.g. --by dataset.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML config (storage options).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def report(output, target, by, config, overrides) -> None:
    """One self-contained HTML page about OUTPUT's committed rows: languages, failures, confidence signals and what
    filters would drop, WER, fallbacks, throughput (plots inline; the page loads nothing from the network)."""
    from whisper_batch.jobs.report import ReportError, write_report

    target = target or f"{output.rstrip('/')}/report.html"
    try:
        layout = _layout(output, config, overrides)
        data = write_report(layout, target, by, layout.storage_options)
    except ReportError as e:
        raise click.ClickException(scrub(str(e))) from None
    except (OSError, ValueError) as e:  # storage refused or unreachable, a damaged run record
        raise click.ClickException(f"cannot read the run in {output}: {type(e).__name__}: {scrub(str(e))}") from None
    agg = data["agg"]
    state = ("complete" if data["complete"]
             else f"in progress: {data['shards_done']}/{data['shards_total']} shards committed")
    click.echo(f"wrote {target}: {agg.rows} rows, {agg.failed} failed ({state})")


@main.command()
@click.argument("output")
@click.option("--format", "fmt", type=click.Choice(["srt", "vtt", "txt", "jsonl"]), required=True)
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False), help="Local folder to write into.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML config (storage options).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--words", is_flag=True, help="srt/vtt: one cue per word (needs a run with decode.word_timestamps=true).")
def export(output, fmt, out_dir, config, overrides, words) -> None:
    """Write the committed transcripts of OUTPUT as subtitles, text, or JSON lines."""
    from whisper_batch.jobs.export import export as export_rows

    if words and fmt not in ("srt", "vtt"):
        raise click.UsageError(f"--words applies to --format srt or vtt, not {fmt}")
    d = export_rows(_layout(output, config, overrides), fmt, out_dir, words=words)
    click.echo(f"wrote {d['written']} {fmt} file(s) to {out_dir} ({d['skipped_failed']} failed rows skipped)")


@main.command()
@click.argument("output")
@click.option("--repair", is_flag=True,
              help="Un-commit damaged shards (remove their record and file), remove stray files and leftover "
                   "staging, so that the same `whisper-batch run` command redoes exactly those shards.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML config (storage options).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def verify(output, repair, config, overrides) -> None:
    """Check that OUTPUT holds what `run` promises: each committed shard's file present, intact (row count, sha256)
    and holding its planned rows once; no stray or half-committed files; no leftover staging.

    Prints a PROBLEM line per finding and a summary; the exit status is 1 when there are problems (0 after --repair
    removed them all). --repair is refused while a live run holds OUTPUT.
    """
    from whisper_batch.jobs.lock import LockHeld, RunLock, live_holder
    from whisper_batch.pipeline.layout import RunLayout
    from whisper_batch.pipeline.verify import VerifyError, redo_shards, verify_output
    from whisper_batch.pipeline.verify import repair as repair_output

    cfg = load_cli_config(config, overrides)
    layout = RunLayout(output, cfg.storage.storage_options)
    lock = RunLock(layout, f"verify-{os.getpid()}-{time.time()}") if repair else None
    try:
        if lock is not None:  # nothing commits or stages while the repair removes files
            lock.acquire()
        try:
            v = verify_output(layout, live=None if lock else live_holder(layout))
            for line in [p.line() for p in v.problems] + v.info_lines() + [v.summary()]:
                click.echo(line)
            if lock is None or v.ok:
                if not v.ok:
                    click.echo(f"to repair: whisper-batch verify {output} --repair, then the same run command")
                sys.exit(0 if v.ok else 1)
            for line in repair_output(layout, v):
                click.echo(line)
        finally:
            if lock is not None:
                lock.release()
    except LockHeld as e:
        raise click.ClickException(f"--repair refused: {e}") from None
    except VerifyError as e:
        raise click.ClickException(scrub(str(e))) from None
    except OSError as e:  # storage unreachable, access denied
        raise click.ClickException(f"cannot verify {layout.display_uri}: {type(e).__name__}: {scrub(str(e))}") from None
    redo = redo_shards(v)
    shown = f" ({', '.join(map(str, redo[:10]))}{', ...' if len(redo) > 10 else ''})" if redo else ""
    click.echo(f"repaired {len(v.problems)} problem(s); the same `whisper-batch run` command now does {len(redo)} "
               f"shard(s){shown}")


def entry() -> None:
    """The console script (``whisper-batch``)."""
    main()


if __name__ == "__main__":
    entry()
