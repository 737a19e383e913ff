"""Ray's token authentication as Ray's own CLI finds the token: ``RAY_AUTH_TOKEN``, then the file
``RAY_AUTH_TOKEN_PATH`` names, then ``~/.ray/auth_token``. Used where this machine talks to a cluster: ``run`` with
``ray.address``, ``submit``/``jobs``/``resume``."""

from __future__ import annotations

import logging
import os


def enable_local_token() -> None:
    """Makes Ray's clients in this process send this machine's token, when it has one and ``RAY_AUTH_MODE`` is not
    set (Ray's ``maybe_enable_token_auth_if_token_available``)."""
    from ray._private.authentication import authentication_token_setup as setup

    quiet = logging.getLogger(setup.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warning speaks to a cluster's owner ("set RAY_AUTH_MODE=disabled to opt out")
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def token_source() -> str:
    """Where Ray takes this machine's token from (for messages)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    return str(_get_default_token_path())
