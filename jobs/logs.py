"""Logging of the CLI: ``-v`` / ``-vv`` levels, with credentials kept out of every line.

Two guards. Storage clients (botocore, aiobotocore, s3fs, fsspec, urllib3, gcsfs, …) stay at INFO or above even
under ``-vv``: at DEBUG botocore logs each request's headers, whose ``Authorization`` value names the access key id.
And every line is scrubbed on its way out (:func:`whisper_batch.pipeline.secrets.scrub`): known secret values (the
config's storage options and the standard credential environment variables) and anything shaped like an AWS signature or
access key id become ``***``.
"""

from __future__ import annotations

import logging

from whisper_batch.pipeline.secrets import register, scrub

# loggers that log request headers, signed URLs or credential sources at DEBUG
QUIET_LOGGERS = (
    "botocore", "aiobotocore", "boto3", "s3transfer", "s3fs", "fsspec", "gcsfs", "adlfs", "urllib3", "aiohttp",
    "google.auth", "azure",
)
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
    register(None)  # the credential environment variables' values


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
