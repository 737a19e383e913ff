"""One list decides what is secret: every path that shows or ships settings is checked against the same canaries.

The paths: the run record (run.json), log lines (through the CLI's scrub filter), storage error messages,
`status` (text and JSON), a job's shipped config file and its metadata.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from whisper_batch.jobs.logs import ScrubFilter
from whisper_batch.jobs.status import format_status, run_status
from whisper_batch.jobs.submit import job_config, stage_package
from whisper_batch.pipeline import secrets
from whisper_batch.pipeline.config import load_config, redacted
from whisper_batch.pipeline.layout import RunLayout
from whisper_batch.pipeline.plan import build_plan, start_run
from whisper_batch.pipeline.storage import StorageError, preflight

# every kind of secret option, at the top and nested, next to options that are not secret
OPTIONS = {
    "key": "AKIACANARYKEY00001",
    "secret": "canary-secret-top",
    "token": "canary-token-top",
    "password": "canary-password-top",
    "sas_token": "canary-sas-token",
    "account_key": "canary-account-key",
    "endpoint_url": "http://user:canary-uri-password@127.0.0.1:9",
    "profile": "prod",
    "client_kwargs": {
        "aws_secret_access_key": "canary-secret-nested",
        "aws_session_token": "canary-session-token",
        "region_name": "eu-west-1",
        "headers": {"Authorization": "Bearer canary-bearer", "x-amz-security-token": "canary-amz-token"},
    },
    "config_kwargs": {"signature_version": "s3v4", "client_secret": "canary-client-secret"},
}
CANARIES = [
    "AKIACANARYKEY00001", "canary-secret-top", "canary-token-top", "canary-password-top", "canary-sas-token",
    "canary-account-key", "canary-uri-password", "canary-secret-nested", "canary-session-token", "canary-bearer",
    "canary-amz-token", "canary-client-secret",
]
NOT_SECRET = {"profile": "prod", "region_name": "eu-west-1", "signature_version": "s3v4"}


def assert_clean(text: str, where: str) -> None:
    leaked = [c for c in CANARIES if c in text]
    assert not leaked, f"{where} shows {leaked}"


@pytest.fixture
def cfg():
    return load_config({"storage": {"storage_options": OPTIONS}}, [])


def test_the_list_names_every_canary_secret_and_keeps_the_rest():
    names = secrets.secret_option_names(OPTIONS)
    assert "client_kwargs.headers.Authorization" in names and "config_kwargs.client_secret" in names
    assert not any(n.endswith(("profile", "region_name", "signature_version", "endpoint_url")) for n in names)
    values = secrets.secret_values(OPTIONS)
    assert all(any(c in v for v in values) for c in CANARIES if c != "canary-uri-password")
    shipped = secrets.without_secrets(OPTIONS)
    assert shipped["profile"] == "prod" and shipped["client_kwargs"]["region_name"] == "eu-west-1"
    assert shipped["config_kwargs"] == {"signature_version": "s3v4"} and shipped["client_kwargs"]["headers"] == {}
    assert secrets.redact_uri("https://me:pass@host/x") == "https://me:***@host/x"
    assert secrets.redact_uri("s3://bucket/x") == "s3://bucket/x"


def test_run_record_and_status(cfg, tmp_path: Path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio_filepath": "a.wav"}) + "\n")
    layout = RunLayout(str(tmp_path / "out"))
    start_run(layout, build_plan(str(manifest), cfg), cfg, "tiny.en")
    run_json = (tmp_path / "out" / "run.json").read_text()
    assert_clean(run_json, "run.json")
    shown = json.loads(run_json)["config"]["storage"]["storage_options"]
    assert shown["profile"] == "prod" and shown["config_kwargs"]["signature_version"] == "s3v4"
    assert shown["endpoint_url"] == "http://user:***@127.0.0.1:9"
    assert_clean(json.dumps(redacted(cfg)), "redacted config")
    status = run_status(layout)
    assert_clean(json.dumps(status, default=str), "status --json")
    assert_clean(format_status(status), "status")


def test_job_config_and_metadata(cfg, tmp_path: Path):
    config, dropped = job_config(cfg)
    assert_clean(json.dumps(config), "job metadata config")
    assert "client_kwargs.headers.Authorization" in dropped
    assert config["storage"]["storage_options"]["config_kwargs"] == {"signature_version": "s3v4"}
    assert config["storage"]["storage_options"]["endpoint_url"] == "http://127.0.0.1:9"  # nodes bring their own
    stage_package(str(tmp_path / "pkg"), config)
    shipped = "".join(p.read_text() for p in (tmp_path / "pkg").rglob("*.yaml"))
    assert "signature_version" in shipped
    assert_clean(shipped, "the job's shipped config file")


def test_log_lines(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "canary-env-session-token")
    secrets.register(OPTIONS)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ScrubFilter())
    logger = logging.getLogger("test-secrets")
    logger.addHandler(handler)
    try:
        logger.error("request with %s and headers %s", OPTIONS, {"Authorization": "AWS4-HMAC-SHA256 Credential=X"})
        try:
            raise RuntimeError(f"failed: {' '.join(CANARIES)} canary-env-session-token")
        except RuntimeError:
            logger.exception("a storage call failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "a storage call failed" in text and "eu-west-1" in text
    assert_clean(text, "log lines")
    assert "canary-env-session-token" not in text


def test_storage_errors(cfg, monkeypatch, tmp_path: Path):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    options = dict(OPTIONS, profile=None)  # no such profile here: the error comes from the endpoint
    cfg = load_config({"storage": {"storage_options": options}}, ["audio.decode_timeout_seconds=5"])
    with pytest.raises(StorageError) as e:
        preflight("s3://bucket/m.jsonl", str(tmp_path / "out"), cfg)
    assert_clean(str(e.value), "a storage error")
