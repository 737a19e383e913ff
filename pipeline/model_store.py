"""Checkpoints on object storage: fetched once per node into the model cache, so that :mod:`model` (which reads
local files only) loads them. Pass :func:`fetcher` as the ``fetch`` of ``whisper_batch.model.checkpoint.load_model`` /
``describe_model``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from typing import Any

import fsspec

from whisper_batch.model.model_cache import cache_root, publish_dir

logger = logging.getLogger(__name__)

_CACHE_META = ".whisper-batch-fetch.json"


def fetcher(storage_options: dict[str, Any] | None, cache_dir: str | None = None) -> Callable[[str], str]:
    """``uri -> local path`` with these storage options, for ``whisper_batch.model.checkpoint``'s ``fetch``."""
    return partial(fetch_to_cache, storage_options=storage_options, cache_dir=cache_dir)


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def fetch_to_cache(uri: str, storage_options: dict | None = None, cache_dir: str | None = None) -> str:
    """Returns a local path for ``uri``, downloading a remote file or directory once per cache.

    Local paths and ``file://`` URIs come back as plain paths, without copying. Remote objects land in
    ``<cache>/<sha256(uri)>/<basename>``: downloaded into a temporary directory and renamed into place.
    """
    if _is_local(uri):
        return uri[len("file://") :] if uri.startswith("file://") else uri
    root = cache_root(cache_dir)
    final = os.path.join(root, hashlib.sha256(uri.encode()).hexdigest()[:32])
    meta = os.path.join(final, _CACHE_META)
    if os.path.exists(meta):
        with open(meta) as f:
            return os.path.join(final, json.load(f)["name"])
    fs, remote = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    remote = remote.rstrip("/")
    name = posixpath.basename(remote) or "model"
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fetch.tmp-", dir=root)
    try:
        target = os.path.join(tmp, name)
        if fs.isfile(remote):  # before isdir: over http(s), isdir would scan the file for links
            fs.get_file(remote, target)
        elif fs.isdir(remote):
            files = fs.find(remote)  # every file below, at any depth
            if not files:
                raise FileNotFoundError(f"{uri}: directory is empty, expected a model directory")
            for f in files:
                local = os.path.join(target, *posixpath.relpath(f, remote).split("/"))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get_file(f, local)
        else:
            raise FileNotFoundError(f"{uri}: no such file or directory")
        logger.info("fetched %s into %s", uri, final)
        with open(os.path.join(tmp, _CACHE_META), "w") as f:
            json.dump({"uri": uri, "name": name}, f)
        return os.path.join(publish_dir(tmp, final, marker=_CACHE_META), name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
