"""Storage options and the preflight check that runs before any work: can INPUT, OUTPUT and the model be reached?

Every read and write goes through fsspec with ``cfg.storage.storage_options``, for ``file://`` and ``s3://`` alike.
For S3 the endpoint and credentials come from the config (``endpoint_url``, ``key``/``secret``, ``profile``,
``client_kwargs``) or, when the config leaves them out, from the standard AWS chain that botocore reads on every
process: ``AWS_ENDPOINT_URL(_S3)``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE`` with ``~/.aws/{credentials,config}``, then container and instance roles. Credentials from the
environment are never copied into the options, so they are never pickled into Ray tasks or written anywhere: each
node takes them from its own environment.

``preflight`` turns an unreachable endpoint, wrong credentials and a missing bucket or prefix into one
``StorageError`` naming the URI, the endpoint, the region and where the credentials came from (never their values).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import fsspec

from whisper_batch.pipeline.config import RunConfig, StorageConfig
from whisper_batch.pipeline.layout import RunLayout, is_local_fs
from whisper_batch.pipeline.secrets import redact_uri, scrub, secret_option_names

logger = logging.getLogger(__name__)

_S3_PROTOCOLS = ("s3", "s3a")
_CREDENTIAL_METHODS = {
    "env": "environment variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
    "shared-credentials-file": "the shared credentials file ({file}), profile {profile!r}",
    "config-file": "the AWS config file ({config}), profile {profile!r}",
    "iam-role": "the instance role (EC2 instance metadata)",
    "container-role": "the container role (ECS/EKS credentials endpoint)",
    "assume-role": "an assumed role (profile {profile!r})",
    "assume-role-with-web-identity": "a web identity role (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE)",
    "sso": "AWS SSO (profile {profile!r})",
    "explicit": "storage.storage_options key/secret",
}


class StorageError(ValueError):
    """A storage location cannot be used; the message names it and says what was tried (never credentials)."""


def resolve_storage_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The fsspec options the pipeline uses: the config's, with directory-listing caches off by default.

    The run's workers commit shards from other processes, so a listing cached by this process (fsspec keeps one per
    filesystem instance) would hide them from resume, stats and status; every listing must ask the store.
    """
    resolved = dict(options or {})
    resolved.setdefault("use_listings_cache", False)
    return resolved


def is_remote(uri: str | None) -> bool:
    """True for URIs that fsspec opens on a non-local filesystem (s3://, gs://, https:// ...)."""
    if not uri or "://" not in uri:
        return False
    return fsspec.core.split_protocol(uri)[0] not in ("file", "local")


def _is_s3(uri: str) -> bool:
    return fsspec.core.split_protocol(uri)[0] in _S3_PROTOCOLS


def _probe_options(uri: str, options: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Options for the preflight's own filesystem: a fresh instance, and for S3 short timeouts and few retries."""
    probe = {**options, "skip_instance_cache": True}
    if _is_s3(uri):
        # botocore defaults (60 s connect timeout, several retries) would make an unreachable endpoint hang for minutes
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", timeout_s)
        config.setdefault("read_timeout", timeout_s)
        config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
        probe["config_kwargs"] = config
    return probe


def describe_access(uri: str, options: dict[str, Any] | None, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """What was tried to reach ``uri``: for S3 the endpoint (and where it came from), region and credential source."""
    if not _is_s3(uri):
        return f"{fsspec.core.split_protocol(uri)[0] or 'local'} filesystem"
    options = options or {}
    endpoint, source = _configured_endpoint(options)
    region = None
    if fs is not None:
        try:
            client = fs.connect()
            endpoint, region = client.meta.endpoint_url, client.meta.region_name
        except Exception as e:  # noqa: BLE001 - describing must never hide the original error
            logger.debug("cannot build an S3 client to describe %s: %s", redact_uri(uri), e)
    parts = [f"endpoint {endpoint or 'AWS S3 (default for the region)'} ({source})"]
    if region:
        parts.append(f"region {region}")
    parts.append(f"credentials from {_credential_source(options, fs)}")
    return ", ".join(parts)


def _configured_endpoint(options: dict[str, Any]) -> tuple[str | None, str]:
    if options.get("endpoint_url"):
        return options["endpoint_url"], "from storage.storage_options.endpoint_url"
    if (options.get("client_kwargs") or {}).get("endpoint_url"):
        return options["client_kwargs"]["endpoint_url"], "from storage.storage_options.client_kwargs.endpoint_url"
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var], f"from {var}"
    return None, "not in storage options or AWS_ENDPOINT_URL(_S3): AWS's default or the profile's endpoint_url"


def _credential_source(options: dict[str, Any], fs: fsspec.AbstractFileSystem | None) -> str:
    """Where botocore found (or would look for) credentials; never the credentials themselves."""
    if options.get("anon"):
        return "nowhere: anonymous access (storage.storage_options.anon)"
    explicit = secret_option_names(options)
    if explicit:
        return f"storage.storage_options ({', '.join(sorted(explicit))})"
    profile = options.get("profile") or os.environ.get("AWS_PROFILE") or "default"
    method = None
    if fs is not None:
        try:
            from fsspec.asyn import sync

            fs.connect()
            creds = sync(fs.loop, fs.session.get_credentials)
            method = getattr(creds, "method", None) if creds is not None else "none"
        except Exception as e:  # noqa: BLE001 - only describes an error: any failure means the default chain
            logger.debug("cannot resolve the credential source: %s", e)
    if method == "none":
        return (
            "nowhere: none found (looked in storage.storage_options, AWS_ACCESS_KEY_ID, AWS_PROFILE "
            f"{profile!r} in ~/.aws, container and instance roles)"
        )
    if method is None:
        return "the AWS default chain (environment, ~/.aws profiles, instance role)"
    template = _CREDENTIAL_METHODS.get(method, method + " (botocore)")
    return template.format(
        profile=profile,
        file=os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        config=os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"),
    )


def _explain(role: str, uri: str, error: BaseException, fs, options: dict[str, Any]) -> str:
    """One message for a failed check: what failed, the likely cause, and what was tried."""
    shown = redact_uri(uri)
    text = scrub(f"{type(error).__name__}: {error}", options)
    if isinstance(error, PermissionError):
        cause = "access denied (wrong or expired credentials, or no permission for this bucket/prefix)"
    elif isinstance(error, FileNotFoundError):
        cause = "it does not exist"
    elif isinstance(error, TypeError) and "argument" in str(error):
        cause = "storage.storage_options has an option this filesystem does not accept"
    elif _is_connection_error(error):
        cause = "cannot connect to the storage endpoint (wrong endpoint URL, or the service is down/unreachable)"
    elif type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        cause = "no usable credentials found"
    else:
        cause = "the storage request failed"
    return scrub(f"{role} {shown}: {cause} ({text}); tried {describe_access(uri, options, fs)}", options)


def _is_connection_error(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ClientConnectorError",
                         "ConnectionRefusedError", "FSTimeoutError", "TimeoutError", "ReadTimeoutError"})


