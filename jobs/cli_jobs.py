"""The cluster-job commands (Ray Jobs API): ``submit``, ``resume`` and ``jobs status|logs|stop``.

:mod:`whisper_batch.jobs.cli` adds them to ``whisper-batch``; each is a thin wrapper over
:mod:`whisper_batch.jobs.submit`.
"""

from __future__ import annotations

import json
import sys

import click

from whisper_batch.jobs.cli_options import SET_HELP, load_cli_config, shortcut_options

_ADDRESS_HELP = "Ray job server (the head's dashboard), e.g. http://HEAD:8265; default $RAY_API_SERVER_ADDRESS."


def _address_option(f):
    return click.option("--address", envvar="RAY_API_SERVER_ADDRESS", required=True, help=_ADDRESS_HELP)(f)


def _client(address: str):
    from whisper_batch.jobs.submit import JobError, connect

    try:
        return connect(address)
    except JobError as e:
        raise click.ClickException(str(e)) from None


def _finish(client, submission_id: str, wait: bool) -> None:
    """With --wait: follow the logs and exit non-zero unless SUCCEEDED. The submission id is the last line."""
    from whisper_batch.jobs.submit import describe_job, follow

    status = None
    if wait:
        status = follow(client, submission_id, echo=click.echo)
        message = describe_job(client, submission_id)["message"] or ""
        click.echo(f"\njob {submission_id} {status}"
                   + (f": {message.strip().splitlines()[0][:300]}" if message else ""))
    click.echo(submission_id)
    if wait and status != "SUCCEEDED":
        sys.exit(1)


@click.command()
@click.argument("input_uri", metavar="INPUT")
@click.option("-o", "--output", required=True, help="Output URI the cluster writes (s3://, gs://, or a shared path).")
@_address_option
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None, help="YAML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@shortcut_options
@click.option("--wait", is_flag=True, help="Follow the job's logs to the end; exit 0 only if it SUCCEEDED.")
@click.option("--pip", "pip", is_flag=True, help="Also install the project's dependencies on the nodes (virtualenv).")
def submit(input_uri, output, address, config, overrides, shortcuts, wait, pip) -> None:
    """Run `run INPUT -o OUTPUT` as a job on the Ray cluster at --address; prints the submission id last.

    The job gets this project's code and the resolved config (without credentials: nodes use their own); a --model
    path or URI must be one the nodes can read.
    """
    from whisper_batch.jobs.submit import JobError, submit_run

    cfg = load_cli_config(config, overrides, shortcuts)
    client = _client(address)
    try:
        submission_id = submit_run(client, input_uri, output, cfg, pip=pip, echo=click.echo)
    except JobError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"submitted job {submission_id} to {address}: {input_uri} -> {output}")
    _finish(client, submission_id, wait)


@click.command()
@click.argument("output")
@_address_option
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change a throughput setting, e.g. ray.model_actors=8.")
@click.option("--wait", is_flag=True, help="Follow the job's logs to the end; exit 0 only if it SUCCEEDED.")
@click.option("--pip", "pip", is_flag=True, help="Also install the project's dependencies on the nodes (virtualenv).")
def resume(output, address, overrides, wait, pip) -> None:
    """Resubmit what a failed or stopped job left undone in OUTPUT (a new job; committed shards are never redone)."""
    from whisper_batch.jobs.submit import JobError, resume_run
    from whisper_batch.pipeline.config import ConfigError

    client = _client(address)
    try:
        submission_id = resume_run(client, output, overrides, pip=pip, echo=click.echo)
    except (JobError, ConfigError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"submitted job {submission_id} to {address}: resume of {output}")
    _finish(client, submission_id, wait)


@click.group(name="jobs")
def jobs_group() -> None:
    """Status, logs and stop of jobs submitted with `whisper-batch submit`."""


@jobs_group.command(name="status")
@click.argument("submission_id")
@_address_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def job_status(submission_id, address, as_json) -> None:
    """Status of a job: SUCCEEDED, FAILED, STOPPED, RUNNING or PENDING, with its input and output."""
    from whisper_batch.jobs.submit import JobError, describe_job, format_job

    try:
        d = describe_job(_client(address), submission_id)
    except JobError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(d, indent=2) if as_json else format_job(d))


@jobs_group.command(name="logs")
@click.argument("submission_id")
@_address_option
@click.option("-f", "--follow", "follow_logs", is_flag=True, help="Keep printing until the job ends.")
def job_logs(submission_id, address, follow_logs) -> None:
    """The job's driver output (what `whisper-batch run` printed on the cluster)."""
    from whisper_batch.jobs.submit import JobError, describe_job, follow

    client = _client(address)
    try:
        describe_job(client, submission_id)
    except JobError as e:
        raise click.ClickException(str(e)) from None
    if follow_logs:
        follow(client, submission_id, echo=click.echo)
    else:
        click.echo(client.get_job_logs(submission_id), nl=False)


@jobs_group.command(name="stop")
@click.argument("submission_id")
@_address_option
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the job to end.")
def job_stop(submission_id, address, timeout) -> None:
    """Stop a job and wait until it has ended; `whisper-batch resume OUTPUT` finishes its work later."""
    from whisper_batch.jobs.submit import JobError, stop

    try:
        status = stop(_client(address), submission_id, timeout)
    except JobError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"job {submission_id} {status}")
    if status not in ("STOPPED", "SUCCEEDED", "FAILED"):
        raise click.ClickException(f"job {submission_id} is still {status} after {timeout:.0f} s")
