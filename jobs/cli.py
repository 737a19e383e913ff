"""``whisper-batch``: the command line. Thin click wrappers over ``pipeline/`` and ``jobs/`` functions."""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from pipeline.config import ConfigError, load_config


def _load(config: str | None, overrides: tuple[str, ...], model: str | None = None):
    try:
        cfg = load_config(config, list(overrides) + ([f"model.name={model}"] if model else []))
    except (ConfigError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Batch transcription with Whisper: one machine or a Ray cluster, resumable, exactly-once Parquet output."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--model", "model_spec", default=None, help="Checkpoint path, URI or name (default: packaged tiny.en).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override, e.g. decode.beam_size=5.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file and line.")
def transcribe(files, model_spec, config, overrides, as_json) -> None:
    """Transcribe FILES (any audio container; local paths or URIs) in this process, without Ray."""
    from pipeline.transcriber import Featurizer, Transcriber, transcribe_files

    cfg = _load(config, overrides, model_spec)
    try:
        transcriber = Transcriber(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    featurizer = Featurizer(cfg, transcriber.n_mels)
    failed = 0
    for row in transcribe_files(transcriber, featurizer, files):
        failed += bool(row.get("error"))
        if as_json:
            keys = ("audio_filepath", "text", "segments", "language", "duration", "error", "model")
            click.echo(json.dumps({k: row.get(k) for k in keys}, ensure_ascii=False))
        elif row.get("error"):
            click.echo(f"{row['audio_filepath']}: ERROR {row['error']}", err=True)
        else:
            click.echo(f"{row['audio_filepath']}: {row['text']}")
    if failed == len(files):
        sys.exit(1)


def _layout(output: str, config: str | None = None, overrides: tuple[str, ...] = ()):
    from pipeline.layout import RunLayout

    cfg = _load(config, overrides)
    layout = RunLayout(output, cfg.storage.storage_options)
    if not layout.exists(layout.plan_json):
        raise click.ClickException(f"{layout.display_uri} holds no whisper-batch run (no plan.json); start one with "
                                   f"`whisper-batch run INPUT -o {output}`")
    return layout


@main.command()
@click.argument("input_uri", metavar="INPUT")
@click.option("-o", "--output", required=True, help="Output folder or URI (local, s3://, gs://).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override, e.g. decode.beam_size=5.")
@click.option("--model", "model_spec", default=None, help="Checkpoint path, URI or name (default: packaged tiny.en).")
@click.option("--retry-failed", is_flag=True, help="Redo only the committed rows whose `error` is set.")
def run(input_uri, output, config, overrides, model_spec, retry_failed) -> None:
    """Transcribe INPUT (a manifest .jsonl/.csv/.parquet, or a folder or glob of audio) into OUTPUT.

    Rerunning the same command resumes: committed shards are skipped. Failed rows are data (an `error` column),
    not a failed run: the exit status is non-zero only when the run itself fails.
    """
    from jobs.run import run as run_job
    from jobs.status import format_status, run_status
    from jobs.lock import LockHeld
    from pipeline.graph import Stalled
    from pipeline.manifest import ManifestError
    from pipeline.plan import PlanMismatch

    cfg = _load(config, overrides, model_spec)
    try:
        summary = run_job(input_uri, output, cfg, retry_failed=retry_failed, echo=click.echo)
    except (PlanMismatch, ManifestError, LockHeld, Stalled, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    from pipeline.layout import RunLayout

    click.echo("")
    click.echo(format_status(run_status(RunLayout(output, cfg.storage.storage_options))))
    click.echo(f"\ntranscripts: {summary.output}/transcripts/*.parquet — read them with e.g.")
    click.echo(f"  python -c \"import pandas as pd; print(pd.read_parquet('{summary.output}/transcripts')[['id','text','error']])\"")
    click.echo(f"  whisper-batch export {summary.output} --format srt -o subs/")


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config (storage options).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def status(output, as_json, config, overrides) -> None:
    """Progress of the run in OUTPUT: shards, rows, failures, audio hours, RTFx."""
    from jobs.status import format_status, run_status

    d = run_status(_layout(output, config, overrides))
    click.echo(json.dumps(d, indent=2) if as_json else format_status(d))


@main.command(name="eval")
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config (storage options).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def eval_(output, as_json, config, overrides) -> None:
    """WER of the committed rows that have a reference text (Whisper's English normalizer)."""
    from jobs.evaluate import evaluate, format_evaluation

    d = evaluate(_layout(output, config, overrides))
    click.echo(json.dumps(d, indent=2) if as_json else format_evaluation(d))


@main.command()
@click.argument("output")
@click.option("--format", "fmt", type=click.Choice(["srt", "vtt", "txt", "jsonl"]), required=True)
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False), help="Local folder to write into.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config (storage options).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def export(output, fmt, out_dir, config, overrides) -> None:
    """Write the committed transcripts of OUTPUT as subtitles, text, or JSON lines."""
    from jobs.export import export as export_rows

    d = export_rows(_layout(output, config, overrides), fmt, out_dir)
    click.echo(f"wrote {d['written']} {fmt} file(s) to {out_dir} ({d['skipped_failed']} failed rows skipped)")


@main.command()
@click.argument("manifest")
@click.option("--engines", default=",".join(("whisper-batch", "whisper-batch-int8", "openai", "faster-int8",
              "faster-batched-int8")), show_default=True, help="Comma-separated engines to run, alternating.")
@click.option("--model", "model_spec", default=None, help="Checkpoint for every engine (default: packaged tiny.en).")
@click.option("--repeat", default=1, show_default=True, help="Rounds; the engine order alternates between rounds.")
@click.option("--threads", default=os.cpu_count(), show_default=True, help="CPU threads for the peers.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the figures here.")
def bench(manifest, engines, model_spec, repeat, threads, json_out) -> None:
    """Side-by-side throughput/WER/memory of whisper-batch and its peers on MANIFEST, in one run."""
    import platform

    from jobs.bench import ENGINES, bench as run_bench, format_table

    chosen = [e.strip() for e in engines.split(",") if e.strip()]
    if unknown := [e for e in chosen if e not in ENGINES]:
        raise click.UsageError(f"unknown engine(s) {unknown}; choose from: {', '.join(ENGINES)}")
    scores = run_bench(manifest, chosen, model_spec, repeat, threads, echo=lambda m: click.echo(m, err=True))
    click.echo(f"machine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}")
    click.echo(format_table(scores))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(scores, f, indent=2)


if __name__ == "__main__":
    main()
