"""pipeline/storage.py without a server: options, credential handling, what an error says was tried, local checks.

The S3 behaviour against a real S3-compatible server is in tests/integration/test_s3.py.
"""

import pytest

from whisper_batch.pipeline.config import load_config
from whisper_batch.pipeline.storage import (
    StorageError,
    describe_access,
    preflight,
    resolve_storage_options,
)


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """No AWS settings from this machine: env cleared, ~/.aws files pointed at nothing, no instance metadata."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_resolved_options_turn_listing_cache_off_without_mutating():
    given = {"endpoint_url": "http://x"}
    resolved = resolve_storage_options(given)
    assert resolved == {"endpoint_url": "http://x", "use_listings_cache": False} and given == {"endpoint_url": "http://x"}
    assert resolve_storage_options({"use_listings_cache": True})["use_listings_cache"] is True
    assert resolve_storage_options(None) == {"use_listings_cache": False}


def test_describe_names_endpoint_source_and_credential_source_never_values(no_aws, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    text = describe_access("s3://b/k", {}, fs)
    assert "endpoint http://127.0.0.1:9 (from AWS_ENDPOINT_URL)" in text and "region us-east-1" in text
    assert "credentials from environment variables AWS_ACCESS_KEY_ID" in text
    assert "AKIAENVKEYID" not in text and "env-secret-value" not in text
    # the config wins over the environment, for the endpoint and for the credentials
    options = {"endpoint_url": "http://minio:9000", "key": "AKIACFG", "secret": "cfg-secret-value"}
    text = describe_access("s3://b/k", options, s3fs.S3FileSystem(skip_instance_cache=True, **options))
    assert "endpoint http://minio:9000 (from storage.storage_options.endpoint_url)" in text
    assert "credentials from storage.storage_options (key, secret)" in text and "cfg-secret-value" not in text


def test_describe_profile_and_no_credentials(no_aws, monkeypatch, tmp_path):
    import s3fs

    creds = tmp_path / "credentials"
    creds.write_text("[batch]\naws_access_key_id = AKIAPROFILE\naws_secret_access_key = profile-secret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    fs = s3fs.S3FileSystem(skip_instance_cache=True, profile="batch")
    text = describe_access("s3://b/k", {"profile": "batch"}, fs)
    assert f"the shared credentials file ({creds}), profile 'batch'" in text and "profile-secret" not in text
    assert "endpoint https://s3.amazonaws.com (not in storage options or AWS_ENDPOINT_URL(_S3)" in text
    text = describe_access("s3://b/k", {}, s3fs.S3FileSystem(skip_instance_cache=True))
    assert "credentials from nowhere: none found" in text


def test_storage_error_is_a_value_error():
    # the CLI's `run` reports ValueErrors as a one-line "Error: ..." (no traceback)
    assert issubclass(StorageError, ValueError)


def test_preflight_local_paths(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio_filepath": "a.wav"}\n')
    cfg = load_config(None)
    out = preflight(str(manifest), str(tmp_path / "new" / "out"), cfg)
    assert out.storage.storage_options == {"use_listings_cache": False} and out.decode == cfg.decode
    assert not (tmp_path / "new").exists()  # a check, not a write
    with pytest.raises(
        StorageError, match=rf"input {tmp_path}/nope.jsonl does not exist \(nearest existing folder: {tmp_path}\)"
    ):
        preflight(str(tmp_path / "nope.jsonl"), str(tmp_path / "out"), cfg)
    with pytest.raises(StorageError, match=rf"output {manifest}/out: {manifest} is a file, expected a folder"):
        preflight(str(manifest), str(manifest / "out"), cfg)
    with pytest.raises(StorageError, match="input .*/audio/\\*.flac does not exist"):
        preflight(str(tmp_path / "audio" / "*.flac"), str(tmp_path / "out"), cfg)
    (tmp_path / "audio").mkdir()
    preflight(str(tmp_path / "audio" / "*.flac"), str(tmp_path / "out"), cfg)  # an empty glob is the plan's to report


def test_preflight_bad_option_is_named(no_aws):
    cfg = load_config(None, ["storage.storage_options={region: eu-west-1, endpoint_url: 'http://127.0.0.1:9'}"])
    with pytest.raises(StorageError) as e:
        preflight("s3://bucket/m.jsonl", "s3://bucket/out", cfg, timeout_s=2)
    assert "storage.storage_options has an option this filesystem does not accept" in str(e.value)
    assert "'region'" in str(e.value)