def _bucket_of(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The bucket (first path component) on object stores; None on local disk."""
    return None if is_local_fs(fs) else path.lstrip("/").split("/", 1)[0]


def _bucket_exists(fs: fsspec.AbstractFileSystem, bucket: str) -> bool:
    """Whether the bucket exists; access errors propagate (``fs.exists`` would turn them into False)."""
    try:
        fs.info(bucket)
        return True
    except FileNotFoundError:
        return False


def _missing(role: str, uri: str, fs, path: str, options: dict[str, Any]) -> StorageError:
    """A precise 'does not exist': the bucket is missing, or the bucket is there but the object/prefix is not."""
    bucket = _bucket_of(fs, path)
    if bucket is None:
        parent = path
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent.rstrip("/"))
        return StorageError(f"{role} {uri} does not exist (nearest existing folder: {parent or '/'})")
    if not _bucket_exists(fs, bucket):
        what = f"bucket {bucket!r} does not exist"
    else:
        key = path.lstrip("/").split("/", 1)[1] if "/" in path.lstrip("/") else ""
        what = f"bucket {bucket!r} exists but holds no object or prefix {key!r}"
    return StorageError(f"{role} {redact_uri(uri)}: {what}; tried {describe_access(uri, options, fs)}")


def _check_readable(role: str, uri: str, fs, path: str, options: dict[str, Any]) -> None:
    """The object, folder or glob's base exists and can be read (a brace pattern of tar shards is a glob here)."""
    from whisper_batch.pipeline.sources import has_braces

    if fsspec.core.has_magic(path) or has_braces(path):
        parts = path.split("/")
        base = "/".join(parts[: next(i for i, p in enumerate(parts) if fsspec.core.has_magic(p) or has_braces(p))])
        if not base or fs.isdir(base):
            return
        raise _missing(role, uri, fs, base, options)
    try:
        fs.info(path)
    except FileNotFoundError:
        raise _missing(role, uri, fs, path, options) from None


def _check_writable(role: str, uri: str, fs, path: str, options: dict[str, Any]) -> None:
    """Locally: the nearest existing folder is writable. Object stores: a probe object can be put and deleted."""
    bucket = _bucket_of(fs, path)
    if bucket is None:
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent.rstrip("/")) or "/"
        if not os.path.isdir(parent):
            raise StorageError(f"{role} {uri}: {parent} is a file, expected a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StorageError(f"{role} {uri}: cannot create or write files in {parent} (permission denied)")
        return
    probe = RunLayout.preflight_probe(path)
    try:
        fs.pipe_file(probe, b"")
    except FileNotFoundError:
        raise _missing(role, uri, fs, path, options) from None
    fs.rm_file(probe)


def _targets(input_uri: str, output_uri: str, cfg: RunConfig) -> list[tuple[str, str, Any]]:
    targets = [("input", input_uri, _check_readable), ("output", output_uri, _check_writable)]
    if is_remote(cfg.model.name):
        targets.append(("model checkpoint", cfg.model.name, _check_readable))
    return targets


def preflight(input_uri: str, output_uri: str, cfg: RunConfig, timeout_s: float = 10.0) -> RunConfig:
    """Checks that INPUT (and a remote model) can be read and OUTPUT written, before the plan or any work.

    Returns ``cfg`` with the options of :func:`resolve_storage_options`, which the run must use from here on.

    Raises:
        StorageError: an unreachable endpoint, wrong credentials, a missing bucket, object or prefix, a bad option;
            the message names the URI and what was tried (endpoint, region, credential source, never credentials).
    """
    options = resolve_storage_options(cfg.storage.storage_options)
    for role, uri, check in _targets(input_uri, output_uri, cfg):
        fs = None
        try:
            fs, path = fsspec.core.url_to_fs(uri, **_probe_options(uri, options, timeout_s))
            if not is_remote(uri):
                path = os.path.abspath(path)
            check(role, uri, fs, path, options)
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - every storage failure becomes one clear message
            raise StorageError(_explain(role, uri, e, fs, options)) from None
        logger.info("%s %s is reachable (%s)", role, redact_uri(uri), "remote" if is_remote(uri) else "local")
    return dataclasses.replace(cfg, storage=StorageConfig(storage_options=options))
