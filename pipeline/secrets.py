"""What is secret, decided once: every path that shows or ships settings (the run record, logs, error messages,
``status``, a job's shipped config and metadata) asks this module.

A storage option is secret when its name says so (:func:`is_secret_name`: ``key``, ``secret``, ``token``,
``password``, an ``Authorization`` header, ...); a URI's password is secret; so are the values of the standard
credential environment variables. Three ways to keep them out:

- :func:`redact_options` masks them as ``***`` (what a run record and ``status`` show);
- :func:`without_secrets` drops them (what a job ships to a cluster, whose nodes use their own credentials);
- :func:`scrub` masks known secret values, and anything shaped like an AWS access key id or signature, in free text
  (log lines, error messages from storage libraries).
"""

from __future__ import annotations

import os
import re
from typing import Any

# option names that are secret whole (compared lower-case, "-" read as "_")
SECRET_NAMES = frozenset(
    {"key", "secret", "token", "username", "password", "passwd", "credentials", "connection_string", "sas_token",
     "x_amz_security_token"}
)
# ... and words that make any option name secret (aws_secret_access_key, client_secret, Authorization, api_key, ...)
SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "auth", "access_key", "account_key", "api_key",
                "private_key")
# environment variables whose values are credentials
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
              "GOOGLE_APPLICATION_CREDENTIALS_JSON", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "RAY_AUTH_TOKEN")
MASK = "***"
_MIN_SECRET_LEN = 4  # shorter values would mask ordinary words
_PATTERNS = [
    (re.compile(r"(Credential=)[^\s,/'\"]+"), r"\1***"),
    (re.compile(r"(Signature=)[0-9a-fA-F]+"), r"\1***"),
    (re.compile(r"(X-Amz-Security-Token['\"]?\s*[:=]\s*['\"]?)[^\s,&'\"]+", re.I), r"\1***"),
    (re.compile(r"(Authorization['\"]?\s*[:=]\s*['\"]?)[^,'\"}\n]+", re.I), r"\1***"),
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b"), MASK),
]
_URI_PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")
_URI_USERINFO = re.compile(r"(?<=://)[^/@:]*:[^/@]*@")

_registered: set[str] = set()


def is_secret_name(name: Any) -> bool:
    n = str(name).lower().replace("-", "_")
    return n in SECRET_NAMES or any(word in n for word in SECRET_WORDS)


def redact_uri(uri: str) -> str:
    """Masks a password in `scheme://user:password@host/...`."""
    return _URI_PASSWORD.sub(r"\1:***@", uri)


def redact_options(value: Any) -> Any:
    """A copy with secret entries masked as ``***`` (nested dicts and lists too) and URI passwords masked."""
    if isinstance(value, dict):
        return {k: MASK if is_secret_name(k) and v is not None else redact_options(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_options(v) for v in value]
    if isinstance(value, str):
        return redact_uri(value)
    return value


def without_secrets(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``options`` without its secret entries (nested dicts too), and URIs without their user:password."""
    out = {}
    for name, value in (options or {}).items():
        if is_secret_name(name):
            continue
        if isinstance(value, dict):
            value = without_secrets(value)
        elif isinstance(value, str):
            value = _URI_USERINFO.sub("", value)
        out[name] = value
    return out


def secret_option_names(options: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """Dotted names of the options that are secret or hold a URI with a password (values are never shown)."""
    names = []
    for name, value in (options or {}).items():
        if is_secret_name(name) and value is not None:
            names.append(f"{prefix}{name}")
        elif isinstance(value, dict):
            names += secret_option_names(value, f"{prefix}{name}.")
        elif isinstance(value, str) and redact_uri(value) != value:
            names.append(f"{prefix}{name} (its password)")
    return names


def secret_values(options: dict[str, Any] | None) -> list[str]:
    """The values of the secret options (nested), and of the credential environment variables that are set."""
    values = [v for v in (os.environ.get(name) for name in SECRET_ENV) if v]

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, secret or is_secret_name(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, secret)
        elif secret and isinstance(value, str):
            values.append(value)
            values.extend(value.split()[1:])  # "Bearer <token>", "AWS4-HMAC-SHA256 Credential=...": the token alone
        elif isinstance(value, str) and (m := _URI_PASSWORD.search(value)):
            values.append(m.group(0)[len(m.group(1)) + 1 : -1])  # the password of a URI

    walk(options or {}, False)
    return [v for v in values if len(v) >= _MIN_SECRET_LEN]


def register(options: dict[str, Any] | None) -> None:
    """Remembers the secret values of ``options`` (and the credential environment) for every later :func:`scrub`."""
    _registered.update(secret_values(options))


def scrub(text: str, options: dict[str, Any] | None = None) -> str:
    """``text`` with secret values (registered ones, and those of ``options``) and credential-shaped substrings
    masked."""
    known = _registered | set(secret_values(options)) if options is not None else _registered
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return redact_uri(text)
