"""Runs ``whisper-batch run`` as a Ray job: submit, follow, status, logs, stop and resume.

Everything goes through ``ray.job_submission.JobSubmissionClient`` (the job server's REST API on the dashboard port,
8265 by default). A submission ships the project's code (the ``whisper_batch`` package: ``model``, ``pipeline``,
``jobs``) and the resolved config as the job's ``working_dir``; the job's entrypoint is
``python -m whisper_batch.jobs.cli run INPUT -o OUTPUT --config .whisper-batch/config.yaml``, the same command a
KubeRay ``RayJob`` runs (configs/cluster/).

Credentials never leave this machine: they are removed from the shipped config and are in neither the job's
metadata nor its runtime environment. The job's processes take them from their own environment (instance or pod
roles, or the ``AWS_*`` variables of ``ray start``), as every other AWS client on the cluster does.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import json
import logging
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import click
import yaml

from whisper_batch.pipeline.config import RunConfig, config_to_dict, load_config
from whisper_batch.pipeline.ray_compat import auth_mode, enable_local_token, has_local_token, token_source
from whisper_batch.pipeline.secrets import redact_uri, secret_option_names, without_secrets
from whisper_batch.pipeline.storage import is_remote, resolve_storage_options

logger = logging.getLogger(__name__)

ENTRYPOINT = ("python", "-m", "whisper_batch.jobs.cli", "run")
JOB_LOCK_WAIT_S = 60
# where the resolved config lies inside the job's working_dir
JOB_CONFIG = ".whisper-batch/config.yaml"
PACKAGES = ("whisper_batch", "whisper_batch.model", "whisper_batch.pipeline", "whisper_batch.jobs")
ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# metadata["whisper_batch"] marks our jobs; "input", "output" and "config" (JSON, no credentials) let resume rebuild one
METADATA_KIND = "run"

Echo = Callable[..., None]


class JobError(RuntimeError):
    """The job server cannot be reached, refuses a request, or a job cannot be (re)submitted; the message says why."""


def build_entrypoint(input_uri: str, output_uri: str, config_path: str, overrides: tuple[str, ...] = ()) -> str:
    """The shell command a job runs:
    ``python -m whisper_batch.jobs.cli run INPUT -o OUTPUT --config CONFIG --lock-wait S [--set K=V]...``.

    A job is submitted only when no job of ours is active on OUTPUT; a lock still held there is a stopped job's driver
    still exiting (Ray reports STOPPED once it has sent SIGKILL, not once the process is gone), so the run waits."""
    args = [*ENTRYPOINT, input_uri, "-o", output_uri, "--config", config_path, "--lock-wait", str(JOB_LOCK_WAIT_S)]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def _status(value: Any) -> str:
    return getattr(value, "value", str(value))


def connect(address: str, timeout_s: float = 10.0):
    """A ``JobSubmissionClient`` for ``address`` (``http://HEAD:8265``), after checking that a Ray job server answers
    there and, when it uses token authentication, that this machine has its token.

    The token is found as Ray's own CLI finds it: ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH`` names,
    else ``~/.ray/auth_token`` (where ``ray start`` and ``ray get-auth-token --generate`` keep it). Ray's client sends
    it only when ``RAY_AUTH_MODE=token``; here it is sent whenever the server asks for one and a token is found
    (Ray's ``maybe_enable_token_auth_if_token_available``, what ``ray.init`` does for a local cluster).

    Raises:
        JobError: nothing answers there, what answers is not a Ray job server, the server wants a token this
            machine lacks, or it refuses the token (each message says what to do).
    """
    from ray.job_submission import JobSubmissionClient

    url = (address if "://" in address else f"http://{address}").rstrip("/")
    if server_auth_mode(url, timeout_s) == "token":
        use_token(url)
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # noqa: BLE001 - version, authentication, ... : the SDK's message says which
        if "Authentication failed" in str(e) or "Forbidden" in str(e):
            raise JobError(
                f"the Ray job server at {url} refused this machine's token (from {token_source()}): it is not the "
                f"head's token. {TOKEN_HELP}"
            ) from None
        raise JobError(f"the Ray job server at {url} refused the client: {e}") from None


TOKEN_HELP = (
    "Print the head's token with `ray get-auth-token` on the head, then here either set RAY_AUTH_TOKEN=<token>, "
    "or save it as ~/.ray/auth_token (or in any file that RAY_AUTH_TOKEN_PATH names)."
)


def server_auth_mode(url: str, timeout_s: float) -> str:
    """``token``, ``disabled`` or ``unknown`` (a Ray without the endpoint): what the job server at ``url`` says.

    Raises:
        JobError: nothing answers at ``url``, or what answers is not a Ray job server.
    """
    import requests

    probe = f"{url}/api/authentication_mode"  # public: answers without a token
    try:
        # the SDK's own check has no timeout: a firewalled address would hang for minutes
        r = requests.get(probe, timeout=timeout_s)
    except requests.exceptions.RequestException as e:
        refused = isinstance(e, requests.exceptions.ConnectTimeout) or "NewConnectionError" in repr(e)
        if refused or isinstance(e, requests.exceptions.Timeout):
            raise JobError(
                f"cannot reach the Ray job server at {url} (tried GET {probe}, {timeout_s:.0f} s timeout: "
                f"{type(e).__name__}). Is the head running with its dashboard (`ray start --head "
                f"--dashboard-host=0.0.0.0`, ray[default] installed) and is its port (8265 by default) reachable "
                f"from here?"
            ) from None
        raise JobError(f"{url} answers but not as an HTTP server ({type(e).__name__}): {NOT_A_JOB_SERVER}") from None
    if r.status_code == 200:
        try:
            return str(r.json()["authentication_mode"])
        except (ValueError, KeyError, TypeError):
            pass
    try:  # a Ray without /api/authentication_mode still answers /api/version (without authentication)
        v = requests.get(f"{url}/api/version", timeout=timeout_s)
        if v.status_code == 200 and "ray_version" in v.json():
            return "unknown"
    except (requests.exceptions.RequestException, ValueError):
        pass
    raise JobError(f"{url} answers (GET {probe}: HTTP {r.status_code}) but it is not a Ray job server: "
                   f"{NOT_A_JOB_SERVER}")


NOT_A_JOB_SERVER = (
    "--address must be the head's dashboard (the job server), http://HEAD:8265 by default, not the cluster's GCS "
    "port (6379) or its Ray client port (10001); the head must run it (`ray start --head --dashboard-host=0.0.0.0` "
    "with ray[default] installed)."
)


def use_token(url: str) -> None:
    """Makes Ray's client send this machine's token (the server at ``url`` wants one).

    Raises:
        JobError: ``RAY_AUTH_MODE=disabled`` here, or no token is found.
    """
    if auth_mode() == "disabled":
        raise JobError(f"the Ray job server at {url} requires a token, but RAY_AUTH_MODE=disabled here: unset it "
                       f"(or set RAY_AUTH_MODE=token). {TOKEN_HELP}")
    enable_local_token()
    if auth_mode() != "token" or not has_local_token():
        raise JobError(f"the Ray job server at {url} requires a token and this machine has none (RAY_AUTH_TOKEN "
                       f"unset, no {token_source()}). {TOKEN_HELP}")


def job_config(cfg: RunConfig) -> tuple[dict[str, Any], list[str]]:
    """The config a job runs with (joins its cluster, no credentials) and the names of the options left out."""
    d = config_to_dict(cfg)
    options = d["storage"]["storage_options"]
    dropped = secret_option_names(options)
    d["storage"]["storage_options"] = without_secrets(options)
    d["ray"]["address"] = "auto"  # the driver runs on the cluster: join it, never start a Ray of its own
    return d, dropped


def stage_package(dest: str, config: dict[str, Any]) -> str:
    """Copies the project's packages and the job's config into ``dest`` (the job's working_dir); returns ``dest``."""
    for package in PACKAGES:  # each from where this install keeps it (the three parts live outside whisper_batch/)
        src = os.path.dirname(importlib.import_module(package).__file__)
        target = os.path.join(dest, *package.split("."))
        shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    path = os.path.join(dest, JOB_CONFIG)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("# written by `whisper-batch submit`: the resolved config of this job (credentials left out)\n")
        yaml.safe_dump(config, f, sort_keys=False)
    return dest


def project_requirements() -> list[str]:
    """The project's own dependencies (no extras), for a runtime env that installs them on nodes lacking them."""
    try:
        requires = importlib.metadata.requires("whisper-batch") or []
    except importlib.metadata.PackageNotFoundError:
        raise JobError("--pip needs the project installed here (pip install -e .) to know its dependencies") from None
    return [r for r in requires if "extra ==" not in r]


def runtime_env(package_dir: str, pip: bool = False) -> dict[str, Any]:
    """Ships the code and config; ``pip`` also installs the dependencies into a per-job virtualenv on each node."""
    env: dict[str, Any] = {"working_dir": package_dir, "env_vars": {"PYTHONUNBUFFERED": "1"}}
    if pip:
        env["pip"] = project_requirements()
    return env


def _job_uri(uri: str, role: str, echo: Echo) -> str:
    if redact_uri(uri) != uri:
        raise JobError(f"{role} {redact_uri(uri)} has a password in it: give the cluster nodes credentials instead")
    if is_remote(uri) or "://" in uri:
        return uri
    path = os.path.abspath(uri)
    echo(f"note: {role} {path} is a local path: every node of the cluster must see it at that path")
    return path


def find_jobs(client, output_uri: str) -> list:
    """Our jobs on this cluster that write ``output_uri``, oldest first."""
    want = output_uri.rstrip("/")
    jobs = [
        j for j in client.list_jobs()
        if (j.metadata or {}).get("whisper_batch") == METADATA_KIND
        and (j.metadata or {}).get("output", "").rstrip("/") == want
    ]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def _refuse_active(client, output_uri: str) -> None:
    active = [j for j in find_jobs(client, output_uri) if _status(j.status) in ACTIVE]
    if active:
        j = active[-1]
        raise JobError(
            f"job {j.submission_id} is still {_status(j.status)} on {redact_uri(output_uri)}: follow it with "
            f"`whisper-batch jobs logs {j.submission_id}`, or stop it with `whisper-batch jobs stop {j.submission_id}`"
        )


def submit_run(
    client, input_uri: str, output_uri: str, cfg: RunConfig, pip: bool = False, echo: Echo = click.echo
) -> str:
    """Submits ``run INPUT -o OUTPUT`` with ``cfg`` as a Ray job; returns its submission id."""
    input_uri, output_uri = _job_uri(input_uri, "INPUT", echo), _job_uri(output_uri, "OUTPUT", echo)
    _refuse_active(client, output_uri)
    if cfg.model.name and not is_remote(cfg.model.name) and os.path.exists(os.path.expanduser(cfg.model.name)):
        echo(f"note: model {cfg.model.name} is a local path: every node of the cluster must see it at that path")
    config, dropped = job_config(cfg)
    if dropped:
        echo(
            f"note: storage option(s) {', '.join(dropped)} are not sent to the cluster; its nodes use their own "
            f"credentials (instance/pod role, or AWS_* in the environment of `ray start`)"
        )
    metadata = {"whisper_batch": METADATA_KIND, "input": input_uri, "output": output_uri, "config": json.dumps(config)}
    with tempfile.TemporaryDirectory(prefix="whisper-batch-job-") as tmp:
        stage_package(tmp, config)
        # submit_job uploads the working_dir before it returns, so the temporary copy may go afterwards
        return client.submit_job(
            entrypoint=build_entrypoint(input_uri, output_uri, JOB_CONFIG),
            runtime_env=runtime_env(tmp, pip),
            metadata=metadata,
        )


def wait_for_end(client, submission_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Polls until the job is SUCCEEDED, FAILED or STOPPED (or ``timeout_s`` passes); returns the last status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = _status(client.get_job_status(submission_id))
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def follow(client, submission_id: str, echo: Echo = click.echo) -> str:
    """Prints the job's logs as they come until it ends; returns its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            echo(chunk, nl=False)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - the log stream broke: the job's status still tells how it ended
        logger.warning("log stream of %s ended early (%s); waiting for the job to end", submission_id, e)
    return wait_for_end(client, submission_id)


def describe_job(client, submission_id: str) -> dict[str, Any]:
    """What ``jobs status`` shows: status, message, entrypoint, input/output and times (no runtime env, no secrets)."""
    try:
        info = client.get_job_info(submission_id)
    except RuntimeError as e:
        raise JobError(f"no job {submission_id!r} on this cluster ({e})") from None
    meta = info.metadata or {}
    return {
        "submission_id": info.submission_id,
        "status": _status(info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "input": meta.get("input"),
        "output": meta.get("output"),
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def format_job(d: dict[str, Any]) -> str:
    def when(ms: int | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

    lines = [f"job        {d['submission_id']}", f"status     {d['status']}"]
    if d["message"]:
        lines.append(f"message    {d['message'].strip().splitlines()[0][:300]}")
    lines += [f"input      {d['input'] or '-'}", f"output     {d['output'] or '-'}"]
    lines += [f"entrypoint {d['entrypoint']}", f"started    {when(d['start_time'])}",
              f"ended      {when(d['end_time'])}"]
    return "\n".join(lines)


def stop(client, submission_id: str, timeout_s: float = 60.0) -> str:
    """Asks the job to stop and waits until it has; returns its final status."""
    describe_job(client, submission_id)  # a clear error for an unknown id
    client.stop_job(submission_id)  # False when it had already ended: the status says how
    return wait_for_end(client, submission_id, timeout_s)


def resume_source(client, output_uri: str, overrides: tuple[str, ...]) -> tuple[str, RunConfig, str | None]:
    """(INPUT, config, previous submission id) of the run in ``output_uri``.

    From the latest of our jobs on this cluster that wrote ``output_uri``; failing that (it ran elsewhere, or the
    cluster was recreated), from ``OUTPUT/run.json`` read with this machine's credentials.
    """
    jobs = find_jobs(client, output_uri)
    if jobs:
        last = jobs[-1]
        base, input_uri = json.loads(last.metadata["config"]), last.metadata["input"]
        previous = last.submission_id
    else:
        from whisper_batch.pipeline.layout import RunLayout

        reader = load_config({}, list(overrides))
        layout = RunLayout(output_uri, resolve_storage_options(reader.storage.storage_options))
        if not layout.exists(layout.run_json):
            raise JobError(
                f"nothing to resume: no job on this cluster wrote {redact_uri(output_uri)}, and it holds no run.json"
            )
        run = layout.read_json(layout.run_json)
        base, input_uri, previous = run["config"], run["input_uri"], None
        base["storage"]["storage_options"] = _drop_masked(base["storage"]["storage_options"])
    return input_uri, load_config(base, list(overrides)), previous


def _drop_masked(options: dict[str, Any]) -> dict[str, Any]:
    """run.json stores credentials as "***": drop those entries."""
    return {k: _drop_masked(v) if isinstance(v, dict) else v for k, v in options.items() if v != "***"}


def resume_run(
    client, output_uri: str, overrides: tuple[str, ...] = (), pip: bool = False, echo: Echo = click.echo
) -> str:
    """Resubmits the run in ``output_uri`` (same INPUT and config, plus ``overrides``); returns the new id.

    The new job's ``run`` skips every committed shard, so nothing is done twice.
    """
    _refuse_active(client, output_uri)
    input_uri, cfg, previous = resume_source(client, output_uri, overrides)
    if previous:
        echo(f"resuming {redact_uri(output_uri)} after job {previous} ({_status(client.get_job_status(previous))})")
    return submit_run(client, input_uri, output_uri, cfg, pip=pip, echo=echo)
