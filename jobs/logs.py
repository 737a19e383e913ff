"""Logging of the CLI: ``-v`` / ``-vv`` levels, with credentials kept out of every line.

Two guards. Storage clients (botocore, aiobotocore, s3fs, fsspec, urllib3, gcsfs, …) stay at INFO or above even
under ``-vv``: at DEBUG botocore logs each request's headers, whose ``Authorization`` value names the access key id.
And every line is scrubbed on its way out: known secret values (the config's storage options and the standard
credential environment variables) and anything shaped like an AWS signature or access key id become ``***``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

# loggers that log request headers, signed URLs or credential sources at DEBUG
QUIET_LOGGERS = (
    "botocore", "aiobotocore", "boto3", "s3transfer", "s3fs", "fsspec", "gcsfs", "adlfs", "urllib3", "aiohttp",
    "google.auth", "azure",
)
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
               "GOOGLE_APPLICATION_CREDENTIALS_JSON", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN")
_SECRET_OPTION_WORDS = ("secret", "key", "token", "password", "passwd", "credential", "signature")
_PATTERNS = [
    (re.compile(r"(Credential=)[^\s,/'\"]+"), r"\1***"),
    (re.compile(r"(Signature=)[0-9a-fA-F]+"), r"\1***"),
    (re.compile(r"(X-Amz-Security-Token['\"]?\s*[:=]\s*['\"]?)[^\s,&'\"]+", re.I), r"\1***"),
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b"), "***"),
]
_MIN_SECRET_LEN = 4  # shorter values would mask ordinary words

_secrets: set[str] = set()


def register_secrets(storage_options: dict[str, Any] | None) -> None:
    """Remembers the credential values in ``storage_options`` (nested: client_kwargs, config_kwargs) to mask them."""

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, secret or any(w in str(k).lower() for w in _SECRET_OPTION_WORDS))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, secret)
        elif secret and isinstance(value, str) and len(value) >= _MIN_SECRET_LEN:
            _secrets.add(value)

    walk(storage_options or {}, False)


def scrub(text: str) -> str:
    """``text`` with known secrets and credential-shaped substrings masked."""
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class ScrubFilter(logging.Filter):
    """A handler filter that scrubs the message and the traceback of every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub(record.getMessage()), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def configure_logging(verbose: int) -> None:
    """WARNING by default, INFO with ``-v``, DEBUG with ``-vv`` (storage clients: INFO at most), scrubbed."""
    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(level)
    for handler in root.handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    register_secrets({"secret": [os.environ.get(name) for name in _SECRET_ENV]})


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def mute_console_logs() -> None:
    """Drops every later log record on its way to the console; log files (Ray's session logs) keep theirs.

    For a driver about to exit on a clear error while Ray work it abandoned is torn down: a stalled graph's
    executor thread, stopped under it by Ray's shutdown at exit, logs tracebacks that would bury the message.
    """
    drop = _DropAll()
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] == "ray"]
    for logger in [logging.getLogger()] + [logging.getLogger(n) for n in names]:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(drop)
