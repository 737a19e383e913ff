"""CLI logging: storage clients stay quiet under -vv and credentials are masked in every log line."""

from __future__ import annotations

import logging

from whisper_batch.jobs.logs import QUIET_LOGGERS, configure_logging
from whisper_batch.pipeline.secrets import register as register_secrets
from whisper_batch.pipeline.secrets import scrub


def test_signatures_access_key_ids_and_registered_secrets_are_masked():
    register_secrets({"key": "my-access-key", "client_kwargs": {"endpoint_url": "http://minio:9000"},
                      "config_kwargs": {"session_token": "tok3n-value"}})
    line = ("Authorization: AWS4-HMAC-SHA256 Credential=AKIAABCDEFGHIJKLMNOP/20240101/us-east-1/s3/aws4_request, "
            "Signature=0123abcd; key my-access-key token tok3n-value at http://minio:9000 ASIAABCDEFGHIJKLMNOP")
    out = scrub(line)
    for secret in ("AKIAABCDEFGHIJKLMNOP", "0123abcd", "my-access-key", "tok3n-value", "ASIAABCDEFGHIJKLMNOP"):
        assert secret not in out, out
    assert "http://minio:9000" in out  # not a secret


def test_debug_verbosity_keeps_storage_clients_at_info(caplog):
    root = logging.getLogger()
    saved = root.level, {n: logging.getLogger(n).level for n in QUIET_LOGGERS}
    try:
        configure_logging(2)
        assert root.level == logging.DEBUG
        assert all(logging.getLogger(n).getEffectiveLevel() >= logging.INFO for n in QUIET_LOGGERS)
        register_secrets({"secret": "shh-its-a-secret"})
        with caplog.at_level(logging.DEBUG):
            logging.getLogger("jobs.test").warning("using %s", "shh-its-a-secret")
        assert "shh-its-a-secret" not in caplog.text
    finally:
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)
